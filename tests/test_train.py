"""Trainer: loss falls, bit-exact resume, atomic checkpoints, SIGTERM, non-finite steps, cache vs on the fly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frameloom.checkpoint import io as ckpt
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.pipeline import run_cache
from frameloom.train.metrics import read_metrics
from frameloom.train.trainer import Trainer, train
from tiny import TINY


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """24 tiny synthetic clips with their manifest (no probing needed), shared by this module's tests."""
    root = tmp_path_factory.mktemp("data")
    synthetic.write_synthetic_set(root, num_clips=24, seed=0, height=8, width=8, num_frames=4, progress=False)
    return root / "manifest.parquet"


def config(dataset: Path, run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"data.manifest={dataset}", f"run_dir={run_dir}", *extra])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.latest_checkpoint(run_dir) / "model.safetensors")


def test_loss_falls(dataset, tmp_path):
    cfg = config(
        dataset, tmp_path / "run", "train.steps=100", "checkpoint.every=0", "objective.caption_dropout=0"
    )
    run_cache(cfg, progress=False)
    result = train(cfg)
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 101))
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s"} <= set(records[0])
    assert (tmp_path / "run" / "config.resolved.yaml").exists()


def test_resume_is_bit_exact(dataset, tmp_path):
    extra = ("train.grad_accum=2", "train.ema_decay=0.9")
    full = train(config(dataset, tmp_path / "full", "train.steps=6", *extra))
    half = train(config(dataset, tmp_path / "split", "train.steps=3", *extra))
    assert half.step == 3
    rest = train(config(dataset, tmp_path / "split", "train.steps=6", "checkpoint.resume=latest", *extra))
    assert half.losses + rest.losses == full.losses  # exact float equality
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(ckpt.latest_checkpoint(tmp_path / "full") / name)
        b = load_file(ckpt.latest_checkpoint(tmp_path / "split") / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # metrics.jsonl of the resumed run describes one history with no repeated steps
    assert [r["step"] for r in read_metrics(tmp_path / "split")] == list(range(1, 7))


def test_half_written_checkpoint_is_ignored(dataset, tmp_path):
    run = tmp_path / "run"
    first = Trainer(config(dataset, run, "train.steps=3"))
    first.substituted_samples = 7  # as if 7 samples had failed to decode: the count is checkpoint state
    first.fit()
    good = ckpt.latest_checkpoint(run)
    # a save killed midway: a temp folder with a partial file, and a step folder with no meta.json
    partial = run / "checkpoints" / ".tmp-step-00000006-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    (run / "checkpoints" / "step-00000009").mkdir()
    assert ckpt.latest_checkpoint(run) == good
    trainer = Trainer(config(dataset, run, "train.steps=4", "checkpoint.resume=latest"))
    result = trainer.fit()
    assert result.step == 4 and len(result.losses) == 1
    assert not partial.exists()
    assert trainer.substituted_samples == 7  # resumed, not restarted at 0


def test_keep_last_prunes(dataset, tmp_path):
    run = tmp_path / "run"
    train(config(dataset, run, "train.steps=7", "checkpoint.every=2", "checkpoint.keep_last=2"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000006", "step-00000007"]


def test_nonfinite_batch_is_skipped_and_counted(dataset, tmp_path):
    run_cache_cfg = config(dataset, tmp_path / "run", "train.steps=4")
    run_cache(run_cache_cfg, progress=False)
    trainer = Trainer(run_cache_cfg)
    assert trainer.cached
    original = trainer.dataset.__class__.__getitem__
    poisoned = set(next(iter(trainer.sampler.__class__(len(trainer.dataset), 4, seed=0))))  # step 1's batch

    def getitem(self, i):
        item = original(self, i)
        if i in poisoned:
            item = dict(item, latent=torch.full_like(item["latent"], float("nan")))
        return item

    trainer.dataset.__class__.__getitem__ = getitem
    try:
        result = trainer.fit()
    finally:
        trainer.dataset.__class__.__getitem__ = original
    assert result.skipped_steps == 1
    records = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [1, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_cache_and_on_the_fly_train_identically(dataset, tmp_path):
    """With the pixel codec, cached latents equal on-the-fly ones, so the losses must match exactly."""
    cache_dir = tmp_path / "cache"
    fly = Trainer(config(dataset, tmp_path / "fly", "train.steps=3", f"data.cache_dir={cache_dir}"))
    assert not fly.cached
    fly_losses = fly.fit().losses
    run_cache(config(dataset, tmp_path / "x", f"data.cache_dir={cache_dir}"), progress=False)
    cached = Trainer(config(dataset, tmp_path / "cached", "train.steps=3", f"data.cache_dir={cache_dir}"))
    assert cached.cached
    assert cached.fit().losses == pytest.approx(fly_losses, rel=1e-5)


@pytest.mark.slow
def test_sigterm_writes_resumable_checkpoint(dataset, tmp_path):
    run = tmp_path / "run"

    def overrides(run_dir: Path, steps: int) -> list[str]:
        return [
            *TINY,
            f"data.manifest={dataset}",
            f"run_dir={run_dir}",
            f"train.steps={steps}",
            "checkpoint.every=1000",
        ]

    args = overrides(run, 400)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("")
    proc = subprocess.Popen(
        [sys.executable, "-m", "frameloom", "train", str(cfg_file), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    saved = ckpt.latest_checkpoint(run)
    assert saved is not None
    stopped_at = json.loads((saved / "meta.json").read_text())["step"]
    assert 3 <= stopped_at < 400
    # resuming continues from there and matches a run that was never interrupted
    resumed = train(load_config(None, [*overrides(run, stopped_at + 2), "checkpoint.resume=latest"]))
    assert resumed.step == stopped_at + 2 and len(resumed.losses) == 2
    reference = train(load_config(None, overrides(tmp_path / "ref", stopped_at + 2)))
    assert reference.losses[-2:] == resumed.losses


def test_validation_samples_are_written(dataset, tmp_path):
    run = tmp_path / "run"
    train(
        config(
            dataset,
            run,
            "train.steps=4",
            "validation.every=2",
            "validation.prompts=[a red square moving left]",
        )
    )
    for step in (2, 4):
        files = list((run / "samples" / f"step-{step:08d}").glob("*.mp4"))
        assert len(files) == 1 and files[0].stat().st_size > 0


def test_text_statistics_come_from_the_training_captions(dataset, tmp_path):
    """A pooled-text DiT standardizes with the mean/std of the manifest captions' pooled embeddings."""
    from frameloom.data.manifest import read_manifest
    from frameloom.models.text import pool_text

    cfg = config(
        dataset,
        tmp_path / "run",
        "model.config={patch_size: [1, 4, 4], hidden_size: 32, depth: 2, num_heads: 2, pooled_text: true}",
        "data.use_cache=never",  # keep the text encoder loaded (a cached run releases it)
    )
    trainer = Trainer(cfg)
    texts = read_manifest(dataset).column("text").to_pylist()  # 24 rows: all of them are used
    emb, mask = trainer.text_encoder.encode(texts)
    pooled = pool_text(emb.float(), mask)
    assert torch.allclose(trainer.module.text_mean, pooled.mean(0), atol=1e-5)
    assert torch.allclose(trainer.module.text_std, pooled.std(0), atol=1e-5)


def test_loader_workers_do_not_change_the_run(dataset, tmp_path):
    """Batches, augmentation draws and noise are keyed by step and index, not by which process loads them: a run
    with two loader workers trains to the same losses and weights as one that loads in-process (a preset may
    pick either for CPU reasons, docs/dit_class.md)."""
    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"w{workers}"
        cfg = config(dataset, run, "train.steps=4", f"data.num_workers={workers}", "data.hflip=true")
        run_cache(cfg, progress=False)
        runs[workers] = (train(cfg).losses, final_weights(run))
    assert runs[0][0] == runs[2][0]
    for k, v in runs[0][1].items():
        assert torch.equal(v, runs[2][1][k]), k
