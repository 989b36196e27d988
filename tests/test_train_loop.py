"""The training loop's hot path and guards: host reads only at logging steps, the non-finite guard, keyed seeds
of any size, loader workers that survive SIGTERM, the cache's loud fallback and `data.require_cache`, kept text
statistics, `objective.shift: auto`, a torn metrics tail, sequence-parallel checks per latent shape, and
validation on the live model with the EMA swapped in."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from frameloom.checkpoint import io as ckpt
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.errors import FrameloomError
from frameloom.pipeline import run_cache
from frameloom.train.host_sync import count_host_reads
from frameloom.train.interval import NonFiniteStop
from frameloom.train.metrics import MetricsLogger, read_metrics
from frameloom.train.rng import stream_seed
from frameloom.train.trainer import Trainer, train
from tiny import TINY


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """24 tiny synthetic clips, cached once (the store beside the manifest)."""
    root = tmp_path_factory.mktemp("data")
    synthetic.write_synthetic_set(root, num_clips=24, seed=0, height=8, width=8, num_frames=4, progress=False)
    manifest = root / "manifest.parquet"
    run_cache(config(manifest, root / "runs" / "cache"), progress=False)
    return manifest


def config(dataset: Path, run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"data.manifest={dataset}", f"run_dir={run_dir}", *extra])


def poison_from(trainer: Trainer, step: int) -> None:
    """Make every micro-batch of optimizer steps >= `step` (1-based) non-finite (NaN latents)."""
    encode = trainer._encode

    def encode_nan(batch):
        latent, cond = encode(batch)
        return (latent * float("nan") if trainer.step + 1 >= step else latent), cond

    trainer._encode = encode_nan


# ---------------------------------------------------------------------------------------------- hot loop


def test_no_host_reads_between_logging_steps(dataset, tmp_path):
    """The step's device work (micro-steps, clip/optimizer, EMA, bookkeeping) reads no tensor value on the
    host; each logging interval costs exactly one read (the interval's (k, 3) table)."""
    cfg = config(dataset, tmp_path / "run", "train.steps=6", "train.log_every=3", "train.ema_decay=0.9",
                 "checkpoint.every=0",
                 "model.config={patch_size: [1, 4, 4], hidden_size: 32, depth: 2, num_heads: 2, "
                 "pooled_text: true, positional_conditioning: true, velocity_skip: true}")  # fmt: skip
    trainer = Trainer(cfg)
    per_flush: list[int] = []
    with count_host_reads() as reads:

        def measured(fn):
            def wrapper(*args, **kwargs):
                with reads.measuring():
                    return fn(*args, **kwargs)

            return wrapper

        for name in ("_micro_step", "_optimizer_step"):
            setattr(trainer, name, measured(getattr(trainer, name)))
        trainer.ema.update = measured(trainer.ema.update)
        trainer.interval.add = measured(trainer.interval.add)
        flush = trainer._flush

        def counted_flush(*args, **kwargs):
            before = reads.total
            with reads.measuring():
                flush(*args, **kwargs)
            per_flush.append(reads.total - before)

        trainer._flush = counted_flush
        result = trainer.fit()
    assert result.step == 6 and len(result.losses) == 6
    assert per_flush == [1, 1]  # steps 3 and 6
    assert dict(reads.counts) == {"tolist": 2}  # and nothing between them


def test_nonfinite_streak_stops_the_run_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    """Steps 3, 4, 5 non-finite with max_consecutive_skips=3: the run stops at step 5 without saving; the
    optimizer state (moments and step counts), weights and EMA are exactly those after step 2."""
    run = tmp_path / "run"
    cfg = config(dataset, run, "train.steps=10", "train.log_every=1", "train.max_consecutive_skips=3",
                 "checkpoint.every=2", "checkpoint.keep_last=0", "train.ema_decay=0.9")  # fmt: skip
    trainer = Trainer(cfg)
    poison_from(trainer, 3)
    snapshots = {}
    save = trainer.save

    def save_and_snapshot(*args, **kwargs):
        snapshots[trainer.step] = {
            id(p): {k: v.clone() for k, v in state.items()} for p, state in trainer.optimizer.state.items()
        }
        return save(*args, **kwargs)

    trainer.save = save_and_snapshot
    with pytest.raises(NonFiniteStop, match=r"3 consecutive steps \(from step 3 to 5\).*step-00000004"):
        trainer.fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    records = read_metrics(run)
    assert [r["skipped"] for r in records] == [False, False, True, True, True]
    assert [r["consecutive_skips"] for r in records] == [0, 0, 1, 2, 3]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 3]
    # a skipped step leaves AdamW's moments and step counts untouched (2 applied steps, then only skips)
    good = snapshots[2]
    for p, state in trainer.optimizer.state.items():
        assert float(state["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[key], good[id(p)][key]), key
    two, four = (ckpt.load_checkpoint(run / "checkpoints" / f"step-0000000{s}") for s in (2, 4))
    for part in ("model", "ema"):
        assert two[part].keys() == four[part].keys()
        for key in two[part]:
            assert torch.equal(two[part][key], four[part][key]), (part, key)
    for name, p in trainer.module.named_parameters():  # the live weights too, after the 3rd skip
        assert torch.equal(p.detach(), two["model"][name]), name


def test_seeds_of_any_size_train(dataset, tmp_path):
    """Seeds above ~1.4e5 overflowed the product that seeded each micro-step; any seed trains now, and each
    seed draws its own noise."""
    losses = {}
    for seed in (0, 2**31, 2**62, 20240101):
        result = train(config(dataset, tmp_path / f"run-{seed}", f"seed={seed}", "train.steps=1"))
        assert result.step == 1 and math.isfinite(result.losses[0])
        losses[seed] = result.losses[0]
    assert len(set(losses.values())) == 4


def test_stream_seed_is_a_63_bit_hash():
    # BLAKE2b-64 of "seed:step:slot", top bit cleared (values computed once from the definition)
    assert stream_seed(0, 0, 0) == 8866250585812870066
    assert stream_seed(20240101, 0, 0) == 8782607379693604332
    assert stream_seed(2**62, 5, 3) == 5758644730480371998
    # the old product keyed (seed 1, step 0) and (seed 0, step 1_000_003) to the same stream
    assert stream_seed(1, 0, 0) != stream_seed(0, 1_000_003, 0)
    assert all(0 <= stream_seed(s, 7, 1) < 2**63 for s in (-1, 2**64, 10**30))


def test_loader_workers_survive_sigterm():
    """torchrun signals the rank's whole process group: the loader workers must not die of SIGTERM."""
    from frameloom.config.schema import DataConfig
    from frameloom.train.loader import build_loader

    data = list(range(64))
    loader = build_loader(
        data,
        [[i, i + 1] for i in range(0, 64, 2)],
        torch.tensor,
        DataConfig(num_workers=2),
        torch.device("cpu"),
    )
    batches = iter(loader)
    # Batches come round-robin from the workers: after two, both workers have run their worker_init.
    assert [next(batches).tolist() for _ in range(2)] == [[0, 1], [2, 3]]
    for worker in batches._workers:  # the worker processes this iterator started
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(w.is_alive() for w in batches._workers)
    assert [b.tolist() for b in batches][-1] == [62, 63]  # the remaining 30 batches arrive


class _Pair(NamedTuple):
    weight: torch.Tensor
    index: int


def _mixed_batch(items: list[int]) -> dict:
    """A batch of every kind a collate returns: small tensors of several dtypes (0-dim, empty, bf16, bool),
    nested containers, a large tensor and a non-tensor."""
    i = items[0]
    return {
        "latent": torch.arange(12, dtype=torch.float32).reshape(3, 4) + i,
        "mask": torch.tensor([True, False, True]),
        "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16) * i,
        "step": torch.tensor(i),
        "empty": torch.empty(0, 5),
        "extras": {"ids": [torch.tensor([i, i + 1]), (torch.tensor(7.0),)], "pair": _Pair(torch.ones(2), i)},
        "large": torch.full((300, 1000), float(i)),  # 1.2 MB: above BY_VALUE_MAX_BYTES
        "text": [f"clip {i}"],
    }


def test_small_tensors_leave_loader_workers_by_value():
    """A worker's small tensors arrive inside the pickle as ordinary, writable tensors equal to the collated
    ones; large ones still come through shared memory; without workers the batch is untouched."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers its tensor reductions with ForkingPickler)

    from frameloom.config.schema import DataConfig
    from frameloom.train.loader import BY_VALUE_MAX_BYTES, _small_by_value, build_loader

    want = [_mixed_batch([i]) for i in (0, 1, 2)]
    assert want[0]["large"].nbytes > BY_VALUE_MAX_BYTES >= want[0]["latent"].nbytes
    marked = _small_by_value(want[1])
    assert type(marked["latent"]).__name__ == "_ByValue" and isinstance(marked["large"], torch.Tensor)
    received = ForkingPickler.loads(ForkingPickler.dumps(marked))  # what a worker's queue does
    for got in (
        received,
        *iter(
            build_loader(
                range(3), [[0], [1], [2]], _mixed_batch, DataConfig(num_workers=2), torch.device("cpu")
            )
        ),
    ):
        i = int(got["step"])
        assert got.pop("text") == want[i]["text"]
        torch.testing.assert_close(got, {k: v for k, v in want[i].items() if k != "text"}, rtol=0, atol=0)
        assert got["bf16"].dtype == torch.bfloat16 and got["mask"].dtype == torch.bool
        assert type(got["extras"]["pair"]) is _Pair and got["extras"]["pair"].index == i
        assert got["empty"].shape == (0, 5) and got["step"].shape == ()
        assert not got["latent"].is_shared() and got["large"].is_shared()
        got["latent"].add_(1)  # writable (a copy of the pickled bytes)
    plain = iter(build_loader(range(3), [[0]], _mixed_batch, DataConfig(num_workers=0), torch.device("cpu")))
    assert type(next(plain)["latent"]) is torch.Tensor


def test_interpreter_exits_with_loader_workers_alive(tmp_path):
    """A loader iterator that outlives its run (pytest keeps a failed test's locals) must not hang the exit:
    multiprocessing would SIGTERM and join its workers, which ignore SIGTERM."""
    script = tmp_path / "keep.py"
    script.write_text(
        "import torch\n"
        "from frameloom.config.schema import DataConfig\n"
        "from frameloom.train.loader import build_loader\n"
        "loader = build_loader(list(range(8)), [[i] for i in range(8)], torch.tensor, DataConfig(num_workers=2),"
        " torch.device('cpu'))\n"
        "KEEP = iter(loader)\n"
        "print(next(KEEP).tolist(), flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[0]", done.stderr


# ---------------------------------------------------------------------------------------------- data


def test_incomplete_cache_is_reported_or_refused(dataset, tmp_path, caplog):
    cache = tmp_path / "cache"
    run_cache(config(dataset, tmp_path / "c", f"data.cache_dir={cache}"), progress=False)
    for path in sorted((cache / "video").rglob("*.safetensors"))[:2]:  # 2 of 24 clips lose their latents
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="frameloom.train"):
        trainer = Trainer(config(dataset, tmp_path / "r", f"data.cache_dir={cache}"))
    assert not trainer.cached
    assert "lacks the entries of 2 of 24 samples" in caplog.text and "on the fly" in caplog.text
    with pytest.raises(FrameloomError, match=r"data.require_cache=true: .* 2 of 24 samples.*frameloom cache"):
        Trainer(config(dataset, tmp_path / "r2", f"data.cache_dir={cache}", "data.require_cache=true"))
    with pytest.raises(FrameloomError, match="contradicts data.use_cache=never"):
        Trainer(config(dataset, tmp_path / "r3", "data.require_cache=true", "data.use_cache=never"))


def test_presets_require_the_cache_and_use_loader_workers():
    root = Path(__file__).resolve().parents[1] / "configs"
    presets = sorted(root.glob("*.yaml"))
    assert len(presets) >= 7
    for path in presets:
        d = load_config(path).data
        assert d.require_cache and d.num_workers > 0 and d.persistent_workers and d.pin_memory, path.name


# ---------------------------------------------------------------------------------------------- model


POOLED = "model.config={patch_size: [1, 4, 4], hidden_size: 32, depth: 2, num_heads: 2, pooled_text: true}"


def test_pretrained_text_statistics_are_kept_unless_asked(dataset, tmp_path):
    first = Trainer(config(dataset, tmp_path / "a", POOLED))
    fitted_mean = first.module.text_mean.clone()
    model = first.module
    model.text_mean.fill_(3.0)
    model.text_std.fill_(2.0)
    model.save_pretrained(tmp_path / "pretrained")
    kept = Trainer(config(dataset, tmp_path / "b", f"model.pretrained={tmp_path / 'pretrained'}"))
    assert torch.equal(kept.module.text_mean, torch.full_like(fitted_mean, 3.0))
    assert torch.equal(kept.module.text_std, torch.full_like(fitted_mean, 2.0))
    refit = Trainer(config(dataset, tmp_path / "c", f"model.pretrained={tmp_path / 'pretrained'}",
                           "model.text_statistics=fit"))  # fmt: skip
    assert torch.equal(refit.module.text_mean, fitted_mean)


def test_objective_shift_auto():
    from frameloom.models import diffusers_family as df
    from frameloom.objectives import build_objective

    cfg = load_config(None, ["objective.shift=auto"])
    assert cfg.objective.shift == "auto"
    objective = build_objective(cfg)
    x0 = torch.zeros(2, 3, 4, 8, 8)  # T_lat 4, 8 x 8 -> S = 16 tokens per frame after 2x2 patching
    t = objective.draw(x0, torch.Generator().manual_seed(0)).t
    u = torch.sigmoid(torch.randn(2, generator=torch.Generator().manual_seed(0)))  # drawn first, logit-normal
    s = (1 + (16 - 256) * 2 / 3840) * math.sqrt(4)  # Open-Sora 2.0: 1.75
    torch.testing.assert_close(t, s * u / (1 + (s - 1) * u), rtol=0, atol=1e-7)
    # a family reads auto (and 1) as its scheduler's own shift; a number replaces it
    assert df.flow_objective(cfg, 3.0).shift == 3.0
    assert df.flow_objective(load_config(None, ["objective.shift=2.5"]), 3.0).shift == 2.5
    with pytest.raises(FrameloomError, match="shift must be a positive number or 'auto', got 'fast'"):
        build_objective(load_config(None, ["objective.shift=fast"]))


def test_sequence_split_is_checked_for_every_latent_shape(dataset, tmp_path):
    # a frame policy makes num_frames a maximum: shorter clips give the other valid lengths (4k+1 <= 5);
    # without buckets such clips cannot be stacked, so batches of one (issue 10: refused otherwise)
    trainer = Trainer(config(dataset, tmp_path / "r", "data.frame_policy=4k+1", "data.num_frames=5",
                             "data.use_cache=never", "train.batch_size=1"))  # fmt: skip
    assert trainer.latent_grids == [(1, 8, 8), (5, 8, 8)]  # the pixel codec keeps the clip's size
    fake = SimpleNamespace(plan=SimpleNamespace(sp=2), latent_grids=[(4, 8, 8), (3, 4, 4)])
    model = SimpleNamespace(patch=(1, 4, 4), num_heads=2)  # 16 tokens, then 3 tokens
    with pytest.raises(FrameloomError, match=r"sp_size=2 does not divide the 3 video tokens .*3x4x4"):
        Trainer._check_sequence_split(fake, model)


# ---------------------------------------------------------------------------------------------- logs


def test_torn_metrics_tail_is_dropped_on_resume(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    logger = MetricsLogger(tmp_path, resume_step=3, tensorboard=False)
    logger.log({"step": 4, "loss": 0.25})
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [*lines, '{"step": 4, "loss": 0.25}']


# ---------------------------------------------------------------------------------------------- validation


def test_validation_samples_the_live_model_with_ema_swapped_in(dataset, tmp_path):
    """Validation writes what sampling the checkpoint's EMA weights writes (byte for byte), builds no second
    model, and leaves the trained weights as they were."""
    from frameloom.models.dit.model import VideoDiT
    from frameloom.sampling.generate import sample_command

    prompts = ["a red square moving left", "a blue circle moving up", "a green star"]
    run = tmp_path / "run"
    trainer = Trainer(config(dataset, run, "train.steps=2", "train.ema_decay=0.9", "validation.every=2",
                             f"validation.prompts={json.dumps(prompts)}"))  # fmt: skip
    built = []
    init = VideoDiT.__init__

    def counting_init(self, *args, **kwargs):
        built.append(1)
        init(self, *args, **kwargs)

    VideoDiT.__init__ = counting_init
    try:
        trainer.fit()
    finally:
        VideoDiT.__init__ = init
    assert built == []  # no copy of the model for validation
    weights = load_file(ckpt.latest_checkpoint(run) / "model.safetensors")
    for name, p in trainer.module.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name  # trained weights restored after the EMA swap
    made = sorted((run / "samples" / "step-00000002").glob("*.mp4"))
    assert [p.name[:4] for p in made] == ["000-", "001-", "002-"]
    again = sample_command(str(run), prompts=prompts, seeds=[0], out=str(tmp_path / "again"))
    assert [p.name for p in again] == [p.name for p in made]
    for a, b in zip(again, made):
        assert a.read_bytes() == b.read_bytes(), a.name
