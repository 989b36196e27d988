"""The non-finite guard under 2 gloo ranks with 2 loader workers each: a NaN injected into one rank's batch at
step k is skipped by every rank at step k with its optimizer state, weights and EMA untouched (hashes equal
before and after the step); K consecutive NaN steps stop the run cleanly on every rank, leaving an intact
last checkpoint (train/trainer.py, `train.max_consecutive_skips`). Prints its figures."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch

from frameloom.checkpoint import io as ckpt
from frameloom.checkpoint.integrity import verify_checkpoint
from frameloom.data import synthetic
from frameloom.pipeline import run_cache
from reliability import Tree, read_jsonl, wait_gone
from test_parallel import config as parallel_config
from tiny import TINY

pytestmark = pytest.mark.slow


def state_hash(trainer) -> str:
    """SHA-256 of every parameter, every optimizer state tensor and every EMA shadow of this rank."""
    h = hashlib.sha256()
    tensors = [p.detach() for p in trainer.module.parameters()]
    for state in trainer.optimizer.state.values():
        tensors += [v for _, v in sorted(state.items()) if torch.is_tensor(v)]
    if trainer.ema is not None:
        tensors += [v for _, v in sorted(trainer.ema.state_dict().items())]
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_with_nan(rank: int, overrides: list[str], records: Path, nan_steps: list[int]) -> None:
    """Rank 1's batches of `nan_steps` are made NaN; every optimizer step is recorded with the state hash
    before and after it and its skip flag."""
    from frameloom.config import load_config
    from frameloom.train.interval import NonFiniteStop
    from frameloom.train.trainer import Trainer

    log = open(records / f"rank{rank}.jsonl", "a", buffering=1)
    trainer = Trainer(load_config(None, overrides))
    micro_step, optimizer_step = trainer._micro_step, trainer._optimizer_step

    def poisoned(batch, micro, *args, **kw):
        if rank == 1 and trainer.step + 1 in nan_steps:
            batch = dict(batch, latent=torch.full_like(batch["latent"], float("nan")))
        return micro_step(batch, micro, *args, **kw)

    def recorded():
        before = state_hash(trainer)
        norm, skipped = optimizer_step()
        log.write(json.dumps({"step": trainer.step + 1, "before": before, "after": state_hash(trainer),
                              "skipped": float(skipped)}) + "\n")  # fmt: skip
        return norm, skipped

    trainer._micro_step, trainer._optimizer_step = poisoned, recorded
    try:
        trainer.fit()
        log.write(json.dumps({"done": trainer.step}) + "\n")
    except NonFiniteStop as exc:
        log.write(json.dumps({"stopped": str(exc), "step": trainer.step}) + "\n")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nan")
    synthetic.write_synthetic_set(root / "data", num_clips=24, seed=0, height=8, width=8, num_frames=4)
    manifest = root / "data" / "manifest.parquet"
    run_cache(parallel_config(manifest, root / "runs" / "cache"), progress=False)
    return manifest


def launch(manifest: Path, run: Path, nan_steps: list[int], *extra: str) -> tuple[dict, float]:
    (run / "rec").mkdir(parents=True)
    overrides = [*TINY, f"data.manifest={manifest}", f"run_dir={run}", "data.num_workers=2", "train.log_every=1",
                 "train.ema_decay=0.9", "checkpoint.every=2", *extra]  # fmt: skip
    start = time.monotonic()
    tree = Tree(train_with_nan, (overrides, run / "rec", nan_steps))
    assert tree.wait(300) == 0
    seconds = time.monotonic() - start
    _, left = wait_gone(tree.sid, 10)
    assert left == []
    return {r: read_jsonl(run / "rec" / f"rank{r}.jsonl") for r in (0, 1)}, seconds


def test_nan_on_one_rank_is_skipped_on_every_rank_with_the_state_untouched(manifest, tmp_path):
    k = 3
    records, _ = launch(manifest, tmp_path / "one", [k], "train.steps=6")
    for rank in (0, 1):
        steps = {r["step"]: r for r in records[rank] if "before" in r}
        assert sorted(steps) == list(range(1, 7)) and records[rank][-1] == {"done": 6}
        assert [s for s, r in steps.items() if r["skipped"]] == [k]  # rank 0 skips rank 1's NaN step too
        assert steps[k]["before"] == steps[k]["after"]  # weights, AdamW moments and step counts, EMA
        assert all(r["before"] != r["after"] for s, r in steps.items() if s != k)
    assert [r["after"] for r in records[0] if "after" in r] == [
        r["after"] for r in records[1] if "after" in r
    ]
    print(f"\nNaN in rank 1's batch at step {k}: skipped at step {k} on ranks 0 and 1; state hash unchanged "
          "by the skipped step on both; both ranks equal after every step")  # fmt: skip


def test_consecutive_nans_stop_the_run_cleanly(manifest, tmp_path):
    run = tmp_path / "many"
    records, seconds = launch(manifest, run, [3, 4, 5], "train.steps=12", "train.max_consecutive_skips=3")
    for rank in (0, 1):
        last = records[rank][-1]
        assert last.get("step") == 5 and "3 consecutive steps (from step 3 to 5)" in last["stopped"]
    saved = ckpt.list_checkpoints(run)
    assert [p.name for p in saved] == ["step-00000002", "step-00000004"]
    assert all(verify_checkpoint(p).ok for p in saved)
    good = ckpt.load_checkpoint(saved[-1])["model"]
    assert all(torch.isfinite(v).all() for v in good.values())
    print(f"\n3 consecutive NaN steps (max_consecutive_skips=3): both ranks stopped at step 5 in {seconds:.1f} s "
          f"with: {records[0][-1]['stopped'][:120]}...; last checkpoint {saved[-1].name} intact and finite")  # fmt: skip
