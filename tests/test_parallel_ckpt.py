"""Distributed checkpoints: sharded (torch.distributed.checkpoint, async), elastic resume 2 -> 1 and 1 -> 2,
consolidated reads for `sample` and `export`.

The global batch stays 8 throughout: 1 process x batch 4 x grad_accum 2, or 2 processes x batch 4. The sampler
hands out micro-batches in one order whatever the number of processes, and the trainer keys each micro-batch's
noise by its slot in the global batch, so every layout trains on the same samples with the same draws:
- R: one process, 6 steps (the reference);
- B: two processes (DDP, sharded async checkpoints every step) for 3 steps, then one process to step 6;
- A: one process (full checkpoint) for 3 steps, then two processes (FSDP2 ZeRO-3) to step 6.
Both must see R's sample stream exactly and match R's losses and weights to 1e-6 relative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frameloom.checkpoint import io as ckpt
from frameloom.train.trainer import Trainer
from test_parallel import RTOL, assert_close_dicts, config, launch, make_dataset, weights

STEPS, HALF = 6, 3
ONE = ["train.batch_size=4", "train.grad_accum=2"]
TWO = ["train.batch_size=4", "train.grad_accum=1"]


def recorded(trainer: Trainer) -> list[tuple[int, int, list[int]]]:
    """Wrap `_micro_step` to record (step, slot in the global batch, sample indices) of every micro-batch."""
    seen: list[tuple[int, int, list[int]]] = []
    original = trainer._micro_step

    def micro_step(batch, micro):
        slot = micro * trainer.data_world + trainer.data_rank
        seen.append((trainer.step + 1, slot, batch["index"].tolist()))
        return original(batch, micro)

    trainer._micro_step = micro_step
    return seen


def run(root: Path, name: str, *extra: str) -> dict:
    trainer = Trainer(config(root / "data" / "manifest.parquet", root / "runs" / name, *extra))
    seen = recorded(trainer)
    result = trainer.fit()
    return {"losses": result.losses, "seen": seen, "kind": trainer.par.kind}


def stream(*records: list) -> dict[int, list[int]]:
    """step -> the step's global batch: its micro-batches' indices in slot order."""
    by_step: dict[int, dict[int, list[int]]] = {}
    for rec in records:
        for step, slot, idx in rec:
            by_step.setdefault(step, {})[slot] = idx
    return {s: sum((slots[k] for k in sorted(slots)), []) for s, slots in sorted(by_step.items())}


def _worker(rank: int, root: str) -> None:
    root = Path(root)
    out = {
        "B": run(root, "two-then-one", f"train.steps={HALF}", *TWO, "checkpoint.every=1",
                 "checkpoint.keep_last=2", "parallel.async_checkpoint=true"),
        "A2": run(root, "one-then-two", f"train.steps={STEPS}", *TWO, "checkpoint.resume=latest",
                  "parallel.data_parallel=fsdp", "parallel.zero=3"),
    }  # fmt: skip
    torch.save(out, root / f"ckpt-{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    make_dataset(root)
    common = ("checkpoint.every=3",)
    ref = run(root, "reference", f"train.steps={STEPS}", *ONE, *common)
    a1 = run(root, "one-then-two", f"train.steps={HALF}", *ONE, *common)
    launch(_worker, str(root))
    two = [torch.load(root / f"ckpt-{r}.pt", weights_only=False) for r in range(2)]
    b2 = run(root, "two-then-one", f"train.steps={STEPS}", *ONE, "checkpoint.resume=latest", *common)
    return root, {"R": ref, "A1": a1, "B2": b2, "B": [t["B"] for t in two], "A2": [t["A2"] for t in two]}


def test_two_to_one_continues_the_sample_stream(runs):
    root, r = runs
    reference = stream(r["R"]["seen"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert all(len(v) == 8 for v in reference.values())  # one global batch of 8 per step
    assert stream(*(b["seen"] for b in r["B"]), r["B2"]["seen"]) == reference
    torch.testing.assert_close(
        torch.tensor(r["B"][0]["losses"] + r["B2"]["losses"]),
        torch.tensor(r["R"]["losses"]),
        rtol=RTOL,
        atol=0,
    )
    run_dir = root / "runs" / "two-then-one"
    # the 2-process part wrote sharded checkpoints asynchronously; keep_last=2 pruned step 1
    # (the 1-process part then wrote a full one at step 6; checkpoint.every=3 there)
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == [
        "step-00000002",
        "step-00000003",
        "step-00000006",
    ]
    assert ckpt.read_meta(run_dir / "checkpoints" / "step-00000003")["format"] == "sharded"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    model, ema = weights(run_dir)
    ref_model, ref_ema = weights(root / "runs" / "reference")
    assert_close_dicts(model, ref_model, RTOL)
    assert_close_dicts(ema, ref_ema, RTOL)


def test_one_to_two_continues_the_sample_stream(runs):
    root, r = runs
    assert r["A2"][0]["kind"] == "fsdp"
    assert stream(r["A1"]["seen"], *(a["seen"] for a in r["A2"])) == stream(r["R"]["seen"])
    torch.testing.assert_close(
        torch.tensor(r["A1"]["losses"] + r["A2"][0]["losses"]),
        torch.tensor(r["R"]["losses"]),
        rtol=RTOL,
        atol=0,
    )
    run_dir = root / "runs" / "one-then-two"
    assert ckpt.read_meta(ckpt.latest_checkpoint(run_dir))["format"] == "sharded"  # FSDP shards, read whole
    model, ema = weights(run_dir)
    ref_model, ref_ema = weights(root / "runs" / "reference")
    assert_close_dicts(model, ref_model, RTOL)
    assert_close_dicts(ema, ref_ema, RTOL)


def test_sharded_checkpoint_reads_whole_for_sample_and_export(runs):
    """load_checkpoint, `frameloom export --format safetensors` and `frameloom sample` on a sharded folder."""
    from frameloom.export import export_run
    from frameloom.sampling.generate import sample_command

    root, _ = runs
    run_dir = root / "runs" / "two-then-one"
    sharded = run_dir / "checkpoints" / "step-00000003"
    loaded = ckpt.load_checkpoint(sharded)
    reference = ckpt.load_checkpoint(root / "runs" / "reference" / "checkpoints" / "step-00000003")  # full
    assert loaded["step"] == 3 and loaded["state"]["step"] == 3
    assert_close_dicts(loaded["model"], reference["model"], RTOL)
    assert_close_dicts(loaded["ema"], reference["ema"], RTOL)
    (path,) = export_run(run_dir, fmt="safetensors", out=root / "export", checkpoint=str(sharded))
    exported = load_file(path)
    expected = {**loaded["model"], **loaded["ema"]}  # sample.use_ema: the EMA weights
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    (video,) = sample_command(
        str(run_dir), prompts=["a red square"], out=str(root / "s"), checkpoint=str(sharded)
    )
    assert video.stat().st_size > 0


def test_sharded_checkpoint_resume_is_bit_exact_in_one_process(tmp_path):
    """checkpoint.format=sharded in one process (DCP without a process group) resumes bit for bit."""
    make_dataset(tmp_path)
    manifest = tmp_path / "data" / "manifest.parquet"
    extra = ("checkpoint.format=sharded", "checkpoint.every=2")
    full = Trainer(config(manifest, tmp_path / "runs" / "full", "train.steps=4", *extra)).fit()
    Trainer(config(manifest, tmp_path / "runs" / "split", "train.steps=2", *extra)).fit()
    rest = Trainer(
        config(manifest, tmp_path / "runs" / "split", "train.steps=4", "checkpoint.resume=latest", *extra)
    ).fit()
    assert rest.losses == full.losses[2:]
    a, a_ema = weights(tmp_path / "runs" / "full")
    b, b_ema = weights(tmp_path / "runs" / "split")
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(a_ema[k], b_ema[k]) for k in a_ema)
