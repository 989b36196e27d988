"""`frameloom export`: a run's trained weights as files other tools load, each verified by loading it back.

Formats (``--format``):

- ``lora``: ``pytorch_lora_weights.safetensors`` in diffusers' form (``transformer.<module>.lora_A/B.weight``
  plus the adapter config in the safetensors metadata), loaded by the family pipeline's
  ``load_lora_weights``; with ``--comfyui`` also ``lora_comfyui.safetensors`` in ComfyUI's form
  (``diffusion_model.<comfy module>.lora_down/lora_up.weight`` + ``.alpha``), with ``--kohya`` also
  ``lora_kohya.safetensors`` (``lora_unet_<comfy module with _>.lora_down/lora_up.weight`` + ``.alpha``; see
  models/lora.py and docs/families.md). The files are bf16 by default (``--dtype fp32`` on request).
  Verified by loading the diffusers file the way a pipeline does, as a second adapter of the same
  transformer: every key must land, and the loaded weights must equal the written ones.
- ``diffusers``: a complete diffusers directory: ``model.pretrained``'s parts (hard links where possible)
  with ``transformer/`` replaced by the trained transformer (a LoRA merged into its base). Verified by
  reading the written files back tensor by tensor against the model and against the key names and shapes
  the transformer class builds from the written config.
- ``safetensors``: one consolidated ``model.safetensors``: the denoiser's state dict (for a diffusers family
  the transformer's, in diffusers names, a LoRA merged in). Verified by reading it back tensor by tensor.
- ``native``: the seed system's own released layout, written by the family's ``export_released(cfg, weights,
  out)`` (Open-Sora-Plan: an ``OpenSoraT2V_v1_3`` folder its ``from_pretrained`` loads; Pyramid Flow: a
  ``diffusion_transformer_*`` folder; dit_class: DiT's ``.pt``). Verified by the family. A seed family with a
  diffusers form of its own defines ``export_diffusers(cfg, weights, out)`` for ``--format diffusers``
  (dit_class: ``DiTTransformer2DModel``).

Memory: export holds one copy of the base plus the adapter. The denoiser is built once from
``model.pretrained``; the checkpoint's tensors are read one at a time into it (a LoRA run's checkpoint holds
only the adapter, checkpoint/trainable.py; an older one holding the base too is read without a second
copy); merging happens in place; and verification streams the written files instead of loading a second
model (``benchmarks/export_memory.py`` measures it). The EMA weights are used when the checkpoint has them
and ``sample.use_ema`` is on, as ``frameloom sample`` does.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frameloom.checkpoint import io as ckpt
from frameloom.checkpoint.trainable import check_loaded, load_weights
from frameloom.config import Config, apply_overrides, load_config
from frameloom.errors import FrameloomError

__all__ = ["DTYPES", "FORMATS", "export_run", "load_run_denoiser", "merge_lora_in_place"]

FORMATS = ("diffusers", "lora", "safetensors", "native")
LORA_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "lora_comfyui.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
#: ``--dtype`` of the LoRA files.
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: The adapter name the diffusers file is loaded back under for verification.
VERIFY_ADAPTER = "frameloom_export_check"


def _run_config(run_dir: Path) -> Config:
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.is_file():
        raise FrameloomError(f"{run_dir} is not a run directory (no config.resolved.yaml)")
    # Export builds the base from model.pretrained in model.dtype: never fp8 (a LoRA merged into fp8
    # weights would lose precision), and never swapped.
    return apply_overrides(load_config(resolved), [f"run_dir={run_dir}", "model.fp8_base=false"])


def _resolve(cfg: Config, checkpoint: str) -> Path:
    path = ckpt.resolve_checkpoint(cfg.run_dir, checkpoint)
    if path is None:
        raise FrameloomError(f"no complete checkpoint in {Path(cfg.run_dir) / 'checkpoints'}")
    return path


def _checkpoint_weights(cfg: Config, path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights with the EMA ones over them (``sample.use_ema``), all in memory."""
    loaded = ckpt.load_checkpoint(path)
    weights = dict(loaded["model"])
    if cfg.sample.use_ema and loaded.get("ema") is not None:
        weights.update(loaded["ema"])
    return weights


@torch.no_grad()
def _stream_into(model: torch.nn.Module, cfg: Config, path: Path) -> None:
    """Copy a full-format checkpoint's tensors into ``model`` one at a time (EMA ones where present and
    ``sample.use_ema``): never more than one checkpoint tensor in memory besides the model."""
    targets = model.state_dict(keep_vars=True)
    files = [path / "model.safetensors"]
    if cfg.sample.use_ema and (path / "ema.safetensors").is_file():
        files.append(path / "ema.safetensors")  # read last: its values win
    seen: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key not in targets:
                    unexpected.append(key)
                    continue
                targets[key].copy_(f.get_tensor(key))
                seen.add(key)
    check_loaded(model, set(targets) - seen, unexpected, str(path))


def load_run_denoiser(
    run_dir: str | os.PathLike, checkpoint: str = "latest"
) -> tuple[Config, torch.nn.Module, Path]:
    """(config, denoiser with the checkpoint's weights, checkpoint folder) of a run, on the CPU.

    Diffusers families read their sizes from ``model.pretrained``, so the latent/text sizes passed to
    ``build_denoiser`` are not used (0). The base is built once; the checkpoint is streamed into it.
    """
    from frameloom.models.registry import get_family

    cfg = _run_config(Path(run_dir))
    family = get_family(cfg.model.family)
    if family.pipeline_class is None:
        raise FrameloomError(
            f"model.family {cfg.model.family!r} has no diffusers form; use --format safetensors (or native)"
        )
    path = _resolve(cfg, checkpoint)
    model = family.build_denoiser(cfg.model, 0, 0)
    if ckpt.read_meta(path)["format"] == "full":
        _stream_into(model, cfg, path)
    else:  # sharded: consolidated in memory (a LoRA run's sharded checkpoint is the adapter only)
        load_weights(model, _checkpoint_weights(cfg, path), str(path))
    return cfg, model.eval(), path


def merge_lora_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """``model.transformer`` with any LoRA merged into its base weights and the PEFT layers removed
    (diffusers' ``fuse_lora`` + ``unload_lora``), in place (no copy of the base): ready for
    ``save_pretrained``. The denoiser is not used afterwards."""
    transformer = model.transformer
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


def _assert_equal(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    if set(expected) != set(got):
        lost, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise FrameloomError(f"export check failed for {what}: missing {lost[:3]}, unexpected {extra[:3]}")
    for key, value in expected.items():
        if not torch.equal(value.detach().cpu(), got[key].detach().cpu().to(value.dtype)):
            raise FrameloomError(f"export check failed for {what}: {key} differs after loading back")


def _read_back(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the safetensors ``files``, one at a time (how verification avoids a second copy)."""
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _verify_streamed(expected: Mapping[str, torch.Tensor], files: list[Path], what: str) -> None:
    """The ``files`` hold exactly ``expected``'s keys with equal values, read back one tensor at a time."""
    seen: set[str] = set()
    for key, value in _read_back(files):
        if key not in expected:
            raise FrameloomError(f"export check failed for {what}: unexpected {key}")
        if not torch.equal(expected[key].detach().cpu(), value):
            raise FrameloomError(f"export check failed for {what}: {key} differs after loading back")
        seen.add(key)
    lost = sorted(set(expected) - seen)
    if lost:
        raise FrameloomError(f"export check failed for {what}: missing {lost[:3]}")


# --------------------------------------------------------------------------------------------------------
# formats


def _export_lora(
    cfg: Config, model: torch.nn.Module, out: Path, comfyui: bool, kohya: bool, dtype: torch.dtype
) -> list[Path]:
    from peft.utils import get_peft_model_state_dict

    from frameloom.models.lora import ADAPTER, lora_alpha, to_comfyui_keys, to_kohya_keys
    from frameloom.models.registry import get_family

    if not getattr(model, "is_lora", False):
        raise FrameloomError("--format lora needs a LoRA run (model.lora.rank > 0); use --format diffusers")
    family = get_family(cfg.model.family)
    pipe_cls = family.pipeline_class(cfg)
    state = {k: v.to(dtype).contiguous() for k, v in model.lora_state_dict().items()}
    metadata = model.transformer.peft_config[ADAPTER].to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    pipe_cls.save_lora_weights(
        str(out),
        transformer_lora_layers=state,
        weight_name=LORA_FILE,
        transformer_lora_adapter_metadata=metadata,
    )
    written = [out / LORA_FILE]

    # Verify: load the file the way a pipeline does, as a second adapter of the same transformer (no second
    # base in memory); every key must land with the written values.
    transformer = model.transformer
    loaded, meta = pipe_cls.lora_state_dict(str(out), weight_name=LORA_FILE, return_lora_metadata=True)
    with warnings.catch_warnings():  # PEFT warns about a second adapter and its deletion: both intended
        warnings.simplefilter("ignore", UserWarning)
        transformer.load_lora_adapter(
            loaded, adapter_name=VERIFY_ADAPTER, metadata=meta, prefix="transformer"
        )
        try:
            got = get_peft_model_state_dict(transformer, adapter_name=VERIFY_ADAPTER)
            _assert_equal(state, got, LORA_FILE)
        finally:
            transformer.delete_adapters(VERIFY_ADAPTER)
    alpha = lora_alpha(cfg.model.lora)
    for wanted, name, convert in (
        (comfyui, COMFYUI_FILE, to_comfyui_keys),
        (kohya, KOHYA_FILE, to_kohya_keys),
    ):
        if wanted:
            keyed = {k: v.contiguous() for k, v in convert(state, alpha, family.comfyui_module).items()}
            save_file(keyed, str(out / name))  # weights in `dtype`, alphas fp32 scalars
            _verify_streamed(keyed, [out / name], str(out / name))
            written.append(out / name)
    return written


def _export_diffusers(cfg: Config, model: torch.nn.Module, out: Path) -> list[Path]:
    root = Path(cfg.model.pretrained)
    _link_or_copy_tree(root, out, skip={"transformer"})
    transformer = merge_lora_in_place(model)
    if (out / "transformer").exists():
        shutil.rmtree(out / "transformer")
    transformer.save_pretrained(str(out / "transformer"))
    # Verify: the written config builds (on the meta device: no weights) a transformer with exactly the
    # written names and shapes, and every written tensor equals the trained one.
    cls = type(transformer)
    with torch.device("meta"):
        skeleton = cls.from_config(cls.load_config(str(out / "transformer")))
    files = sorted((out / "transformer").glob("*.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    written = {}
    for key, value in _read_back(files):
        written[key] = tuple(value.shape)
    if written != shapes:
        diff = sorted(set(written) ^ set(shapes)) or [k for k in shapes if shapes[k] != written.get(k)]
        raise FrameloomError(
            f"export check failed for {out / 'transformer'}: {diff[:3]} do not fit the class"
        )
    _verify_streamed(transformer.state_dict(), files, str(out / "transformer"))
    return [out]


def _export_safetensors(cfg: Config, out: Path, checkpoint: str) -> list[Path]:
    from frameloom.models.registry import get_family

    if get_family(cfg.model.family).pipeline_class is None:  # frameloom's own DiT: its state dict as is
        weights = _checkpoint_weights(cfg, _resolve(cfg, checkpoint))
    else:
        _, model, _ = load_run_denoiser(cfg.run_dir, checkpoint)
        weights = merge_lora_in_place(model).state_dict()
    weights = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    path = out / "model.safetensors"
    save_file(weights, str(path), metadata={"format": "pt", "frameloom.family": cfg.model.family})
    _verify_streamed(weights, [path], str(path))
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
    weights = _checkpoint_weights(cfg, _resolve(cfg, checkpoint))
    return export(cfg, weights, out)


def _export_own_diffusers(cfg: Config, out: Path, checkpoint: str) -> list[Path] | None:
    """A seed family's diffusers form (its ``export_diffusers(cfg, weights, out)``, e.g. dit_class's
    ``DiTTransformer2DModel``), or None when the family has none."""
    import importlib

    try:
        module = importlib.import_module(f"frameloom.models.{cfg.model.family}.family")
    except ModuleNotFoundError:
        return None
    export = getattr(module, "export_diffusers", None)
    if export is None:
        return None
    weights = _checkpoint_weights(cfg, _resolve(cfg, checkpoint))
    return export(cfg, weights, out)


def export_run(
    run_dir: str | os.PathLike,
    *,
    fmt: str,
    out: str | os.PathLike,
    checkpoint: str = "latest",
    comfyui: bool = False,
    kohya: bool = False,
    dtype: str = "bf16",
) -> list[Path]:
    """Export a run's checkpoint in ``fmt`` (``diffusers``, ``lora``, ``safetensors``) into ``out``; returns
    the written paths. Every format is verified by loading it back (module docstring). ``comfyui`` /
    ``kohya`` add the LoRA in those key forms; ``dtype`` (``bf16`` or ``fp32``) is the LoRA files'."""
    if fmt not in FORMATS:
        raise FrameloomError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if (comfyui or kohya) and fmt != "lora":
        raise FrameloomError("--comfyui and --kohya apply to --format lora only")
    if dtype not in DTYPES:
        raise FrameloomError(f"--dtype must be bf16 or fp32, not {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        return _export_safetensors(_run_config(Path(run_dir)), out, checkpoint)
    if fmt == "native":
        return _export_native(_run_config(Path(run_dir)), out, checkpoint)
    if fmt == "diffusers":  # a seed family with its own diffusers form (not a diffusers-pipeline family)
        own = _export_own_diffusers(_run_config(Path(run_dir)), out, checkpoint)
        if own is not None:
            return own
    cfg, model, _ = load_run_denoiser(run_dir, checkpoint)
    if fmt == "lora":
        return _export_lora(cfg, model, out, comfyui, kohya, DTYPES[dtype])
    return _export_diffusers(cfg, model, out)
