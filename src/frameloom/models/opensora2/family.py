"""The ``opensora2`` family: Open-Sora 2.0's MMDiT, its autoencoders, text encoders, recipe and sampler.

Config (``model.*``; docs/opensora2.md has every key):

- ``model.preset``: ``11B`` (the released ``Open_Sora_v2``: 19 double + 38 single blocks, 3072 wide,
  ``cond_in``) or ``11B_dc_ae`` (the same at patch 1 over the 128-channel DC-AE); ``model.config`` overrides
  any ``MMDiTConfig`` field (``model.py``).
- ``model.pretrained``: a released-layout ``.safetensors`` file (or a folder holding one, e.g. an export),
  loaded strictly; ``model.config.pretrained_format: flux`` converts a Flux-dev checkpoint first
  (``weights.flux_to_opensora``). ``model.config.drop_keys`` / ``new_keys`` (key prefixes) allow a stage
  change that drops or adds parameters (e.g. ``[cond_in]``), and the loader says which keys it concerned.
- ``model.codec``: the HunyuanVideo VAE (a diffusers folder or ``hunyuan_vae.safetensors``), or with
  ``model.config.autoencoder: dc_ae`` the DC-AE's released file; ``model.config.autoencoder_config`` overrides
  the autoencoder's constructor arguments (tiny models in tests). ``model.vae_tiling`` tiles either.
- ``model.text_encoder`` (T5, ``model.text_max_length`` 512) and ``model.config.clip`` (CLIP-L, 77 tokens):
  local folders, or ``tiny-byt5`` / ``tiny-clip`` for tests (built beside the run).
- ``model.config.condition_config``: the image-conditioning mix ``{t2v: 1, i2v_head: 5, ...}``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError

from .model import MMDiTConfig, OpenSoraMMDiT
from .weights import flux_to_opensora, load_strict, read_state_dict

__all__ = [
    "PRESETS",
    "Settings",
    "build_denoiser",
    "build_objective",
    "export_released",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "sample_videos",
    "settings",
]

log = logging.getLogger("frameloom.opensora2")

#: ``model.preset`` -> ``MMDiTConfig`` fields (hpcaitech/Open-Sora configs/diffusion/inference/256px.py and
#: high_compression.py).
PRESETS: dict[str, dict[str, Any]] = {
    "11B": {"in_channels": 64, "patch_size": 2, "cond_embed": True},
    "11B_dc_ae": {"in_channels": 128, "patch_size": 1, "cond_embed": True},
}
#: Released file names by preset (``export_released`` writes the one matching the model).
RELEASED_NAMES = {2: "Open_Sora_v2.safetensors", 1: "Open_Sora_v2_Video_DC_AE.safetensors"}
TINY_CLIP = "tiny-clip"


@dataclass
class Settings:
    """``model.config`` split into the MMDiT's arguments and the family's own keys."""

    mmdit: dict[str, Any] = field(default_factory=dict)
    pretrained_format: str = "opensora"
    """``opensora`` (released layout) or ``flux`` (a BFL Flux checkpoint, converted on load)."""
    drop_keys: list[str] = field(default_factory=list)
    new_keys: list[str] = field(default_factory=list)
    autoencoder: str = "hunyuan_vae"
    """``hunyuan_vae`` or ``dc_ae``."""
    autoencoder_config: dict[str, Any] = field(default_factory=dict)
    clip: str | None = None
    clip_max_length: int = 77
    condition_config: dict[str, float] = field(default_factory=dict)
    validation_images: list[str] = field(default_factory=list)


def settings(model_cfg: ModelConfig) -> Settings:
    """Parse ``model.config`` (unknown non-MMDiT keys are MMDiT arguments; ``MMDiTConfig`` rejects typos)."""
    own = set(Settings.__dataclass_fields__) - {"mmdit"}
    values = dict(model_cfg.config)
    s = Settings(
        mmdit={k: v for k, v in values.items() if k not in own},
        **{k: v for k, v in values.items() if k in own},
    )
    if s.pretrained_format not in ("opensora", "flux"):
        raise FrameloomError(
            f"model.config.pretrained_format must be opensora or flux, not {s.pretrained_format!r}"
        )
    if s.autoencoder not in ("hunyuan_vae", "dc_ae"):
        raise FrameloomError(f"model.config.autoencoder must be hunyuan_vae or dc_ae, not {s.autoencoder!r}")
    return s


# --------------------------------------------------------------------------------------------------------
# the denoiser


def _clip_width(s: Settings) -> int | None:
    """The CLIP text model's width (its pooled vector's), read from its config; None when unknown."""
    if s.clip == TINY_CLIP:
        return 16  # build_tiny_clip's default width
    config = Path(s.clip) / "config.json" if s.clip else None
    if config is None or not config.is_file():
        return None
    data = json.loads(config.read_text())
    return int(data.get("text_config", data).get("hidden_size"))


def mmdit_config(model_cfg: ModelConfig, latent_channels: int = 0, text_dim: int = 0) -> MMDiTConfig:
    """The MMDiT's config: ``model.preset``, then ``model.config``, then sizes from the encoders (checked)."""
    s = settings(model_cfg)
    kwargs: dict[str, Any] = {}
    if model_cfg.preset is not None:
        if model_cfg.preset not in PRESETS:
            raise FrameloomError(
                f"unknown model.preset {model_cfg.preset!r}; available: {', '.join(PRESETS)}"
            )
        kwargs.update(PRESETS[model_cfg.preset])
    kwargs.update(s.mmdit)
    patch = int(kwargs.get("patch_size", 2))
    if latent_channels:
        kwargs.setdefault("in_channels", latent_channels * patch**2)
        if kwargs["in_channels"] != latent_channels * patch**2:
            raise FrameloomError(
                f"the autoencoder has {latent_channels} latent channels: in_channels must be "
                f"{latent_channels * patch**2} at patch_size {patch}, not {kwargs['in_channels']}"
            )
    if text_dim:
        kwargs.setdefault("context_in_dim", text_dim)
        if kwargs["context_in_dim"] != text_dim:
            raise FrameloomError(
                f"the T5 encoder has width {text_dim}, context_in_dim is {kwargs['context_in_dim']}"
            )
    width = _clip_width(s)
    if width is not None:
        kwargs.setdefault("vec_in_dim", width)
    if "axes_dim" in kwargs:
        kwargs["axes_dim"] = list(kwargs["axes_dim"])
    try:
        return MMDiTConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise FrameloomError(f"model.config: {exc}") from None


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise FrameloomError(f"model.pretrained {path}: expected one .safetensors file, found {len(files)}")
    raise FrameloomError(f"model.pretrained not found: {path}")


def load_weights(model: OpenSoraMMDiT, path: str | Path, s: Settings) -> None:
    """Load a released-layout (or, with ``pretrained_format: flux``, a Flux) checkpoint strictly."""
    file = _weights_file(Path(path))
    state = read_state_dict(file)
    drop = list(s.drop_keys)
    if s.pretrained_format == "flux":
        state, dropped = flux_to_opensora(state)
        if dropped:
            log.warning("%s: Flux -> Open-Sora 2.0 conversion dropped %s", file, ", ".join(sorted(dropped)))
    load_strict(model, state, source=str(file), drop_keys=drop, new_keys=s.new_keys)


def build_denoiser(model_cfg: ModelConfig, latent_channels: int, text_dim: int) -> OpenSoraMMDiT:
    """The MMDiT from ``model.preset`` + ``model.config`` (sizes checked against the encoders), with
    ``model.pretrained``'s weights when set, in ``model.dtype``."""
    from frameloom.models.diffusers_family import parse_dtype

    if model_cfg.lora.rank > 0:
        raise FrameloomError(
            "model.family opensora2 trains all weights; LoRA is not available (model.lora.rank: 0)"
        )
    s = settings(model_cfg)
    model = OpenSoraMMDiT(mmdit_config(model_cfg, latent_channels, text_dim))
    if model_cfg.pretrained:
        load_weights(model, model_cfg.pretrained, s)
    return model.to(parse_dtype(model_cfg.dtype, "model.dtype"))


def load_denoiser(path: str | Path) -> OpenSoraMMDiT:
    """A folder written by ``export_released`` (``config.json`` + the released-layout file) -> the MMDiT."""
    root = Path(path)
    config = root / "config.json"
    if not config.is_file():
        raise FrameloomError(f"{root}: no config.json (an opensora2 export folder)")
    model = OpenSoraMMDiT(MMDiTConfig(**json.loads(config.read_text())))
    load_strict(model, read_state_dict(_weights_file(root)), source=str(root))
    return model


def export_released(cfg: Config, weights: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """Write ``Open_Sora_v2.safetensors`` (``Open_Sora_v2_Video_DC_AE.safetensors`` at patch 1) with the
    released key names, plus frameloom's ``config.json``; verified by loading both back strictly."""
    from safetensors.torch import load_file, save_file

    patch = int({**PRESETS.get(cfg.model.preset or "", {}), **settings(cfg.model).mmdit}.get("patch_size", 2))
    config = mmdit_config(  # the encoders' sizes, read off the trained input layers
        cfg.model, weights["img_in.weight"].shape[1] // patch**2, weights["txt_in.weight"].shape[1]
    )
    model = OpenSoraMMDiT(config)
    load_strict(model, weights, source="the checkpoint")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    path = out / RELEASED_NAMES.get(config.patch_size, RELEASED_NAMES[2])
    save_file(state, str(path), metadata={"format": "pt", "frameloom.family": "opensora2"})
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    back = load_file(str(path))
    if set(back) != set(state) or any(not torch.equal(back[k], v) for k, v in state.items()):
        raise FrameloomError(f"export check failed for {path}: the file does not read back to the weights")
    load_denoiser(out)  # frameloom's own loader, strict
    return [path, out / "config.json"]


# --------------------------------------------------------------------------------------------------------
# encoders, objective, sampler


def load_codec(cfg: Config, device: torch.device):
    """The HunyuanVideo VAE or the video DC-AE (``model.config.autoencoder``) from ``model.codec``."""
    from frameloom.models.diffusers_family import parse_dtype

    from .codecs import load_dc_ae, load_hunyuan_vae

    s = settings(cfg.model)
    if not cfg.model.codec or cfg.model.codec == "pixel":
        raise FrameloomError(
            "model.codec: set the autoencoder (the HunyuanVideo VAE folder or hunyuan_vae.safetensors; with "
            "model.config.autoencoder: dc_ae the DC-AE's .safetensors)"
        )
    dtype = parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype")
    if s.autoencoder == "dc_ae":
        return load_dc_ae(
            cfg.model.codec,
            overrides=s.autoencoder_config,
            dtype=dtype,
            device=device,
            tiling=cfg.model.vae_tiling,
        )
    return load_hunyuan_vae(
        cfg.model.codec,
        overrides=s.autoencoder_config,
        dtype=dtype,
        device=device,
        tiling=cfg.model.vae_tiling,
        slicing=cfg.model.vae_slicing,
    )


def _clip_dir(cfg: Config, s: Settings) -> Path:
    if s.clip == TINY_CLIP:
        from .text import build_tiny_clip

        path = Path(cfg.run_dir).resolve().parent / ".frameloom_models" / TINY_CLIP
        if not (path / "config.json").exists():
            build_tiny_clip(path, seed=0)
        return path
    if not s.clip:
        raise FrameloomError("model.config.clip is not set (a local CLIP-L text model folder, or tiny-clip)")
    return Path(s.clip)


def load_text_encoder(cfg: Config, device: torch.device):
    """T5 (``model.text_encoder``, fixed ``model.text_max_length`` tokens, unmasked) + CLIP pooled."""
    from frameloom.models.diffusers_family import parse_dtype
    from frameloom.pipeline import text_encoder_dir

    from .text import load_text_encoder as load

    s = settings(cfg.model)
    return load(
        text_encoder_dir(cfg),
        _clip_dir(cfg, s),
        t5_max_length=cfg.model.text_max_length or 512,  # null: Open-Sora 2.0's 512
        clip_max_length=s.clip_max_length,
        dtype=parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
    )


def build_objective(cfg: Config):
    """Open-Sora 2.0's flow matching (``objective.shift`` null or auto: its automatic shift, a number: that
    shift; ``s_min`` 1e-5) and the image-conditioning mix of ``model.config.condition_config``."""
    from frameloom.objectives.flow import OPENSORA_SIGMA_MIN, FlowMatching

    from .objective import OpenSoraFlow

    o = cfg.objective
    if o.name not in (None, "flow"):  # null: the family's own
        raise FrameloomError(f"model.family opensora2 trains with objective.name=flow, not {o.name!r}")
    s = settings(cfg.model)
    if s.condition_config and not mmdit_config(cfg.model).cond_embed:
        raise FrameloomError(
            "model.config.condition_config needs a model with cond_in (model.config.cond_embed: true)"
        )
    try:
        flow = FlowMatching(
            timestep_sampling=o.timestep_sampling or "logit_normal",  # null: the family's own
            logit_mean=o.logit_mean,
            logit_std=o.logit_std,
            shift="auto" if o.shift in (None, "auto") else float(o.shift),  # null: its automatic shift
            s_min=OPENSORA_SIGMA_MIN,
        )
    except ValueError as exc:
        raise FrameloomError(f"objective: {exc}") from None
    return OpenSoraFlow(flow, dict(s.condition_config))


def sample_videos(model, text_encoder, codec, cfg: Config, prompts, seeds, images=None) -> torch.Tensor:
    """``frameloom sample`` / validation: Open-Sora 2.0's sampler (sampling/opensora2.py)."""
    from frameloom.sampling.opensora2 import sample_videos as sample

    return sample(model, text_encoder, codec, cfg, prompts, seeds, images)
