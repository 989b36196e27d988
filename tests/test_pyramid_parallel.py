"""Pyramid Flow with 2 gloo processes (CPU) against one process, in one spawn (test_parallel.py's `launch`):

- Ulysses sequence parallel inside both transformers (text and video split, the causal mask reordered for the
  all-to-all): outputs equal to one process within 1e-5, gradients summed over the ranks equal to one
  process's, and an earlier frame's output unchanged when a later frame changes;
- ``video_sync_group = 2`` training (objective pyramid_flow_ar, DDP): both ranks read the same video and train
  different AR positions, rotating each step; a run stopped at step 2 and resumed matches the uninterrupted run;
  FSDP2 (per block) trains the same weights as DDP; ``parallel.sp_size = 2`` through the trainer trains what one
  process trains.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.pipeline import run_cache
from test_parallel import launch

TEXT_LEN = 5  # odd: the text is padded to a multiple of sp

MINIFLUX = dict(in_channels=16, num_layers=2, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=[4, 6, 6])  # fmt: skip
SD3 = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
           caption_projection_dim=16, pooled_projection_dim=6, pos_embed_max_size=12, joint_attention_dim=12)  # fmt: skip


def _model(variant: str) -> torch.nn.Module:
    from frameloom.models.pyramid_flow.flux import PyramidFluxTransformer
    from frameloom.models.pyramid_flow.mmdit import PyramidMMDiT

    torch.manual_seed(0)
    model = PyramidFluxTransformer(**MINIFLUX) if variant == "miniflux" else PyramidMMDiT(**SD3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # zero-initialised output layers would make every comparison trivial
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _inputs(channels: int) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, 3, 4, 4, generator=g)  # 3 frames of 2x2 tokens
    history = [torch.randn(2, channels, 1, 2, 2, generator=g)]  # one coarse frame: 13 video tokens in all
    text = torch.randn(2, TEXT_LEN, 12, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    return x, torch.tensor([800.0, 200.0]), text, mask, torch.randn(2, 6, generator=g), history


def _run_model(model, later_changed: bool = False):
    x, t, text, mask, pooled, history = _inputs(model.latent_channels)
    if later_changed:
        x = x.clone()
        x[:, :, 2] += 1.0
    return model(x, t, text, mask, pooled, history=history)


@functools.cache
def reference() -> dict:
    out = {}
    for variant in ("miniflux", "sd3"):
        model = _model(variant)
        y = _run_model(model)
        y.square().mean().backward()
        out[variant] = (y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def _sp_check(rank: int) -> dict:
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    out = {}
    for variant in ("miniflux", "sd3"):
        model = _model(variant)
        model.enable_sequence_parallel(group)
        y = _run_model(model)
        y.square().mean().backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)  # each rank holds its own tokens' share of the gradient
            grads[n] = g
        with torch.no_grad():
            changed = _run_model(model, later_changed=True)
        out[variant] = (y.detach(), grads, changed)
    return out


# ---------------------------------------------------------------- video_sync_group training


def run_config(root: Path, run: str, *extra: str):
    return load_config(
        None,
        [
            f"data.manifest={root / 'data' / 'manifest.parquet'}",
            f"run_dir={root / 'runs' / run}",
            "data.num_frames=25",
            "data.height=64",
            "data.width=64",
            "model.family=pyramid_flow",
            "model.codec=tiny-pyramid",
            "model.text_encoder=tiny-pyramid",
            "model.text_max_length=16",
            "model.config={num_layers: 1, num_single_layers: 1, attention_head_dim: 8, num_attention_heads: 2, "
            "pooled_projection_dim: 32, axes_dims_rope: [2, 2, 4]}",
            "objective.name=pyramid_flow_ar",
            "train.batch_size=4",
            "train.progress=false",
            "train.ema_decay=0",
            "logging.tensorboard=false",
            "optim.lr=1e-3",
            "checkpoint.every=2",
            "checkpoint.keep_last=0",
            *extra,
        ],
    )


def _vsg_train(rank: int, root: Path) -> dict:
    from frameloom.checkpoint import io as ckpt
    from frameloom.train.trainer import Trainer

    seen = {}
    runs = [("straight", 4, None, "ddp"), ("stopped", 2, None, "ddp"), ("stopped", 4, "latest", "ddp")]
    runs.append(("fsdp", 2, None, "fsdp"))
    runs.append(("sp", 2, None, "ddp"))  # Ulysses through the trainer: both ranks one sequence-parallel group
    for run, steps, resume, dp in runs:
        extra = ["parallel.video_sync_group=2", f"train.steps={steps}", f"parallel.data_parallel={dp}"]
        if run == "sp":
            extra = [f"train.steps={steps}", "parallel.sp_size=2"]
        if resume:
            extra.append(f"checkpoint.resume={resume}")
        trainer = Trainer(run_config(root, run, *extra))
        draws = seen.setdefault(run, [])
        inner = trainer.objective.draw

        def draw(x0, generator, ctx=None, inner=inner, draws=draws):
            inputs = inner(x0, generator, ctx)
            draws.append(
                {
                    "step": ctx.step,
                    "sync_rank": ctx.sync_rank,
                    "units": inputs.extras["units"],
                    "x0": float(x0.sum()),
                }
            )
            return inputs

        trainer.objective.draw = draw
        trainer.fit()
    final = {
        run: ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "runs" / run))["model"]
        for run in ("straight", "stopped", "fsdp", "sp")
    }
    final["straight@2"] = ckpt.load_checkpoint(
        root / "runs" / "straight" / "checkpoints" / ckpt.step_name(2)
    )["model"]
    return {"draws": seen, "final": final}


def _worker(rank: int, root: str) -> None:
    from frameloom.parallel import init_distributed

    init_distributed("cpu")
    root = Path(root)
    result = {"sp": _sp_check(rank), "vsg": _vsg_train(rank, root)}
    torch.save(result, root / f"result-{rank}.pt")


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("pyramid_parallel")
    synthetic.write_synthetic_set(
        root / "data", num_clips=8, seed=0, height=64, width=64, num_frames=25, progress=False
    )
    run_cache(run_config(root, "cache"), progress=False)  # latents + text (and the tiny encoders) built once
    launch(_worker, str(root))
    return root, [torch.load(root / f"result-{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["miniflux", "sd3"])
def test_sequence_parallel_equals_one_process(two_procs, variant):
    ref_out, ref_grads = reference()[variant]
    for rank in (0, 1):
        out, grads, changed = two_procs[1][rank]["sp"][variant]
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=name)
        # causality survives the all-to-all: frames 0 and 1 are unchanged when frame 2 changes
        torch.testing.assert_close(changed[:, :, :2], out[:, :, :2], rtol=1e-6, atol=1e-6)
        assert (changed[:, :, 2] - out[:, :, 2]).abs().max() > 1e-3


@pytest.mark.slow
def test_video_sync_group_trains_different_positions_of_one_video_and_resumes_exactly(two_procs):
    results = two_procs[1]
    straight = [r["vsg"]["draws"]["straight"] for r in results]
    for a, b in zip(*straight):  # the same video (batch) on both ranks, different AR positions
        assert a["step"] == b["step"] and a["x0"] == b["x0"]
        assert (a["sync_rank"], b["sync_rank"]) == (0, 1)
    # 4 latent units, group 2: 2 turns; rank 0 trains positions 1, 3, 1, 3; rank 1 positions 2, 4, 2, 4
    assert [d["units"][2] for d in straight[0]] == [1, 3, 1, 3]
    assert [d["units"][2] for d in straight[1]] == [2, 4, 2, 4]
    assert [d["units"][0] for d in straight[1]] == [3, 1, 3, 1]  # low/mid stages: 1 + 4 - high
    # stopped at 2 and resumed: the same draws, the same final weights (bit-exact on CPU)
    stopped = [r["vsg"]["draws"]["stopped"] for r in results]
    for rank in (0, 1):
        assert json.dumps(stopped[rank]) == json.dumps(straight[rank])
    for name, w in results[0]["vsg"]["final"]["straight"].items():
        assert torch.equal(w, results[0]["vsg"]["final"]["stopped"][name]), name


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains(two_procs):
    final = two_procs[1][0]["vsg"]["final"]
    for name, w in final["straight@2"].items():
        torch.testing.assert_close(final["fsdp"][name], w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_video_sync_group_run_resumes_under_another_world_size(two_procs):
    """The 2-process (group 2) run, stopped at step 4, continues in one process (group 1): the AR schedule is a
    function of step and rank and the data sampler is elastic, so nothing from the old layout is needed."""
    from frameloom.train.trainer import Trainer

    root = two_procs[0]
    trainer = Trainer(run_config(root, "stopped", "train.steps=5", "checkpoint.resume=latest"))
    result = trainer.fit()
    assert result.step == 5 and len(result.losses) == 1
    assert trainer.batches_consumed == 5  # 4 batches read by the shared group, then this process's one


@pytest.mark.slow
def test_sequence_parallel_training_through_the_trainer_equals_one_process(two_procs):
    """parallel.sp_size=2 goes through frameloom.parallel.parallelize (the model's enable_sequence_parallel):
    2 steps of the AR objective equal one process's 2 steps."""
    from frameloom.checkpoint import io as ckpt
    from frameloom.train.trainer import Trainer

    root = two_procs[0]
    Trainer(run_config(root, "sp_reference", "train.steps=2")).fit()
    reference = ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "runs" / "sp_reference"))["model"]
    for name, w in reference.items():
        torch.testing.assert_close(
            two_procs[1][0]["vsg"]["final"]["sp"][name], w, rtol=1e-5, atol=1e-6, msg=name
        )
