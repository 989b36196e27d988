"""Open-Sora-Plan v1.3's released layout: reading and writing its model folders, with strict key checks.

A released model folder (``LanguageBind/Open-Sora-Plan-v1.3.0``: ``any93x640x640/`` for the DiT, ``vae/`` for
WF-VAE) is diffusers' ``save_pretrained`` layout: ``config.json`` (the constructor arguments plus
``_class_name``) and ``diffusion_pytorch_model.safetensors`` (or shards listed in
``diffusion_pytorch_model.safetensors.index.json``). Upstream reads both with ``from_pretrained``
(``OpenSoraT2V_v1_3``, ``WFVAEModel``); frameloom reads them into its own modules, whose parameter names are
the released ones, and refuses a state dict that does not match in one line naming the differing keys.

``released_dit_shapes`` / ``released_wfvae_shapes`` list the released key names and shapes for a config,
written out from the upstream module layout independently of frameloom's modules, so the tests can build a
"released" state dict for a tiny config and load it strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from frameloom.errors import FrameloomError

__all__ = [
    "DIT_CLASS",
    "WFVAE_CLASS",
    "load_state_strict",
    "read_config",
    "read_weights",
    "released_dit_shapes",
    "released_wfvae_shapes",
    "write_folder",
]

DIT_CLASS = "OpenSoraT2V_v1_3"
WFVAE_CLASS = "WFVAEModel"
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
#: The diffusers version written into exported configs (upstream's released configs carry 0.30.x).
DIFFUSERS_VERSION = "0.30.2"


def read_config(folder: str | os.PathLike, expected_class: str) -> dict[str, Any]:
    """``folder/config.json`` as a dict; its ``_class_name`` (when present) must be ``expected_class``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FrameloomError(
            f"no config.json in {folder} (expected an Open-Sora-Plan {expected_class} folder)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FrameloomError(f"{path}: not valid JSON ({exc})") from None
    name = config.get("_class_name")
    if name is not None and name != expected_class:
        raise FrameloomError(f"{path}: _class_name is {name!r}, expected {expected_class!r}")
    return config


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The folder's safetensors weights: one file, or the shards its index lists."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return load_file(str(folder / WEIGHTS))
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
        return state
    raise FrameloomError(f"no {WEIGHTS} (or {INDEX}) in {folder}")


def load_state_strict(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, optional: frozenset[str] = frozenset()
) -> None:
    """``module.load_state_dict(state, strict=True)`` with one clear line on a mismatch (missing and
    unexpected keys, or a wrong shape). Keys in ``optional`` may be absent (fixed constants such as WF-VAE's
    wavelet filters, which the module builds itself)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {len(missing)} key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
            )
        raise FrameloomError(f"{what} does not match the model: {'; '.join(parts)}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise FrameloomError(
                f"{what}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    full = dict(own)
    full.update(state)
    module.load_state_dict(full, strict=True)


def write_folder(
    folder: str | os.PathLike, class_name: str, config: dict[str, Any], state: dict[str, torch.Tensor]
) -> Path:
    """Write ``config.json`` (+ ``_class_name``) and ``diffusion_pytorch_model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **config}
    (folder / "config.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    return folder


# -------------------------------------------------------------------------------------------------------- key sets


def released_dit_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``OpenSoraT2V_v1_3``'s state dict for a config (upstream ``modeling_opensora.py``:
    ``PixArtAlphaTextProjection``, ``PatchEmbed2D``, ``BasicTransformerBlock`` with diffusers' ``Attention``
    and ``FeedForward``, ``AdaLayerNormSingle``)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    kv = cfg.get("cross_attention_dim") or d
    c_in = cfg["in_channels"]
    c_out = cfg.get("out_channels") or c_in
    p, pt = cfg["patch_size"], cfg.get("patch_size_t", 1)
    shapes: dict[str, tuple[int, ...]] = {
        "scale_shift_table": (2, d),
        "caption_projection.linear_1.weight": (d, cfg["caption_channels"]),
        "caption_projection.linear_1.bias": (d,),
        "caption_projection.linear_2.weight": (d, d),
        "caption_projection.linear_2.bias": (d,),
        "pos_embed.proj.weight": (d, c_in, p, p),
        "pos_embed.proj.bias": (d,),
        "proj_out.weight": (pt * p * p * c_out, d),
        "proj_out.bias": (pt * p * p * c_out,),
        "adaln_single.emb.timestep_embedder.linear_1.weight": (d, 256),
        "adaln_single.emb.timestep_embedder.linear_1.bias": (d,),
        "adaln_single.emb.timestep_embedder.linear_2.weight": (d, d),
        "adaln_single.emb.timestep_embedder.linear_2.bias": (d,),
        "adaln_single.linear.weight": (6 * d, d),
        "adaln_single.linear.bias": (6 * d,),
    }
    bias = cfg.get("attention_bias", True)
    for i in range(cfg["num_layers"]):
        pre = f"transformer_blocks.{i}."
        shapes[pre + "scale_shift_table"] = (6, d)
        for attn, in_kv in (("attn1", d), ("attn2", kv)):
            for proj, fan_in in (("to_q", d), ("to_k", in_kv), ("to_v", in_kv)):
                shapes[f"{pre}{attn}.{proj}.weight"] = (d, fan_in)
                if bias:
                    shapes[f"{pre}{attn}.{proj}.bias"] = (d,)
            shapes[f"{pre}{attn}.to_out.0.weight"] = (d, d)
            shapes[f"{pre}{attn}.to_out.0.bias"] = (d,)
        shapes[pre + "ff.net.0.proj.weight"] = (4 * d, d)
        shapes[pre + "ff.net.0.proj.bias"] = (4 * d,)
        shapes[pre + "ff.net.2.weight"] = (d, 4 * d)
        shapes[pre + "ff.net.2.bias"] = (d,)
    return shapes


def _norm(prefix: str, channels: int, norm_type: str) -> dict[str, tuple[int, ...]]:
    inner = ".norm" if norm_type == "layernorm" else ""  # upstream's LayerNorm wraps nn.LayerNorm as .norm
    return {f"{prefix}{inner}.weight": (channels,), f"{prefix}{inner}.bias": (channels,)}


def _conv(prefix: str, c_out: int, c_in: int, k: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (c_out, c_in, *k), f"{prefix}.bias": (c_out,)}


def _res3d(prefix: str, c_in: int, c_out: int, norm: str) -> dict[str, tuple[int, ...]]:
    out = {**_norm(f"{prefix}.norm1", c_in, norm), **_conv(f"{prefix}.conv1.conv", c_out, c_in, (3, 3, 3))}
    out.update(
        {**_norm(f"{prefix}.norm2", c_out, norm), **_conv(f"{prefix}.conv2.conv", c_out, c_out, (3, 3, 3))}
    )
    if c_in != c_out:
        out.update(_conv(f"{prefix}.nin_shortcut.conv", c_out, c_in, (1, 1, 1)))
    return out


def _res2d(prefix: str, c_in: int, c_out: int, norm: str) -> dict[str, tuple[int, ...]]:
    out = {**_norm(f"{prefix}.norm1", c_in, norm), **_conv(f"{prefix}.conv1", c_out, c_in, (3, 3))}
    out.update({**_norm(f"{prefix}.norm2", c_out, norm), **_conv(f"{prefix}.conv2", c_out, c_out, (3, 3))})
    if c_in != c_out:
        out.update(_conv(f"{prefix}.nin_shortcut", c_out, c_in, (1, 1)))
    return out


def _attn(prefix: str, c: int, norm: str) -> dict[str, tuple[int, ...]]:
    out = _norm(f"{prefix}.norm", c, norm)
    for name in ("q", "k", "v", "proj_out"):
        out.update(_conv(f"{prefix}.{name}.conv", c, c, (1, 1, 1)))
    return out


HAAR_3D = ("h", "g", "hh", "gh", "h_v", "g_v", "hh_v", "gh_v")
HAAR_2D = ("aa", "ad", "da", "dd")


def released_wfvae_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``WFVAEModel``'s state dict for a config (upstream ``modeling_wfvae.py`` with its
    default module names: 2D Haar + ``Downsample`` at level 1, 3D Haar + ``Spatial2xTime2x3DDownsample`` at
    level 2, the mirrored decoder, ``AttnBlock3DFix`` in the middle when ``use_attention``), including the
    fixed wavelet filters (``*.h_conv.conv.weight``, ``*.aa``, ...)."""
    b = cfg.get("base_channels", 128)
    z = cfg.get("latent_dim", 8)
    norm = cfg.get("norm_type", "groupnorm")
    e_enc = cfg.get("encoder_energy_flow_hidden_size", 64)
    e_dec = cfg.get("decoder_energy_flow_hidden_size", 128)
    n_enc = cfg.get("encoder_num_resblocks", 2)
    n_dec = cfg.get("decoder_num_resblocks", 2)
    attention = cfg.get("use_attention", True)
    connect = cfg.get("connect_res_layer_num", 1)
    s: dict[str, tuple[int, ...]] = {}
    # encoder
    s.update(_conv("encoder.down1.0", b, 24, (3, 3)))
    for i in range(n_enc):
        s.update(_res2d(f"encoder.down1.{i + 1}", b, b, norm))
    s.update(_conv(f"encoder.down1.{n_enc + 1}.conv", b, b, (3, 3)))
    s.update(_conv("encoder.down2.0", 2 * b, b + e_enc, (3, 3)))
    for i in range(n_enc):
        s.update(_res3d(f"encoder.down2.{i + 1}", 2 * b, 2 * b, norm))
    s.update(_conv(f"encoder.down2.{n_enc + 1}.conv.conv", 2 * b, 2 * b, (3, 3, 3)))
    s.update(_conv("encoder.connect_l1", e_enc, 12, (3, 3)))
    s.update(_conv("encoder.connect_l2", e_enc, 24, (3, 3)))
    mid = (
        [("res", 2 * b + e_enc, 4 * b)]
        + ([("attn", 4 * b, 4 * b)] if attention else [])
        + [("res", 4 * b, 4 * b)]
    )
    for i, (kind, c_in, c_out) in enumerate(mid):
        s.update(
            _res3d(f"encoder.mid.{i}", c_in, c_out, norm)
            if kind == "res"
            else _attn(f"encoder.mid.{i}", c_in, norm)
        )
    s.update(_norm("encoder.norm_out", 4 * b, norm))
    s.update(_conv("encoder.conv_out.conv", 2 * z, 4 * b, (3, 3, 3)))
    for w in ("wavelet_transform_in", "wavelet_transform_l2"):
        for f in HAAR_3D:
            s[f"encoder.{w}.{f}_conv.conv.weight"] = (1, 1, 2, 2, 2)
    for f in HAAR_2D:
        s[f"encoder.wavelet_transform_l1.{f}"] = (1, 1, 2, 2)
    # decoder
    s.update(_conv("decoder.conv_in.conv", 4 * b, z, (3, 3, 3)))
    mid = (
        [("res", 4 * b, 4 * b)]
        + ([("attn", 4 * b, 4 * b)] if attention else [])
        + [("res", 4 * b, 4 * b + e_dec)]
    )
    for i, (kind, c_in, c_out) in enumerate(mid):
        s.update(
            _res3d(f"decoder.mid.{i}", c_in, c_out, norm)
            if kind == "res"
            else _attn(f"decoder.mid.{i}", c_in, norm)
        )
    for i in range(n_dec):
        s.update(_res3d(f"decoder.up2.{i}", 4 * b, 4 * b, norm))
    s.update(_conv(f"decoder.up2.{n_dec}.conv.conv", 4 * b, 4 * b, (3, 3, 3)))
    s.update(_res3d(f"decoder.up2.{n_dec + 1}", 4 * b, 4 * b + e_dec, norm))
    for i in range(n_dec):
        s.update(_res3d(f"decoder.up1.{i}", 4 * b if i == 0 else 2 * b, 2 * b, norm))
    s.update(_conv(f"decoder.up1.{n_dec}.conv", 2 * b, 2 * b, (3, 3)))
    s.update(_res3d(f"decoder.up1.{n_dec + 1}", 2 * b, 2 * b, norm))
    s.update(_res3d("decoder.layer.0", 2 * b, b, norm))
    s.update(_res3d("decoder.layer.1", b, b, norm))
    for name, c_out in (("connect_l1", 12), ("connect_l2", 24)):
        for i in range(connect):
            s.update(_res3d(f"decoder.{name}.{i}", e_dec, e_dec, norm))
        s.update(_conv(f"decoder.{name}.{connect}", c_out, e_dec, (3, 3)))
    s.update(_norm("decoder.norm_out", b, norm))
    s.update(_conv("decoder.conv_out", 24, b, (3, 3)))
    for w in ("inverse_wavelet_transform_out", "inverse_wavelet_transform_l2"):
        for f in HAAR_3D:
            s[f"decoder.{w}.{f}"] = (1, 1, 2, 2, 2)
    for f in HAAR_2D:
        s[f"decoder.inverse_wavelet_transform_l1.{f}"] = (1, 1, 2, 2)
    return s
