"""Reading and writing Pyramid Flow's released folders (``diffusion_transformer_*``, ``causal_video_vae``):
``config.json`` plus ``diffusion_pytorch_model.safetensors`` (or ``.bin``, or a sharded ``.index.json``), loaded
by key with ``strict`` semantics: a missing, unexpected or mis-shaped key is one error line listing them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from frameloom.errors import FrameloomError

__all__ = [
    "MINIFLUX_CLASS",
    "SD3_CLASS",
    "VAE_CLASS",
    "WEIGHTS_NAME",
    "clean_checkpoint_keys",
    "load_strict",
    "read_config",
    "read_weights",
    "write_folder",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MINIFLUX_CLASS = "PyramidFluxTransformer"
SD3_CLASS = "PyramidDiffusionMMDiT"
VAE_CLASS = "CausalVideoVAE"


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FrameloomError(f"no config.json in {folder} (expected a released Pyramid Flow model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FrameloomError(f"{path}: not valid JSON ({exc})") from None


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a model folder: one safetensors file, a sharded safetensors index, or a torch .bin."""
    folder = Path(folder)
    single = folder / WEIGHTS_NAME
    index = folder / (WEIGHTS_NAME + ".index.json")
    binary = folder / "diffusion_pytorch_model.bin"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FrameloomError(f"no {WEIGHTS_NAME} (or .index.json / .bin) in {folder}")


def clean_checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream ``load_checkpoint``: drop ``vae*`` / ``text_encoder*`` entries and a ``dit.`` prefix (a training
    checkpoint of the whole wrapper holds all three)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("vae", "text_encoder")):
            continue
        out[key.removeprefix("dit.")] = value
    return out


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with one clear line on any mismatch (which keys are
    missing, which are unexpected, which have another shape)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append(
                "shape mismatch "
                + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes)
            )
        raise FrameloomError(f"{where} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def write_folder(folder: str | os.PathLike, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (the layout ``from_pretrained`` reads)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(folder / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    return folder
