"""The `dit_class` family hooks: MiniSora / fast-DiT's class-conditional DiT with learned sigma.

``model.preset`` (``DiT-XL/2`` ... ``DiT-S/8``) + ``model.config`` build a fresh model; ``model.pretrained``
loads a released ``.pt`` (``DiT-XL-2-256x256.pt``, a train.py checkpoint) or a diffusers
``DiTTransformer2DModel`` folder (or a ``DiTPipeline`` folder). ``model.config`` also holds the family's own
options (``DiTClassOptions``). Captions are classes (``labels.ClassLabelEncoder``); the objective is the
improved-DDPM hybrid (``objectives/iddpm.py``); sampling is ``sampling.sample_class_latents``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models.dit_class.convert import (
    SIZES,
    config_from_diffusers,
    config_from_state_dict,
    diffusers_config,
    from_diffusers_state_dict,
    load_released_file,
    load_strict,
    preset_config,
    read_diffusers_config,
    to_diffusers_state_dict,
)
from frameloom.models.dit_class.labels import ClassLabelEncoder
from frameloom.models.dit_class.model import ClassDiT

__all__ = [
    "DiTClassOptions",
    "build_denoiser",
    "build_objective",
    "describe_sampler",
    "export_diffusers",
    "export_released",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "options",
    "sample_videos",
]

MODEL_KEYS = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_classes",
    "null_class",
    "learn_sigma",
    "diffusers_compat",
    "class_embed_std",
)


@dataclass
class DiTClassOptions:
    """The family's keys in ``model.config`` besides the model's constructor arguments (``MODEL_KEYS``)."""

    class_names: list[str] | str | None = None
    """Class names in index order (a list, or a JSON list / text file with one name per line): captions may
    then name a class instead of giving its index (an ImageNet-layout manifest's folder names)."""
    sampler: str = "ddpm"
    """`ddpm` (ancestral, learned variance; DiT's sampler) or `ddim`."""
    ddim_eta: float = 0.0
    """DDIM's eta (0: deterministic)."""
    guidance_channels: int | str = 3
    """Latent channels that classifier-free guidance acts on: 3 as upstream DiT (of SD-VAE's 4), or `all`."""
    clip_denoised: bool | None = None
    """Clamp the predicted x0 to [-1, 1] while sampling; None: only for pixel-space models (DiT does not clip
    latents)."""
    num_train_timesteps: int = 1000
    """Steps of the linear beta schedule (1e-4..0.02 scaled by 1000 / N)."""
    vae_sample: bool = True
    """Encode with a posterior sample as fast-DiT does (seeded by the image's content); false: its mode."""
    sample_batch_size: int = 32
    """Images per sampling batch."""
    model: dict[str, Any] = field(default_factory=dict)
    """The ClassDiT constructor arguments given in model.config."""

    @property
    def guided_channels(self) -> int | None:
        if isinstance(self.guidance_channels, str):
            if self.guidance_channels.strip().lower() == "all":
                return None
            try:
                return int(self.guidance_channels)
            except ValueError:
                raise FrameloomError(
                    f"model.config.guidance_channels must be a number or 'all', not {self.guidance_channels!r}"
                ) from None
        return int(self.guidance_channels)

    def names(self) -> list[str]:
        names = self.class_names
        if names is None:
            return []
        if isinstance(names, list):
            return [str(n) for n in names]
        path = Path(names)
        if not path.is_file():
            raise FrameloomError(f"model.config.class_names: no such file: {path}")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            if isinstance(data, dict):  # {"0": "tench", ...} or {"tench": 0, ...}
                pairs = (
                    {int(k): str(v) for k, v in data.items()}
                    if all(str(k).isdigit() for k in data)
                    else {int(v): str(k) for k, v in data.items()}
                )
                return [pairs[i] for i in sorted(pairs)]
            return [str(n) for n in data]
        return [line.strip() for line in text.splitlines() if line.strip()]


def options(cfg: ModelConfig) -> DiTClassOptions:
    """``model.config`` split into the family options and the model's constructor arguments."""
    known = {f.name for f in dataclasses.fields(DiTClassOptions)} - {"model"}
    raw = dict(cfg.config)
    unknown = sorted(set(raw) - known - set(MODEL_KEYS))
    if unknown:
        raise FrameloomError(
            f"model.config: unknown key(s) {', '.join(unknown)} for dit_class "
            f"(model: {', '.join(MODEL_KEYS)}; family: {', '.join(sorted(known))})"
        )
    opts = DiTClassOptions(**{k: v for k, v in raw.items() if k in known})
    opts.model = {k: v for k, v in raw.items() if k in MODEL_KEYS}
    return opts


# --------------------------------------------------------------------------------------------------------
# denoiser


@functools.lru_cache(maxsize=2)
def _pretrained_config(path: str) -> dict[str, Any]:
    """The config of a pretrained source, read without building the model (text encoder sizing)."""
    p = Path(path)
    if p.is_dir():
        return config_from_diffusers(read_diffusers_config(p))
    return config_from_state_dict(load_released_file(p))


def _from_diffusers(folder: Path, overrides: dict[str, Any]) -> ClassDiT:
    from diffusers import DiTTransformer2DModel

    read_diffusers_config(folder)  # a clear error for a folder without a DiT config
    sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
    try:
        theirs = DiTTransformer2DModel.from_pretrained(str(folder), subfolder=sub, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise FrameloomError(f"cannot load a DiTTransformer2DModel from {folder}: {exc}") from None
    model = ClassDiT(**_merge(config_from_diffusers(dict(theirs.config)), overrides, folder))
    sd = from_diffusers_state_dict(theirs.state_dict(), model.pos_embed.detach().clone())
    load_strict(model, sd, str(folder))
    return model


OPEN_KEYS = ("num_heads", "diffusers_compat", "class_embed_std")
"""Model keys a checkpoint's shapes do not decide: model.config may set them for pretrained weights."""


def _merge(weights_config: dict[str, Any], overrides: dict[str, Any], source: Path) -> dict[str, Any]:
    """The weights' config with ``OPEN_KEYS`` from ``overrides``; any other key of ``overrides`` must agree."""
    for key, value in overrides.items():
        if key not in OPEN_KEYS and key in weights_config and weights_config[key] != value:
            raise FrameloomError(
                f"model.config.{key} = {value!r} contradicts {source} ({key} {weights_config[key]!r})"
            )
    return weights_config | {k: v for k, v in overrides.items() if k in OPEN_KEYS}


def load_denoiser(path: str | Path, overrides: dict[str, Any] | None = None) -> ClassDiT:
    """A released ``.pt`` / train.py checkpoint, or a diffusers DiT folder -> ClassDiT (strict).
    ``overrides`` (model.config's model keys) may set what the weights do not say (``num_heads`` for a
    non-paper width, ``diffusers_compat``); the others must agree with the weights."""
    path = Path(path)
    overrides = dict(overrides or {})
    if path.is_dir():
        return _from_diffusers(path, overrides)
    sd = load_released_file(path)
    config = _merge(config_from_state_dict(sd, num_heads=overrides.get("num_heads")), overrides, path)
    try:
        model = ClassDiT(**config)
    except (TypeError, ValueError) as exc:
        raise FrameloomError(f"model.config: {exc}") from None
    load_strict(model, sd, str(path))
    return model


def model_kwargs(cfg: ModelConfig, latent_channels: int | None = None) -> dict[str, Any]:
    """ClassDiT constructor arguments of a fresh (not pretrained) model: preset, then model.config."""
    kwargs: dict[str, Any] = {}
    if cfg.preset is not None:
        kwargs.update(preset_config(cfg.preset))
    kwargs.update(options(cfg).model)
    if latent_channels:
        kwargs.setdefault("in_channels", latent_channels)
    return kwargs


def build_denoiser(cfg: ModelConfig, latent_channels: int, text_dim: int) -> ClassDiT:  # noqa: ARG001
    """``model.pretrained`` if set (``model.config`` model keys override what the weights leave open), else
    ``model.preset`` + ``model.config``; ``in_channels`` defaults to the codec's latent channels."""
    opts = options(cfg)
    if cfg.pretrained:
        model = load_denoiser(cfg.pretrained, opts.model)
        if latent_channels and model.in_channels != latent_channels:
            raise FrameloomError(
                f"{cfg.pretrained} takes {model.in_channels} latent channels, the codec gives {latent_channels}"
            )
        return model
    try:
        return ClassDiT(**model_kwargs(cfg, latent_channels))
    except (TypeError, ValueError) as exc:
        raise FrameloomError(f"model.config: {exc}") from None


def num_classes(cfg: ModelConfig) -> int:
    if "num_classes" in cfg.config:
        return int(cfg.config["num_classes"])
    if cfg.pretrained:
        return int(_pretrained_config(str(cfg.pretrained))["num_classes"])
    return 1000


# --------------------------------------------------------------------------------------------------------
# encoders and objective


def load_text_encoder(cfg: Config, device: torch.device) -> ClassLabelEncoder:
    """The label encoder (captions are class indices or names; "" is the null class)."""
    return ClassLabelEncoder(num_classes(cfg.model), options(cfg.model).names()).to(device)


def load_codec(cfg: Config, device: torch.device):
    """``pixel`` (the DiT patches pixels) or an ``AutoencoderKL`` directory (SD-VAE; its config's
    ``scaling_factor`` 0.18215 normalizes), encoding with a posterior sample as fast-DiT unless
    ``model.config.vae_sample: false``."""
    from frameloom.models.codecs import DiffusersVAECodec, PixelCodec
    from frameloom.models.dit_class.codec import PosteriorSampleCodec

    if cfg.model.codec == "pixel":
        return PixelCodec()
    path = Path(cfg.model.codec)
    if not path.is_dir():
        raise FrameloomError(f"model.codec: not 'pixel' and not a directory: {path}")
    codec = DiffusersVAECodec.from_pretrained(path, dtype=_dtype(cfg.model.encoder_dtype), device=device)
    return PosteriorSampleCodec.wrap(codec) if options(cfg.model).vae_sample else codec


def _dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise FrameloomError(f"model.encoder_dtype must be one of {', '.join(table)}, not {name!r}")
    return table[name]


def build_objective(cfg: Config):
    """The improved-DDPM hybrid objective (``objective.name: iddpm``)."""
    from frameloom.objectives.iddpm import ImprovedDDPM

    if cfg.objective.name not in ("iddpm",):
        raise FrameloomError(
            f"model.family dit_class trains with objective.name iddpm (learned-variance DDPM), not "
            f"{cfg.objective.name!r}"
        )
    return ImprovedDDPM(options(cfg.model).num_train_timesteps)


# --------------------------------------------------------------------------------------------------------
# sampling


def describe_sampler(model, cfg: Config) -> str:  # noqa: ARG001
    """What ``sample_videos`` integrates with, for the log and the files' metadata."""
    opts = options(cfg.model)
    channels = opts.guided_channels
    where = "all channels" if channels is None else f"the first {channels} channels"
    kind = "DDPM, learned variance" if opts.sampler == "ddpm" else f"DDIM, eta {opts.ddim_eta:g}"
    return (
        f"{kind}, {cfg.sample.steps} of {opts.num_train_timesteps} steps respaced, "
        f"guidance {cfg.sample.guidance:g} on {where}"
    )


@torch.no_grad()
def sample_videos(
    model, text_encoder, codec, cfg: Config, prompts: list[str], seeds: list[int]
) -> torch.Tensor:
    """Images (N, 3, T, H, W) in [-1, 1] for the class captions ``prompts`` with per-sample ``seeds``
    (``sample.steps`` respaced DDPM or DDIM steps, ``sample.guidance`` on ``guidance_channels``)."""
    from frameloom.models.codecs import PixelCodec
    from frameloom.models.dit_class.sampling import sample_class_latents

    opts = options(cfg.model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    autocast = device.type == "cuda" and cfg.train.mixed_precision != "no" and dtype == torch.float32
    labels = text_encoder.labels(prompts).to(device)
    null = getattr(model, "null_label", text_encoder.num_classes)
    if cfg.sample.guidance != 1.0 and not getattr(model, "null_class", True):
        raise FrameloomError("guidance needs a model with a null class (model.config.null_class: true)")
    grid = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    clip = opts.clip_denoised if opts.clip_denoised is not None else isinstance(codec, PixelCodec)

    def call(x, t, class_labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x.to(dtype), t, class_labels=class_labels)

    out = []
    for start in range(0, len(prompts), opts.sample_batch_size):
        end = start + opts.sample_batch_size
        latent = sample_class_latents(
            call,
            labels[start:end],
            seeds[start:end],
            (codec.latent_channels, *grid),
            null_label=null,
            steps=cfg.sample.steps,
            guidance=cfg.sample.guidance,
            guidance_channels=opts.guided_channels,
            sampler=opts.sampler,
            eta=opts.ddim_eta,
            clip_denoised=clip,
            num_train_timesteps=opts.num_train_timesteps,
        )
        out.append(codec.decode(latent.float()).float().clamp(-1, 1).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------
# export


def export_diffusers(cfg: Config, weights: dict[str, torch.Tensor], out: Path) -> list[Path]:
    """``frameloom export --format diffusers``: ``export_released(..., "diffusers")``."""
    return export_released(cfg, weights, out, "diffusers")


def export_released(
    cfg: Config, weights: dict[str, torch.Tensor], out: Path, fmt: str = "native"
) -> list[Path]:
    """Write a run's weights in the released layouts, verified by loading them back:
    ``native`` -> ``<out>/DiT-<size>-<patch>-<res>x<res>.pt`` (a plain state dict, DiT's ``torch.load``-able
    file); ``diffusers`` -> a ``DiTTransformer2DModel`` in ``<out>/transformer`` with a ``DDPMScheduler`` in
    ``<out>/scheduler`` (and a whole ``DiTPipeline`` when ``model.codec`` is a VAE directory)."""
    channels = int(weights["x_embedder.proj.weight"].shape[1])  # the codec's latent channels the run used
    model = build_denoiser(cfg.model, channels, 0)
    load_strict(model, weights, "the checkpoint")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if fmt == "native":
        name = "dit.pt"
        if cfg.model.preset is not None:
            size, patch = preset_name(cfg.model.preset)
            res = model.config["input_size"] * _pixel_factor(cfg)
            name = f"DiT-{size}-{patch}-{res}x{res}.pt"
        path = out / name
        torch.save(sd, path)
        back = load_released_file(path)
        _check_same(sd, back, str(path))
        return [path]
    if fmt != "diffusers":
        raise FrameloomError(f"dit_class exports --format native or diffusers, not {fmt!r}")
    return _export_diffusers(cfg, model, sd, out)


def preset_name(preset: str) -> tuple[str, int]:
    """``DiT-XL/2`` -> ("XL", 2)."""
    kw = preset_config(preset)
    size = next(s for s, (d, h, _) in SIZES.items() if (d, h) == (kw["depth"], kw["hidden_size"]))
    return size, kw["patch_size"]


def _pixel_factor(cfg: Config) -> int:
    return 1 if cfg.model.codec == "pixel" else 8


def _check_same(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    if set(expected) != set(got):
        raise FrameloomError(f"export check failed for {what}: keys differ")
    for k, v in expected.items():
        if not torch.equal(v, got[k].to(v.dtype)):
            raise FrameloomError(f"export check failed for {what}: {k} differs after loading back")


def _export_diffusers(cfg: Config, model: ClassDiT, sd: dict[str, torch.Tensor], out: Path) -> list[Path]:
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    theirs = DiTTransformer2DModel(**diffusers_config(model.config))
    converted = to_diffusers_state_dict(sd)
    load_strict(theirs, converted, "the converted weights")
    scheduler = DDPMScheduler(
        num_train_timesteps=options(cfg.model).num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4 * 1000 / options(cfg.model).num_train_timesteps,
        beta_end=0.02 * 1000 / options(cfg.model).num_train_timesteps,
        prediction_type="epsilon",
        variance_type="fixed_small",  # DiTPipeline drops the learned variance before scheduler.step
        clip_sample=False,
    )
    if cfg.model.codec != "pixel":
        from diffusers import AutoencoderKL, DiTPipeline

        vae = AutoencoderKL.from_pretrained(cfg.model.codec, local_files_only=True)
        DiTPipeline(transformer=theirs, vae=vae, scheduler=scheduler).save_pretrained(str(out))
    else:
        theirs.save_pretrained(str(out / "transformer"))
        scheduler.save_pretrained(str(out / "scheduler"))
    back = DiTTransformer2DModel.from_pretrained(str(out), subfolder="transformer", local_files_only=True)
    _check_same(converted, back.state_dict(), str(out / "transformer"))
    return [out]
