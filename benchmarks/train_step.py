"""Trainer overhead, host synchronizations per step and data-loader throughput, printed as JSON.

1. frameloom's optimizer steps per second (the real Trainer: cached data loader, keyed noise draws on the
   device, caption dropout, clipping, fused AdamW with the non-finite skip, EMA, metrics.jsonl) against a bare
   PyTorch loop over the same model, batch shapes and fused AdamW on tensors already in memory. Median of
   `--repeats` interleaved measurements (the machine may be shared). Target: overhead at most 2% on CPU.
   Beside it, the seconds per step of each part of the loop (`step_parts_ms`) and frameloom's own share
   (EMA, bookkeeping, data wait, host-to-device copies) relative to forward/backward + optimizer
   (`frameloom_extra_pct`): the same question, answered without comparing two noisy timings.
2. Host synchronizations per optimizer step, between logging steps and at a logging step. On CUDA every
   synchronizing call is reported by `torch.cuda.set_sync_debug_mode("warn")`; on CPU nothing synchronizes,
   so the calls that would (`.item()`, `.tolist()`, `bool()`, `float()`, `int()` of a tensor, `.nonzero()`)
   are counted (frameloom.train.host_sync). Target: 0 between logging steps.
3. Cached-latent batches per second read by the data loader alone, against the batches per second the
   training step consumes (the loader must be faster, or training waits on data).

Usage: python benchmarks/train_step.py [--steps 60] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.objectives.flow import flow_loss
from frameloom.pipeline import run_cache
from frameloom.train.host_sync import count_host_reads
from frameloom.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(trainer: Trainer, steps: int, batch: dict) -> float:
    """Steps per second of the minimal loop: noise, forward, MSE, backward, clip, fused AdamW; nothing else."""
    model, device = trainer.model, trainer.device
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x0 = batch["latent"].to(device).float()
    emb, mask = batch["text_emb"].to(device).float(), batch["text_mask"].to(device)
    b = x0.shape[0]
    for i in range(steps + 5):
        if i == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        t = torch.rand(b, device=device)
        noise = torch.randn_like(x0)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=trainer.autocast is not None):
            pred = model(x_t, t, emb, mask)
        loss = flow_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def host_syncs(cfg, log_every: int) -> dict:
    """Synchronizations (CUDA) or value reads (CPU) per step: between logging steps, and per logging step."""
    trainer = Trainer(cfg)
    cuda = trainer.device.type == "cuda"
    steps = {"between": 0, "at_log": 0}
    with count_host_reads() as reads, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def measured(fn, kind):
            def wrapper(*args, **kwargs):
                before = len(caught) if cuda else reads.total
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    with reads.measuring():
                        return fn(*args, **kwargs)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode(0)
                    after = len(caught) if cuda else reads.total
                    steps[kind] += after - before

            return wrapper

        trainer._micro_step = measured(trainer._micro_step, "between")
        trainer._optimizer_step = measured(trainer._optimizer_step, "between")
        if trainer.ema is not None:
            trainer.ema.update = measured(trainer.ema.update, "between")
        trainer.interval.add = measured(trainer.interval.add, "between")
        trainer._flush = measured(trainer._flush, "at_log")
        result = trainer.fit()
    flushes = -(-result.step // log_every)
    return {
        "host_syncs_per_step_between_logging": steps["between"] / result.step,
        "host_syncs_per_logging_step": steps["at_log"] / flushes,
        "counted_by": "torch.cuda.set_sync_debug_mode" if cuda else "tensor value reads (CPU)",
    }


def step_parts(cfg) -> dict:
    """Seconds per step spent in each part of the trainer's loop (a load-independent view of the overhead:
    everything but the forward/backward and the optimizer step is frameloom's own)."""
    import collections

    trainer = Trainer(cfg)
    spent: collections.Counter[str] = collections.Counter()

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        setattr(obj, name, wrapper)

    loader = trainer._loader

    def timed_loader():
        batches = iter(loader())

        class Waiting:
            first = True

            def __iter__(self):
                return self

            def __next__(self):
                start = time.perf_counter()
                try:
                    return next(batches)
                finally:  # the first batch includes starting the workers: once per run, not per step
                    spent["loader_startup" if self.first else "data_wait"] += time.perf_counter() - start
                    self.first = False

        return Waiting()

    trainer._loader = timed_loader
    timed(trainer, "_encode", "host_to_device")
    timed(trainer, "_micro_step", "forward_backward")
    timed(trainer, "_optimizer_step", "clip_and_optimizer")
    if trainer.ema is not None:
        timed(trainer.ema, "update", "ema")
    timed(trainer.interval, "add", "bookkeeping")
    timed(trainer, "_flush", "bookkeeping")
    steps = trainer.fit().step
    spent["forward_backward"] -= spent["host_to_device"]  # _encode runs inside _micro_step
    startup = spent.pop("loader_startup", 0.0)
    per_step = {k: v / steps for k, v in spent.items()}
    compute = per_step["forward_backward"] + per_step["clip_and_optimizer"]
    extra = sum(v for k, v in per_step.items() if k not in ("forward_backward", "clip_and_optimizer"))
    return {
        "step_parts_ms": {k: round(1000 * v, 2) for k, v in sorted(per_step.items())},
        "loader_startup_ms": round(1000 * startup, 1),
        "frameloom_extra_pct": round(100 * extra / compute, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic.write_synthetic_set(
            tmp / "data", num_clips=256, height=16, width=16, num_frames=8, progress=False
        )
        overrides = [
            f"data.manifest={tmp / 'data' / 'manifest.parquet'}",
            f"run_dir={tmp / 'run'}",
            f"train.batch_size={args.batch}",
            "train.progress=false",
            "checkpoint.every=0",
            "logging.tensorboard=false",
        ]
        cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
        run_cache(cfg, progress=False)

        # 1. The trainer, end to end (construction, warm-up and the final save cancel out: two runs, the
        # difference), interleaved with the bare loop.
        def trainer_seconds(steps: int) -> float:
            trainer = Trainer(
                load_config(ROOT / "configs" / "quickstart.yaml", [*overrides, f"train.steps={steps}"])
            )
            return trainer.fit().seconds

        warm = 5
        trainer = Trainer(cfg)
        batch = next(iter(trainer._loader()))
        frameloom_runs, bare_runs = [], []
        for _ in range(args.repeats):
            frameloom_runs.append(args.steps / (trainer_seconds(args.steps + warm) - trainer_seconds(warm)))
            bare_runs.append(bare_loop(trainer, args.steps, batch))
        frameloom_sps, bare_sps = statistics.median(frameloom_runs), statistics.median(bare_runs)

        # 2. Host synchronizations per step.
        syncs = host_syncs(
            load_config(ROOT / "configs" / "quickstart.yaml", [*overrides, "train.steps=20"]),
            cfg.train.log_every,
        )

        parts = step_parts(
            load_config(ROOT / "configs" / "quickstart.yaml", [*overrides, f"train.steps={args.steps}"])
        )

        # 3. The data loader alone.
        loader = iter(trainer._loader())
        next(loader)
        n = 200
        start = time.perf_counter()
        for _ in range(n):
            next(loader)
        loader_bps = n / (time.perf_counter() - start)

    print(
        json.dumps(
            {
                "model": cfg.model.config,
                "device": str(trainer.device),
                "batch_size": args.batch,
                "clip": [cfg.data.num_frames, cfg.data.height, cfg.data.width],
                "threads": torch.get_num_threads(),
                "loader_workers": cfg.data.num_workers,
                "log_every": cfg.train.log_every,
                "frameloom_steps_per_s": round(frameloom_sps, 3),
                "bare_pytorch_steps_per_s": round(bare_sps, 3),
                "frameloom_runs": [round(x, 3) for x in frameloom_runs],
                "bare_runs": [round(x, 3) for x in bare_runs],
                "trainer_overhead_pct": round(100 * (bare_sps / frameloom_sps - 1), 2),
                "target_overhead_pct": 2.0,
                **parts,
                **syncs,
                "target_host_syncs_between_logging": 0,
                "loader_batches_per_s": round(loader_bps, 1),
                "training_batches_per_s": round(frameloom_sps * cfg.train.grad_accum, 3),
                "loader_headroom_x": round(loader_bps / (frameloom_sps * cfg.train.grad_accum), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
