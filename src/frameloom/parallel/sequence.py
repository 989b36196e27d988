"""Ulysses sequence parallelism for the native DiT (Jacobs et al., "DeepSpeed Ulysses", 2023).

The `sp` ranks of a group receive the same batch. Each keeps `1/sp` of the video tokens through the
transformer blocks:

1. after the patch embedding the sequence `(B, N, D)` is split: rank `p` keeps tokens `[p N/sp, (p+1) N/sp)`;
   the RoPE table and a per-token conditioning `c` are split the same way, per block;
2. inside self-attention, q, k, v `(B, h, N/sp, hd)` go through an all-to-all that scatters heads and gathers
   the sequence, `(B, h/sp, N, hd)`: each rank attends the full sequence for its own heads (so a
   `(B, 1, N, N)` attention mask works unchanged); a second all-to-all brings the output back to
   `(B, h, N/sp, hd)`;
3. cross-attention needs no communication: a query token attends to the text tokens only, and every rank holds
   all of them (the text is not split), so each rank attends its sequence shard to the full text;
4. the MLP and adaLN are per token; after the final layer the shards are all-gathered to `(B, N, patch_dim)`.

Every rank then computes the same loss on the same full output. Each parameter's gradient on a rank is the
part contributed by its own tokens, so the gradient of the batch is the sum over the sp group; the
data-parallel reduction (a mean over every rank) is turned into that sum by scaling the loss by `sp` (see
`loss_scale`). Text tokens are padded to a multiple of `sp` with masked-out tokens (`pad_text`): harmless here,
and what the families whose joint attention splits text and video tokens together need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from frameloom.errors import FrameloomError

# ---------------------------------------------------------------- collectives with autograd


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into `sp` chunks along `scatter_dim`, send chunk j to rank j, concatenate what arrives along
    `gather_dim` in rank order."""
    sp = dist.get_world_size(group)
    send = torch.stack(x.chunk(sp, dim=scatter_dim))  # (sp, ...): chunk j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i] came from rank i
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the inverse all-to-all (scatter and gather dims swapped)."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _GatherSequence(torch.autograd.Function):
    """All-gather along `dim`; backward keeps this rank's slice of the gradient.

    What follows the gather (unpatchify, loss) is computed identically on every rank of the group, so the
    gradient of the gathered tensor is the same everywhere and no communication is needed going back.
    """

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        sp, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(sp, dim=ctx.dim)[rank].contiguous(), None, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    return _GatherSequence.apply(x, group, dim)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous slice along `dim` (autograd's slicing backward pads the gradient with zeros)."""
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % sp:
        raise FrameloomError(f"sequence of {x.shape[dim]} tokens cannot be split over sp_size={sp} ranks")
    return x.chunk(sp, dim=dim)[rank]


# ---------------------------------------------------------------- attention


def ulysses_attention(group: dist.ProcessGroup) -> Callable[..., torch.Tensor]:
    """An SDPA-compatible attention over sequence shards: q, k, v `(B, h, N/sp, hd)` -> `(B, h, N/sp, hd)`."""

    def attention(q, k, v, attn_mask=None, **kwargs):
        # heads scattered, sequence gathered: 3 x (B, h/sp, N, hd)
        q, k, v = (all_to_all(t, group, scatter_dim=1, gather_dim=2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kwargs)  # (B, h/sp, N, hd)
        return all_to_all(out, group, scatter_dim=2, gather_dim=1)  # (B, h, N/sp, hd)

    attention.sequence_parallel_group = group  # marks the kernel (and lets tests find the group)
    return attention


# ---------------------------------------------------------------- applying it to the native DiT


def _block_pre_hook(group: dist.ProcessGroup):
    """Before each block: split the hidden states (first block only), the RoPE table and a per-token `c`."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        h, c, txt, rope, *rest = args  # the _Block signature (x, c, text, rope, attn_mask, text_mask, keep)
        n = rope.shape[-2]  # the full token count (the table is built for the whole sequence)
        if h.shape[1] == n:  # first block: not split yet
            h = shard_sequence(h, group, dim=1)  # (B, N/sp, D)
        rope = shard_sequence(rope, group, dim=-2)  # (N/sp, hd/2) or (B, N/sp, hd/2)
        if c.shape[1] == n and n > 1:  # per-token conditioning (positional_conditioning)
            c = shard_sequence(c, group, dim=1)
        return (h, c, txt, rope, *rest), kwargs

    return hook


def _final_pre_hook(group: dist.ProcessGroup):
    def hook(module: nn.Module, args: tuple[Any, ...]):
        h, c = args
        if c.shape[1] > 1 and c.shape[1] != h.shape[1]:  # per-token conditioning still full-length
            c = shard_sequence(c, group, dim=1)
        return (h, c)

    return hook


def _final_post_hook(group: dist.ProcessGroup):
    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor):
        return gather_sequence(out, group, dim=1)  # (B, N/sp, patch_dim) -> (B, N, patch_dim)

    return hook


def apply_sequence_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Route the native DiT's self-attention through Ulysses and split its token sequence over `group`.

    In place; parameter names are unchanged. Only for models with `blocks` of `_Block` with an `attn`
    exposing `attention_fn`, and a `final_layer` (frameloom's `VideoDiT`); the families use diffusers' own
    context parallelism (`diffusers_context_parallel`).
    """
    blocks = getattr(model, "blocks", None)
    if (
        blocks is None
        or not hasattr(model, "final_layer")
        or not all(hasattr(getattr(b, "attn", None), "attention_fn") for b in blocks)
    ):
        raise FrameloomError(
            f"parallel.sp_size > 1: {type(model).__name__} has no sequence-parallel support in frameloom "
            "(the native DiT only; diffusers families use diffusers' context parallelism)"
        )
    attention = ulysses_attention(group)
    for block in blocks:
        block.attn.attention_fn = attention
        block.register_forward_pre_hook(_block_pre_hook(group), with_kwargs=True)
    model.final_layer.register_forward_pre_hook(_final_pre_hook(group))
    model.final_layer.register_forward_hook(_final_post_hook(group))
    return model


def pad_text(emb: torch.Tensor, mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad text `(B, L, D)` and its mask `(B, L)` with zero, masked-out tokens to `L % multiple == 0`."""
    extra = (-emb.shape[1]) % multiple
    if extra == 0:
        return emb, mask
    return F.pad(emb, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def diffusers_context_parallel(model: nn.Module, plan, device_type: str) -> nn.Module:
    """Ulysses for diffusers families, through diffusers' own context-parallel support (>= 0.36).

    Models that declare a `_cp_plan` (in diffusers 0.42.1: Wan, LTX-Video, LTX-2, Flux, QwenImage, ...; not
    CogVideoX or HunyuanVideo) accept `model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=sp,
    mesh=...))`, which splits inputs and gathers outputs at the module boundaries the plan names and runs
    self-attention through an all-to-all. diffusers wants a mesh with "ring" and "ulysses" axes; we give it
    `(dp, ring=1, ulysses=sp)` laid out like frameloom's mesh, so its sp groups are ours. The attention backend
    (the processors' own, else diffusers' active one: "native" by default) must support context parallelism;
    diffusers raises otherwise. `frameloom.parallel.parallelize` calls this for a `DiffusersDenoiser`.
    """
    try:
        from diffusers import ContextParallelConfig
    except ImportError:
        raise FrameloomError(
            "parallel.sp_size > 1 needs diffusers with ContextParallelConfig (>= 0.36)"
        ) from None
    if getattr(model, "_cp_plan", None) is None or not hasattr(model, "enable_parallelism"):
        raise FrameloomError(
            f"parallel.sp_size > 1: diffusers' {type(model).__name__} declares no context-parallel plan"
        )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        device_type, (plan.world_size // plan.sp, 1, plan.sp), mesh_dim_names=("dp", "ring", "ulysses")
    )
    config = ContextParallelConfig(ulysses_degree=plan.sp, mesh=mesh["ring", "ulysses"])
    with _accelerator_count_for_cpu(device_type):
        model.enable_parallelism(config=config)
    return model


@contextlib.contextmanager
def _accelerator_count_for_cpu(device_type: str):
    """diffusers 0.42.1's `enable_parallelism` picks its device as `rank % torch.accelerator.device_count()`,
    a ZeroDivisionError on a machine without an accelerator. For a CPU run there, report one device while it
    resolves (it then records `cpu:0`; nothing else reads the count)."""
    if device_type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        yield
