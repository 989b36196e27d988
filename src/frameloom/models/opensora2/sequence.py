"""Ulysses sequence parallelism for Open-Sora 2.0's joint attention (Jacobs et al., "DeepSpeed Ulysses", 2023).

Each rank of an sp group keeps 1/sp of the text tokens and 1/sp of the video tokens through every block
(``OpenSoraMMDiT.forward`` shards both streams after the input projections and gathers the video tokens
after the final layer). Everything but attention is per token. In attention the text part and the video
part of q, k, v ``(B, heads, S/sp, hd)`` each go through an all-to-all that scatters heads and gathers the
sequence, giving ``[full text; full video]`` for ``heads/sp`` heads, in the order of the one-device model;
RoPE (full table) and the key mask (full, every rank holds the whole text mask) apply unchanged; a second
all-to-all per part returns ``(B, heads, S/sp, hd)``. Gradients follow the native DiT's rule
(``frameloom.parallel.sequence``): each rank's parameter gradients come from its own tokens and the trainer
sums them over the group (``loss_scale = sp``). Text length and video tokens must divide by sp (the trainer
pads the text with masked tokens; set ``text_mask: true`` when that padding must not be attended).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from frameloom.parallel.sequence import all_to_all

from .model import attend

__all__ = ["ulysses_joint_attention"]


def ulysses_joint_attention(group: dist.ProcessGroup):
    """A block attention kernel ``(q, k, v, cos, sin, key_mask, text_len, layout) -> (B, S/sp, heads*hd)``
    over sequence shards whose first ``text_len`` tokens are this rank's text."""

    def attention(q, k, v, cos, sin, key_mask, text_len: int, layout: str) -> torch.Tensor:
        sp = dist.get_world_size(group)

        def gather(x: torch.Tensor) -> torch.Tensor:  # (B, h, S/sp, hd) -> (B, h/sp, S, hd)
            parts = (x[:, :, :text_len], x[:, :, text_len:])
            return torch.cat(
                [all_to_all(p.contiguous(), group, scatter_dim=1, gather_dim=2) for p in parts if p.shape[2]],
                dim=2,
            )

        out = attend(gather(q), gather(k), gather(v), cos, sin, key_mask, layout)  # (B, h/sp, S, hd)
        full_text = text_len * sp
        parts = (out[:, :, :full_text], out[:, :, full_text:])
        out = torch.cat(
            [all_to_all(p.contiguous(), group, scatter_dim=2, gather_dim=1) for p in parts if p.shape[2]],
            dim=2,
        )  # (B, h, S/sp, hd)
        return out.transpose(1, 2).flatten(2)

    attention.sequence_parallel_group = group
    return attention
