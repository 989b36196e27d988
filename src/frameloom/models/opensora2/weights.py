"""Open-Sora 2.0 weights: strict loading by released key name, stage changes that add or drop parameters,
and the Flux-dev -> Open-Sora 2.0 conversion.

Released files (hpcaitech/Open-Sora README, SEED_MODELS.md): ``Open_Sora_v2.safetensors`` (the MMDiT with
``cond_in``, unfused q/k/v, rotate-half RoPE), ``Open_Sora_v2_Video_DC_AE.safetensors`` (the MMDiT at patch 1
with 128 input channels), ``hunyuan_vae.safetensors`` and the DC-AE's own file. Their keys are the module
paths of ``OpenSoraMMDiT`` / ``VideoDCAE`` / diffusers' ``AutoencoderKLHunyuanVideo``.

Open-Sora loads non-strictly (``strict_load=False``), so its stage-1 t2v config silently drops the released
``cond_in``; here every key must land (``load_strict``) unless the config names it: ``drop_keys`` (key prefixes
of the checkpoint the model does not have, dropped with a log line) and ``new_keys`` (prefixes of the model
the checkpoint does not have, kept at their initial values with a log line).

Flux-dev (Black Forest Labs' ``flux1-dev.safetensors``; the documented start of stage 1) differs from the
released layout in three ways, all undone by ``flux_to_opensora``: fused projections (``img_attn.qkv`` =
[q; k; v] rows, ``single_blocks.i.linear1`` = [q; k; v; mlp] rows), interleaved RoPE pairs (q/k rows and
the q/k RMSNorm scales are permuted within each head, ``rope.interleaved_to_half``), and the guidance
embedder ``guidance_in`` (dropped: Open-Sora 2.0 is not guidance-distilled). ``opensora_to_flux`` is the
inverse (for the round-trip test and for tools that expect Flux's layout).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from frameloom.errors import FrameloomError

from .rope import half_to_interleaved, interleaved_to_half

__all__ = [
    "describe_keys",
    "flux_to_opensora",
    "is_flux_layout",
    "load_strict",
    "opensora_to_flux",
    "read_state_dict",
]

log = logging.getLogger("frameloom.opensora2")

_DOUBLE_QKV = re.compile(r"^(double_blocks\.\d+\.(?:img|txt)_attn)\.qkv\.(weight|bias)$")
_SINGLE_QKV = re.compile(r"^(single_blocks\.\d+)\.linear1\.(weight|bias)$")
_QK_ROWS = re.compile(
    r"^(?:double_blocks\.\d+\.(?:img|txt)_attn\.|single_blocks\.\d+\.)(q_proj|k_proj)\.(weight|bias)$"
)
_QK_SCALE = re.compile(r"\.norm\.(query_norm|key_norm)\.scale$")


def describe_keys(keys: Iterable[str], limit: int = 6) -> str:
    """``a, b, c ... and N more`` (sorted), for one-line errors."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p.rstrip(".") + ".") for p in prefixes)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (or a ``.pt``/``.pth`` state dict) -> ``{key: tensor}`` on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FrameloomError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state:  # MIT Han Lab DC-AE .pt files
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise FrameloomError(f"{path} holds no state dict")
    return dict(state)


def load_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    drop_keys: Iterable[str] = (),
    new_keys: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``module`` requiring every key on both sides with its shape, except that checkpoint
    keys under ``drop_keys`` are not loaded and module keys under ``new_keys`` may be absent (they keep their
    initial values); each exception is logged with the keys it concerns. Dropping and re-adding the same
    prefix replaces a layer whose shape changes (e.g. ``img_in`` for another autoencoder). A mismatch is one
    ``FrameloomError`` naming the keys."""
    drop_keys, new_keys = tuple(drop_keys), tuple(new_keys)
    expected = module.state_dict()
    dropped = [k for k in state if _matches(k, drop_keys)]
    state = {k: v for k, v in state.items() if not _matches(k, drop_keys)}
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    bad_missing = [k for k in missing if not _matches(k, new_keys)]
    if unexpected or bad_missing:
        parts = []
        if bad_missing:
            parts.append(f"missing {describe_keys(bad_missing)}")
        if unexpected:
            parts.append(f"unexpected {describe_keys(unexpected)}")
        raise FrameloomError(
            f"{source} does not fit the model: {'; '.join(parts)} (a stage change that adds or drops "
            "parameters lists them in model.config.new_keys / model.config.drop_keys)"
        )
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if v.shape != expected[k].shape
    ]
    if shapes:
        raise FrameloomError(f"{source} does not fit the model: shape of {describe_keys(shapes, 3)}")
    if dropped:
        log.warning("%s: dropped %d key(s) (model.config.drop_keys): %s", source, len(dropped),
                    describe_keys(dropped))  # fmt: skip
    if missing:
        log.warning("%s: %d new key(s) keep their initial values (model.config.new_keys): %s", source,
                    len(missing), describe_keys(missing))  # fmt: skip
    module.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------------------------------------
# Flux <-> Open-Sora 2.0


def is_flux_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict has Flux's fused projections (``img_attn.qkv`` / ``linear1``)."""
    return any(_DOUBLE_QKV.match(k) or _SINGLE_QKV.match(k) for k in state)


def _head_dim(state: Mapping[str, torch.Tensor]) -> int:
    for key, value in state.items():
        if key.endswith("query_norm.scale"):
            return int(value.shape[0])
    raise FrameloomError("cannot find a q-norm scale (query_norm.scale) to read the head dimension from")


def _permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Permute the rows of a q/k weight ``(heads * hd, in)`` or bias ``(heads * hd,)`` within each head."""
    hd = perm.numel()
    rows = x.reshape(-1, hd, *x.shape[1:])  # (heads, hd, ...)
    return rows[:, perm].reshape(x.shape)


def flux_to_opensora(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A Flux (BFL) state dict -> Open-Sora 2.0's layout; returns ``(converted, dropped keys)``.

    1. split ``qkv`` into ``q_proj, k_proj, v_proj`` and ``linear1`` into ``q_proj, k_proj, v_mlp``;
    2. permute q/k rows and q/k-norm scales per head from interleaved to rotate-half pairs;
    3. drop ``guidance_in.*``.
    """
    hd = _head_dim(state)
    perm = interleaved_to_half(hd)
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key.startswith("guidance_in."):
            dropped.append(key)
            continue
        if m := _DOUBLE_QKV.match(key):
            q, k, v = value.chunk(3, dim=0)
            out[f"{m[1]}.q_proj.{m[2]}"] = _permute_rows(q, perm)
            out[f"{m[1]}.k_proj.{m[2]}"] = _permute_rows(k, perm)
            out[f"{m[1]}.v_proj.{m[2]}"] = v.clone()
        elif m := _SINGLE_QKV.match(key):
            hidden = state[f"{m[1]}.linear2.weight"].shape[0]
            q, k, v_mlp = value.split([hidden, hidden, value.shape[0] - 2 * hidden], dim=0)
            out[f"{m[1]}.q_proj.{m[2]}"] = _permute_rows(q, perm)
            out[f"{m[1]}.k_proj.{m[2]}"] = _permute_rows(k, perm)
            out[f"{m[1]}.v_mlp.{m[2]}"] = v_mlp.clone()
        elif _QK_SCALE.search(key):
            out[key] = value[perm].clone()
        elif _QK_ROWS.match(key):  # already split (a Flux-layout checkpoint saved unfused): only permute
            out[key] = _permute_rows(value, perm)
        else:
            out[key] = value
    return out, dropped


def opensora_to_flux(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flux_to_opensora` (without ``guidance_in``): fuse projections, interleave RoPE
    pairs again."""
    hd = _head_dim(state)
    perm = half_to_interleaved(hd)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _QK_ROWS.match(key)
        if m is not None and m[1] == "k_proj":
            continue  # fused with its q_proj below
        if m is not None:  # q_proj: fuse q, k, v (double) or q, k, v_mlp (single)
            base, kind = key[: -len(f"q_proj.{m[2]}")], m[2]
            q = _permute_rows(value, perm)
            k = _permute_rows(state[f"{base}k_proj.{kind}"], perm)
            if base.startswith("single_blocks."):
                out[f"{base}linear1.{kind}"] = torch.cat([q, k, state[f"{base}v_mlp.{kind}"]])
            else:
                out[f"{base}qkv.{kind}"] = torch.cat([q, k, state[f"{base}v_proj.{kind}"]])
        elif key.endswith((".v_proj.weight", ".v_proj.bias", ".v_mlp.weight", ".v_mlp.bias")):
            continue
        elif _QK_SCALE.search(key):
            out[key] = value[perm].clone()
        else:
            out[key] = value
    return out
