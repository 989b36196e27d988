"""The class-conditional DiT's weights in their two public layouts, and the model sizes of the paper.

- **Released** (facebookresearch/DiT, fast-DiT): a plain state dict in ``ClassDiT``'s own names
  (``DiT-XL-2-256x256.pt``), or a ``train.py`` checkpoint ``{"model", "ema", "opt", "args"}`` whose ``ema`` is
  used (as upstream ``find_model``). Read with ``torch.load(weights_only=True)`` only.
- **diffusers** ``DiTTransformer2DModel``: qkv split into ``attn1.to_{q,k,v}``, ``attn.proj`` ->
  ``attn1.to_out.0``, ``mlp.fc1/fc2`` -> ``ff.net.0.proj/ff.net.2``, ``adaLN_modulation.1`` -> ``norm1.linear``,
  the timestep/class embedders copied into every block's ``norm1.emb`` (``timestep_embedder.linear_{1,2}``,
  ``class_embedder.embedding_table``), ``x_embedder.proj`` -> ``pos_embed.proj``, the final layer ->
  ``proj_out_1``/``proj_out_2``. The fixed position table is not stored there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from frameloom.errors import FrameloomError

__all__ = [
    "SIZES",
    "DIT_CLASS_PRESETS",
    "config_from_diffusers",
    "config_from_state_dict",
    "diffusers_config",
    "from_diffusers_state_dict",
    "load_released_file",
    "load_strict",
    "preset_config",
    "released_shapes",
    "to_diffusers_state_dict",
]

# The paper's table (Peebles & Xie, Table 1): (depth, hidden size, heads) per size, with patch 2, 4 or 8.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_CLASS_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": d, "hidden_size": h, "num_heads": n, "patch_size": patch}
    for size, (d, h, n) in SIZES.items()
    for patch in (2, 4, 8)
}


def preset_config(name: str) -> dict[str, int]:
    """``DiT-XL/2``, ``XL/2``, ``XL-2`` or ``DiT-XL-2`` -> the preset's constructor arguments."""
    m = re.fullmatch(r"(?:DiT-)?(S|B|L|XL)[/-]([248])", name.strip(), flags=re.IGNORECASE)
    if m is None:
        raise FrameloomError(f"unknown model.preset {name!r}; available: {', '.join(DIT_CLASS_PRESETS)}")
    return dict(DIT_CLASS_PRESETS[f"DiT-{m.group(1).upper()}/{m.group(2)}"])


def released_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of a released-layout state dict and its shape, derived from a ``ClassDiT`` config."""
    d, p, c = config["hidden_size"], config["patch_size"], config["in_channels"]
    out_c = 2 * c if config.get("learn_sigma", True) else c
    n = (config["input_size"] // p) ** 2
    mlp = int(d * config.get("mlp_ratio", 4.0))
    rows = config["num_classes"] + int(config.get("null_class", True))
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, n, d),
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (rows, d),
    }
    for i in range(config["depth"]):
        shapes |= {
            f"blocks.{i}.attn.qkv.weight": (3 * d, d),
            f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (mlp, d),
            f"blocks.{i}.mlp.fc1.bias": (mlp,),
            f"blocks.{i}.mlp.fc2.weight": (d, mlp),
            f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        }
    shapes |= {
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "final_layer.linear.weight": (p * p * out_c, d),
        "final_layer.linear.bias": (p * p * out_c,),
    }
    return shapes


def load_released_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A released ``.pt`` (plain state dict) or a DiT/fast-DiT ``train.py`` checkpoint (its ``ema``, else
    ``model``), read with ``weights_only=True`` (train.py's ``args`` Namespace is the one class allowed)."""
    path = Path(path)
    if not path.is_file():
        raise FrameloomError(f"model.pretrained: no such file: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (an unpickling error of any kind is one line for the user)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FrameloomError(
            f"cannot read {path} as a DiT checkpoint with weights_only=True: {first}"
        ) from None
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        obj = obj["ema"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FrameloomError(f"{path} is not a DiT state dict (expected a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def config_from_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """The ``ClassDiT`` config a released-layout state dict was saved from (heads are not in the shapes: the
    paper's value for the hidden size unless ``num_heads`` is given)."""
    try:
        d, c, p, _ = sd["x_embedder.proj.weight"].shape
        n = sd["pos_embed"].shape[1]
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
        out = sd["final_layer.linear.weight"].shape[0] // (p * p)
        mlp = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise FrameloomError(f"not a released DiT state dict: key {exc.args[0]!r} is missing") from None
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if num_heads is None:
        by_hidden = {h: heads for _, h, heads in SIZES.values()}
        num_heads = by_hidden.get(d)
        if num_heads is None:
            raise FrameloomError(
                f"hidden size {d} is none of the paper's sizes: set model.config.num_heads for this checkpoint"
            )
    grid = math.isqrt(n)
    if grid * grid != n:
        raise FrameloomError(f"pos_embed holds {n} positions, not a square grid")
    return {
        "input_size": grid * p,
        "patch_size": p,
        "in_channels": c,
        "hidden_size": d,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp / d,
        # the upstream table has a null row exactly when trained with class dropout (class_dropout_prob > 0)
        "num_classes": rows - 1,
        "null_class": True,
        "learn_sigma": out == 2 * c,
    }


def load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one line naming the missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shaped = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:4])}")
        if shaped:
            k = shaped[0]
            parts.append(
                f"{len(shaped)} shape mismatch(es), e.g. {k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
            )
        raise FrameloomError(f"{source} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel


def diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    """``DiTTransformer2DModel`` constructor arguments for a ``ClassDiT`` config (diffusers always keeps a
    null-class row, so the model must have one)."""
    if not config.get("null_class", True):
        raise FrameloomError("diffusers' DiTTransformer2DModel needs a null-class row (null_class: true)")
    if config.get("mlp_ratio", 4.0) != 4.0:
        raise FrameloomError("diffusers' DiTTransformer2DModel has a fixed MLP ratio of 4")
    c = config["in_channels"]
    return {
        "num_attention_heads": config["num_heads"],
        "attention_head_dim": config["hidden_size"] // config["num_heads"],
        "in_channels": c,
        "out_channels": 2 * c if config.get("learn_sigma", True) else c,
        "num_layers": config["depth"],
        "sample_size": config["input_size"],
        "patch_size": config["patch_size"],
        "num_embeds_ada_norm": config["num_classes"],
    }


def config_from_diffusers(dc: dict[str, Any]) -> dict[str, Any]:
    """The ``ClassDiT`` config of a diffusers ``DiTTransformer2DModel`` config."""
    c = dc.get("in_channels", 4)
    out = dc.get("out_channels") or c
    heads = dc.get("num_attention_heads", 16)
    return {
        "input_size": dc.get("sample_size", 32),
        "patch_size": dc.get("patch_size", 2),
        "in_channels": c,
        "hidden_size": heads * dc.get("attention_head_dim", 72),
        "depth": dc.get("num_layers", 28),
        "num_heads": heads,
        "mlp_ratio": 4.0,
        "num_classes": dc.get("num_embeds_ada_norm", 1000),
        "null_class": True,
        "learn_sigma": out == 2 * c,
    }


_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_EMBEDDERS = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released layout -> ``DiTTransformer2DModel`` keys (qkv split in thirds, embedders copied per block)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)
            out |= {f"{dst}attn1.to_q.{kind}": q, f"{dst}attn1.to_k.{kind}": k, f"{dst}attn1.to_v.{kind}": v}
            for ours, theirs in _BLOCK_RENAMES.items():
                out[f"{dst}{theirs}.{kind}"] = sd[f"{src}{ours}.{kind}"]
            for ours, theirs in _EMBEDDERS.items():
                if f"{ours}.{kind}" in sd:
                    out[f"{dst}{theirs}.{kind}"] = sd[f"{ours}.{kind}"].clone()
    return {k: v.contiguous() for k, v in out.items()}


def from_diffusers_state_dict(
    sd: dict[str, torch.Tensor], pos_embed: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``DiTTransformer2DModel`` keys -> released layout (``pos_embed``: the fixed table to add). Every block's
    embedder copy must be equal (ClassDiT has one embedder); a model trained in diffusers with diverged copies
    cannot be represented and is refused."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    out = {
        "pos_embed": pos_embed,
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for ours, theirs in _EMBEDDERS.items():
        for kind in ("weight", "bias"):
            first = sd.get(f"transformer_blocks.0.{theirs}.{kind}")
            if first is None:
                continue
            for i in range(1, depth):
                if not torch.equal(sd[f"transformer_blocks.{i}.{theirs}.{kind}"], first):
                    raise FrameloomError(
                        f"transformer_blocks.{i}.{theirs}.{kind} differs from block 0's copy: the model's "
                        "per-block embedders have diverged and have no DiT equivalent"
                    )
            out[f"{ours}.{kind}"] = first
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{src}attn1.to_{n}.{kind}"] for n in ("q", "k", "v")]
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(qkv, dim=0)
            for ours, theirs in _BLOCK_RENAMES.items():
                out[f"{dst}{ours}.{kind}"] = sd[f"{src}{theirs}.{kind}"]
    return out


def read_diffusers_config(folder: Path) -> dict[str, Any]:
    """A ``DiTTransformer2DModel`` folder's config.json (a pipeline folder's ``transformer/`` is found too)."""
    for candidate in (folder / "config.json", folder / "transformer" / "config.json"):
        if candidate.is_file():
            cfg = json.loads(candidate.read_text())
            if cfg.get("_class_name") not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
                raise FrameloomError(f"{candidate}: {cfg.get('_class_name')} is not a DiTTransformer2DModel")
            return cfg
    raise FrameloomError(f"{folder}: no config.json of a DiTTransformer2DModel (nor transformer/config.json)")
