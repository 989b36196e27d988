"""Sequence parallelism for the diffusers families: diffusers' own context parallelism, wired by `parallelize`.

`parallelize` with `parallel.sp_size > 1` hands a family adapter's transformer to diffusers'
`enable_parallelism(ContextParallelConfig(ulysses_degree=sp))` when its class declares a `_cp_plan` (Wan in
diffusers 0.42.1) and refuses CogVideoX (no plan) and LTX-Video (its plan fails on the text mask,
`CP_BROKEN`); the native DiT keeps frameloom's Ulysses.

The 2-process test (gloo, CPU, test_parallel.py's `launch`) runs the tiny Wan T2V transformer through
`WanDenoiser` with sp_size=2 (each rank holds 16 of the 32 video tokens through the blocks; self-attention
all-to-all in diffusers' "native" backend) under DDP, and compares with the same model in one process:
forward output atol 1e-6 (measured: bit-identical, 0.0), every parameter gradient rtol 1e-5, atol 1e-6 (the loss
is scaled by `loss_scale` = sp and DDP averages over the 2 ranks: the sum of the ranks' token shares;
measured max relative difference ~6e-7). Time: ~10-15 s (spawn of 2 processes importing diffusers).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from families import tiny_wan_transformer
from frameloom.config.schema import ParallelConfig
from frameloom.errors import FrameloomError
from frameloom.models.diffusers_family import DiffusersDenoiser
from frameloom.parallel.parallelize import parallelize, sequence_parallel_kind
from test_parallel import launch


def tiny_wan():
    torch.manual_seed(0)  # same weights on every rank and in the reference
    return tiny_wan_transformer()


def test_sequence_parallel_kind_per_family(tmp_path: Path) -> None:
    from diffusers import CogVideoXTransformer3DModel, LTXVideoTransformer3DModel

    assert sequence_parallel_kind(torch.nn.Linear(2, 2)) == "native"  # not a family adapter
    assert sequence_parallel_kind(DiffusersDenoiser(tiny_wan(), tmp_path)) == "diffusers"
    ltx = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=32,
    )
    # LTX-Video declares a plan, but diffusers 0.42.1's CP attention fails on its text mask: refused up front.
    assert LTXVideoTransformer3DModel._cp_plan is not None
    with pytest.raises(
        FrameloomError, match="not available .*LTXVideoTransformer3DModel: diffusers' Ulysses"
    ):
        sequence_parallel_kind(DiffusersDenoiser(ltx, tmp_path))
    cog = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
    )
    with pytest.raises(
        FrameloomError, match="sequence parallelism is not available .*CogVideoXTransformer3DModel"
    ):
        sequence_parallel_kind(DiffusersDenoiser(cog, tmp_path))


def _wan_cp_worker(rank: int, tmp: str) -> None:
    from frameloom.models.wan.adapter import WanDenoiser
    from frameloom.parallel import init_distributed

    env = init_distributed("cpu")
    model = WanDenoiser(tiny_wan(), tmp, text_len=16)
    reference = copy.deepcopy(model)
    par = parallelize(model, ParallelConfig(sp_size=2), env)
    assert par.plan.sp == 2 and model.transformer._parallel_config is not None
    # 2. the same inputs everywhere: latents (1, 4, 2, 8, 8) -> 2 x 4 x 4 = 32 video tokens, 16 per rank
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    t = torch.tensor([0.4])
    text = torch.randn(1, 10, 32, generator=g)
    mask = torch.ones(1, 10, dtype=torch.bool)
    weight = torch.randn(1, 4, 2, 8, 8, generator=g)
    seen = []
    model.transformer.blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    out = par.forward(x, t, text, mask)
    assert seen == [16]  # the sequence really is split inside the blocks
    (out * weight).sum().mul(par.loss_scale).backward()  # DDP: mean over 2 ranks of sp x share = the sum
    ref = reference(x, t, text, mask)
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_wan_context_parallel_matches_one_process(tmp_path: Path) -> None:
    launch(_wan_cp_worker, str(tmp_path))
