"""Trainer overhead and data-loader throughput, printed as JSON.

1. frameloom's optimizer steps per second (the real Trainer: cached data loader, timestep/noise draws,
   caption dropout, clipping, EMA, metrics.jsonl) against a bare PyTorch loop over the same model, batch
   shapes and AdamW, on tensors already in memory. Target: overhead at most 5%.
2. Cached-latent batches per second read by the data loader alone, against the batches per second the
   training step consumes (the loader must be faster, or training waits on data).

Usage: python benchmarks/train_step.py [--steps 60] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.objectives.flow import flow_loss
from frameloom.pipeline import run_cache
from frameloom.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(trainer: Trainer, steps: int, batch: dict) -> float:
    """Steps per second of the minimal loop: forward, MSE, backward, clip, AdamW; nothing else."""
    model = trainer.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    x0 = batch["latent"].float()
    emb, mask = batch["text_emb"].float(), batch["text_mask"]
    b = x0.shape[0]
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        t = torch.rand(b)
        noise = torch.randn_like(x0)
        x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
        loss = flow_loss(model(x_t, t, emb, mask), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
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

        # 1. The trainer, end to end (warm-up steps excluded by timing two runs and taking the difference).
        def trainer_seconds(steps: int) -> float:
            trainer = Trainer(
                load_config(ROOT / "configs" / "quickstart.yaml", [*overrides, f"train.steps={steps}"])
            )
            return trainer.fit().seconds

        warm = 5
        frameloom_sps = args.steps / (trainer_seconds(args.steps + warm) - trainer_seconds(warm))

        trainer = Trainer(cfg)
        batch = next(iter(trainer._loader()))
        bare_sps = bare_loop(trainer, args.steps, batch)

        # 2. The data loader alone.
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
                "batch_size": args.batch,
                "clip": [cfg.data.num_frames, cfg.data.height, cfg.data.width],
                "threads": torch.get_num_threads(),
                "frameloom_steps_per_s": round(frameloom_sps, 3),
                "bare_pytorch_steps_per_s": round(bare_sps, 3),
                "trainer_overhead_pct": round(100 * (bare_sps / frameloom_sps - 1), 2),
                "target_overhead_pct": 5.0,
                "loader_batches_per_s": round(loader_bps, 1),
                "training_batches_per_s": round(frameloom_sps * cfg.train.grad_accum, 3),
                "loader_headroom_x": round(loader_bps / (frameloom_sps * cfg.train.grad_accum), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
