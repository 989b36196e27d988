"""Open-Sora 2.0's MMDiT under scale-out, 2 CPU processes (gloo) against one process (test_parallel's launcher):

- FSDP2 (ZeRO-3, ``fully_shard`` per double/single block then the root), batch 1 per rank, with the i2v
  conditioning mix and the (8, 100) selective checkpointing, == one process with batch 1 and grad_accum 2;
- Ulysses sequence parallel (``enable_sequence_parallel``: text and video tokens split, joint attention over
  all-to-alls) == the unsplit model: forward output and the gradients summed over the group, with masked text
  padding; and the trainer with ``parallel.sp_size=2`` == one process.
Tolerances as test_parallel.py's (float32 on CPU, sums in another order). Slow: one spawn, ~30 s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frameloom.checkpoint import io as ckpt
from frameloom.config import load_config
from frameloom.train.trainer import Trainer
from opensora2_tiny import overrides, write_csv
from test_parallel import launch

MIX = "model.config.condition_config={t2v: 1, i2v_head: 5, i2v_loop: 1, i2v_tail: 1}"
RUNS = {
    "fsdp": ("parallel.data_parallel=fsdp", "parallel.zero=3", "train.batch_size=1"),
    "sp": ("parallel.sp_size=2", "train.batch_size=2"),
}
REFS = {"fsdp": ("train.batch_size=1", "train.grad_accum=2"), "sp": ("train.batch_size=2",)}


def run_config(root: Path, name: str, *extra: str):
    return load_config(
        None,
        overrides(
            root, root / "data.csv", name, "train.steps=2", "model.config.cond_embed=true", MIX,
            "parallel.activation_checkpointing=selective", "parallel.opensora_grad_ckpt=[8, 100]",
            "objective.caption_dropout=0.316", "objective.extras_dropout=0.316", *extra,
        ),
    )  # fmt: skip


def _sp_model_check() -> dict:
    import torch.distributed as dist

    from frameloom.models.opensora2.model import MMDiTConfig, OpenSoraMMDiT
    from opensora2_tiny import redraw

    def build():
        c = MMDiTConfig(
            in_channels=16,
            vec_in_dim=8,
            context_in_dim=12,
            hidden_size=32,
            num_heads=2,
            depth=1,
            depth_single_blocks=2,
            axes_dim=[4, 6, 6],
            mlp_ratio=2.0,
            cond_embed=True,
            text_mask=True,
        )
        return redraw(OpenSoraMMDiT(c), seed=0, std=0.1)  # fmt: skip

    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 5, 2, 4, 4, generator=g)  # 8 tokens
    text, pooled, t = (
        torch.randn(2, 6, 12, generator=g),
        torch.randn(2, 8, generator=g),
        torch.rand(2, generator=g),
    )
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = {}
    for name in ("ref", "sp"):
        model = build()
        if name == "sp":
            model.enable_sequence_parallel(dist.new_group([0, 1]))
        y = model(x, t, text, mask, pooled=pooled, cond=cond)
        y.square().mean().backward()
        grads = {}
        for n, p in model.named_parameters():
            grad = p.grad.clone()
            if name == "sp":
                dist.all_reduce(grad)  # each rank holds its own tokens' share
            grads[n] = grad
        out[name] = {"out": y.detach(), "grads": grads}
    return out


def _worker(rank: int, root: str) -> None:
    root = Path(root)
    result = {
        name: {"losses": Trainer(run_config(root, name, *extra)).fit().losses} for name, extra in RUNS.items()
    }
    result["sp_model"] = _sp_model_check()
    torch.save(result, root / f"result-{rank}.pt")


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    root = tmp_path_factory.mktemp("os2_parallel")
    write_csv(root, num_clips=4, size=32, frames=5)
    Trainer(run_config(root, "warm", "train.steps=1"))  # the tiny VAE, T5 and CLIP, built before the spawn
    launch(_worker, str(root))
    return root, [torch.load(root / f"result-{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp2_and_sequence_parallel_training_match_one_process(two_procs, name):
    root, results = two_procs
    assert results[0][name]["losses"] == results[1][name]["losses"]
    losses = Trainer(run_config(root, f"ref-{name}", *REFS[name])).fit().losses
    torch.testing.assert_close(
        torch.tensor(results[0][name]["losses"]), torch.tensor(losses), rtol=1e-5, atol=0
    )
    got = ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "runs" / name))["model"]
    want = ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "runs" / f"ref-{name}"))["model"]
    assert got.keys() == want.keys()
    for key, value in want.items():  # Adam's first steps are ~lr * sign(g): see test_family_parallel.py
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.slow
def test_ulysses_joint_attention_matches_the_unsplit_model(two_procs):
    _, results = two_procs
    for r in range(2):
        check = results[r]["sp_model"]
        torch.testing.assert_close(check["sp"]["out"], check["ref"]["out"], rtol=1e-5, atol=1e-6)
        # every path carries gradient
        assert all(grad.abs().sum() > 0 for grad in check["ref"]["grads"].values())
        for name, grad in check["ref"]["grads"].items():
            torch.testing.assert_close(check["sp"]["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
