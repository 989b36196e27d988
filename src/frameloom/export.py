"""`frameloom export`: a run's trained weights as files other tools load, each verified by loading it back.

Formats (``--format``):

- ``lora``: ``pytorch_lora_weights.safetensors`` in diffusers' form (``transformer.<module>.lora_A/B.weight``
  plus the adapter config in the safetensors metadata), loaded by the family pipeline's
  ``load_lora_weights``; with ``--comfyui`` also ``lora_comfyui.safetensors`` in ComfyUI's form
  (``diffusion_model.<module>.lora_down/lora_up.weight`` + ``.alpha``; see models/lora.py and docs/families.md).
  Verified by loading it into a fresh transformer from ``model.pretrained``: every key must land, and the
  loaded weights must equal the trained ones.
- ``diffusers``: a complete diffusers directory: ``model.pretrained``'s parts (hard links where possible)
  with ``transformer/`` replaced by the trained transformer (a LoRA merged into its base). Verified by
  ``from_pretrained`` on the written transformer and comparing every tensor.
- ``safetensors``: one consolidated ``model.safetensors``: the denoiser's state dict (for a diffusers family
  the transformer's, in diffusers names, a LoRA merged in). Verified by reading it back.
- ``native``: the seed system's own released layout, written by the family's ``export_released(cfg, weights,
  out)`` (Open-Sora-Plan: an ``OpenSoraT2V_v1_3`` folder its ``from_pretrained`` loads; Pyramid Flow: a
  ``diffusion_transformer_*`` folder). Verified by the family.

Weights come from ``frameloom.checkpoint.io.load_checkpoint`` (the full state however it was saved); the
EMA weights are used when the checkpoint has them and ``sample.use_ema`` is on, as ``frameloom sample`` does.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from frameloom.checkpoint import io as ckpt
from frameloom.config import Config, apply_overrides, load_config
from frameloom.errors import FrameloomError

__all__ = ["FORMATS", "export_run", "load_run_denoiser", "merged_transformer"]

FORMATS = ("diffusers", "lora", "safetensors", "native")
LORA_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "lora_comfyui.safetensors"


def _run_config(run_dir: Path) -> Config:
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        raise FrameloomError(f"{run_dir} is not a run directory (no config.resolved.yaml)")
    return apply_overrides(load_config(resolved), [f"run_dir={run_dir}"])


def _checkpoint_weights(cfg: Config, checkpoint: str) -> tuple[dict[str, torch.Tensor], Path]:
    path = ckpt.resolve_checkpoint(cfg.run_dir, checkpoint)
    if path is None:
        raise FrameloomError(f"no complete checkpoint in {Path(cfg.run_dir) / 'checkpoints'}")
    loaded = ckpt.load_checkpoint(path)
    weights = dict(loaded["model"])
    if cfg.sample.use_ema and loaded.get("ema") is not None:
        weights.update(loaded["ema"])
    return weights, path


def load_run_denoiser(
    run_dir: str | os.PathLike, checkpoint: str = "latest"
) -> tuple[Config, torch.nn.Module, Path]:
    """(config, denoiser with the checkpoint's weights, checkpoint folder) of a run, on the CPU.

    Diffusers families read their sizes from ``model.pretrained``, so the latent/text sizes passed to
    ``build_denoiser`` are not used (0).
    """
    from frameloom.models.registry import get_family

    cfg = _run_config(Path(run_dir))
    family = get_family(cfg.model.family)
    if family.pipeline_class is None:
        raise FrameloomError(
            f"model.family {cfg.model.family!r} has no diffusers form; use --format safetensors (or native)"
        )
    weights, path = _checkpoint_weights(cfg, checkpoint)
    model = family.build_denoiser(cfg.model, 0, 0)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise FrameloomError(
            f"checkpoint {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return cfg, model.eval(), path


def merged_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model.transformer`` with any LoRA merged into its base weights and the PEFT layers
    removed (diffusers' ``fuse_lora`` + ``unload_lora``), ready for ``save_pretrained``."""
    transformer = copy.deepcopy(model.transformer)
    if getattr(model, "is_lora", False):
        transformer.fuse_lora(lora_scale=1.0)
        transformer.unload_lora()
    return transformer


def _link_or_copy_tree(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy ``src`` into ``dst`` file by file, hard-linking where the file system allows (no extra space)."""
    for item in src.rglob("*"):
        rel = item.relative_to(src)
        if rel.parts[0] in skip or item.is_dir():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(item, target)
        except OSError:
            shutil.copy2(item, target)


def _assert_equal(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    if set(expected) != set(got):
        lost, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise FrameloomError(f"export check failed for {what}: missing {lost[:3]}, unexpected {extra[:3]}")
    for key, value in expected.items():
        if not torch.equal(value.detach().cpu(), got[key].detach().cpu().to(value.dtype)):
            raise FrameloomError(f"export check failed for {what}: {key} differs after loading back")


# --------------------------------------------------------------------------------------------------------
# formats


def _export_lora(cfg: Config, model: torch.nn.Module, out: Path, comfyui: bool) -> list[Path]:
    from frameloom.models.lora import ADAPTER, get_lora_state_dict, lora_alpha, to_comfyui_keys
    from frameloom.models.registry import get_family

    if not getattr(model, "is_lora", False):
        raise FrameloomError("--format lora needs a LoRA run (model.lora.rank > 0); use --format diffusers")
    family = get_family(cfg.model.family)
    pipe_cls = family.pipeline_class(cfg)
    state = {k: v.contiguous() for k, v in model.lora_state_dict().items()}
    metadata = model.transformer.peft_config[ADAPTER].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    pipe_cls.save_lora_weights(
        str(out),
        transformer_lora_layers=state,
        weight_name=LORA_FILE,
        transformer_lora_adapter_metadata=metadata,
    )
    written = [out / LORA_FILE]

    # Verify: load the file the way a pipeline does into a fresh base transformer; every key must land.
    fresh = family.build_denoiser(_without_lora(cfg).model, 0, 0).transformer
    loaded, meta = pipe_cls.lora_state_dict(str(out), weight_name=LORA_FILE, return_lora_metadata=True)
    fresh.load_lora_adapter(loaded, adapter_name=ADAPTER, metadata=meta, prefix="transformer")
    _assert_equal(state, get_lora_state_dict(fresh), str(out / LORA_FILE))

    if comfyui:
        comfy = to_comfyui_keys(state, lora_alpha(cfg.model.lora), family.comfyui_module)
        save_file({k: v.contiguous() for k, v in comfy.items()}, str(out / COMFYUI_FILE))
        _assert_equal(comfy, load_file(str(out / COMFYUI_FILE)), str(out / COMFYUI_FILE))
        written.append(out / COMFYUI_FILE)
    return written


def _without_lora(cfg: Config) -> Config:
    return apply_overrides(cfg, ["model.lora.rank=0"])


def _export_diffusers(cfg: Config, model: torch.nn.Module, out: Path) -> list[Path]:
    root = Path(cfg.model.pretrained)
    _link_or_copy_tree(root, out, skip={"transformer"})
    transformer = merged_transformer(model)
    if (out / "transformer").exists():
        shutil.rmtree(out / "transformer")
    transformer.save_pretrained(str(out / "transformer"))
    # Verify: the written transformer loads with from_pretrained and carries exactly the trained weights.
    reloaded = type(transformer).from_pretrained(str(out), subfolder="transformer", local_files_only=True)
    _assert_equal(transformer.state_dict(), reloaded.state_dict(), str(out / "transformer"))
    return [out]


def _export_safetensors(cfg: Config, out: Path, checkpoint: str) -> list[Path]:
    from frameloom.models.registry import get_family

    if get_family(cfg.model.family).pipeline_class is None:  # frameloom's own DiT: its state dict as is
        weights, _ = _checkpoint_weights(cfg, checkpoint)
    else:
        _, model, _ = load_run_denoiser(cfg.run_dir, checkpoint)
        weights = merged_transformer(model).state_dict()
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    path = out / "model.safetensors"
    save_file(weights, str(path), metadata={"format": "pt", "frameloom.family": cfg.model.family})
    _assert_equal(weights, load_file(str(path)), str(path))
    return [path]


def _export_native(cfg: Config, out: Path, checkpoint: str) -> list[Path]:
    """The family's ``export_released`` (the seed system's layout), with the checkpoint's (EMA) weights."""
    import importlib

    try:
        module = importlib.import_module(f"frameloom.models.{cfg.model.family}.family")
    except ModuleNotFoundError:
        module = None
    export = getattr(module, "export_released", None)
    if export is None:
        raise FrameloomError(
            f"model.family {cfg.model.family!r} has no native layout to export; use --format safetensors"
        )
    weights, _ = _checkpoint_weights(cfg, checkpoint)
    return export(cfg, weights, out)


def export_run(
    run_dir: str | os.PathLike,
    *,
    fmt: str,
    out: str | os.PathLike,
    checkpoint: str = "latest",
    comfyui: bool = False,
) -> list[Path]:
    """Export a run's checkpoint in ``fmt`` (``diffusers``, ``lora``, ``safetensors``) into ``out``; returns
    the written paths. Every format is verified by loading it back (module docstring)."""
    if fmt not in FORMATS:
        raise FrameloomError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if comfyui and fmt != "lora":
        raise FrameloomError("--comfyui applies to --format lora only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        return _export_safetensors(_run_config(Path(run_dir)), out, checkpoint)
    if fmt == "native":
        return _export_native(_run_config(Path(run_dir)), out, checkpoint)
    cfg, model, _ = load_run_denoiser(run_dir, checkpoint)
    if fmt == "lora":
        return _export_lora(cfg, model, out, comfyui)
    return _export_diffusers(cfg, model, out)
