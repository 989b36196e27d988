"""The ``wan`` family: Wan 2.1 text-to-video and image-to-video from a local diffusers directory
(``model.pretrained``) with ``WanTransformer3DModel``, ``AutoencoderKLWan``, ``UMT5EncoderModel`` + tokenizer,
a flow-matching scheduler config, and for I2V ``CLIPVisionModel`` + ``CLIPImageProcessor``.

Which variant a directory is follows from its transformer config: ``image_dim`` set = I2V (Wan 2.1 I2V:
1280, the CLIP ViT-H width). Objective: flow matching (``noise - x0``, ``t = sigma``, transformer timestep
``1000 t``), times drawn by ``objective.timestep_sampling`` and shifted by the scheduler config's shift
(``flow_shift`` 3.0 for Wan 2.1 480p, 5.0 for 720p); ``objective.shift`` other than 1 overrides it. Latents
are the VAE's, normalized per channel ``(z - latents_mean) / latents_std``. I2V conditioning: wan/i2v.py.
``model.config.validation_images``: one image per validation prompt (I2V).
"""

from __future__ import annotations

from pathlib import Path

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models import diffusers_family as df
from frameloom.models.codecs import DiffusersVAECodec
from frameloom.models.wan.adapter import WanDenoiser
from frameloom.models.wan.i2v import ConditionedFlow, WanI2VCodec, image_channels, pack_image_embeds
from frameloom.models.wan.text import WanTextEncoder
from frameloom.sampling.family_sampling import (
    decode_latents,
    flow_match_sigmas,
    flow_sample_latents,
    folder_scheduler,
    is_euler,
    scheduler_shift,
    validate_with_pipeline,
    validation_images,
)

__all__ = [
    "build_denoiser",
    "build_objective",
    "comfyui_module",
    "describe_sampler",
    "input_shapes",
    "is_i2v",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "sample_latents",
    "sample_videos",
    "validate",
]

I2V_PARTS = ("image_encoder", "image_processor")


def is_i2v(root: str | Path) -> bool:
    """Whether ``root`` holds Wan I2V: its transformer takes image tokens (``image_dim`` set)."""
    return df.part_config(root, "transformer").get("image_dim") is not None


def _parts(model_cfg: ModelConfig) -> tuple[str, ...]:
    """The parts the directory must have: I2V adds the image encoder and processor."""
    root = df.check_pretrained(model_cfg, df.PARTS)
    return df.PARTS + I2V_PARTS if is_i2v(root) else df.PARTS


def load_codec(cfg: Config, device: torch.device):
    """T2V: the frozen ``AutoencoderKLWan`` codec; I2V: ``WanI2VCodec`` (VAE + CLIP image encoder)."""
    parts = _parts(cfg.model)
    codec_cls = WanI2VCodec if parts != df.PARTS else DiffusersVAECodec
    return df.load_vae_codec(cfg, device, codec_cls, parts=parts)


#: Wan 2.1's text length: its pipelines (``max_sequence_length``) and ComfyUI pad every caption to 512 tokens.
TEXT_LENGTH = 512


def load_text_encoder(cfg: Config, device: torch.device):
    """UMT5 with Wan's prompt cleaning (wan/text.py), ``model.text_max_length`` tokens (null: 512),
    ``model.id_token``."""
    return df.load_text_encoder(
        cfg, device, WanTextEncoder, default_length=TEXT_LENGTH, parts=_parts(cfg.model)
    )


def build_denoiser(model_cfg: ModelConfig, latent_channels: int, text_dim: int) -> WanDenoiser:
    """The pretrained transformer (LoRA when ``model.lora.rank > 0``) in frameloom's layout; the text is
    zero-padded to ``model.text_max_length`` tokens (null: 512, what Wan 2.1 was trained with).

    ``latent_channels``/``text_dim`` are checked against the transformer when given (> 0).
    """
    root = df.check_pretrained(model_cfg, _parts(model_cfg))
    transformer = df.load_trainable_transformer(model_cfg)
    config = transformer.config
    df.check_widths(latent=(latent_channels, config.out_channels), text=(text_dim, config.text_dim))
    image_tokens = None
    if config.image_dim is not None:
        vision = df.part_config(root, "image_encoder")
        vision = vision.get("vision_config", vision)
        image_tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
        if int(vision["hidden_size"]) != config.image_dim:
            raise FrameloomError(
                f"the image encoder has width {vision['hidden_size']}, the transformer expects {config.image_dim}"
            )
    return WanDenoiser(
        transformer,
        root,
        model_cfg.lora,
        text_len=df.text_length(model_cfg, TEXT_LENGTH),
        image_tokens=image_tokens,
    )


def input_shapes(cfg: Config):
    """Latent and text shapes from the directory's configs (``frameloom plan``); an I2V clip's latent also
    carries the condition and the packed image tokens (wan/i2v.py)."""
    from frameloom.memory.plan import InputShapes

    root = df.check_pretrained(cfg.model, _parts(cfg.model))
    channels, compression = df.vae_latent_shape(root)
    text_dim = int(df.part_config(root, "transformer")["text_dim"])
    extra = None
    if is_i2v(root):
        vision = df.part_config(root, "image_encoder")
        vision = vision.get("vision_config", vision)
        tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
        dim = int(vision["hidden_size"])

        def extra(grid, channels=channels, tokens=tokens, dim=dim):
            return channels + image_channels(tokens, dim, grid)

    return InputShapes(channels, compression, df.text_length(cfg.model, TEXT_LENGTH), text_dim, extra)


def load_denoiser(path: str) -> WanDenoiser:
    """A diffusers directory (or its ``transformer/`` folder) -> the full-weights denoiser, no LoRA, with Wan
    2.1's 512 text positions."""
    return df.load_pretrained_denoiser(build_denoiser, "wan", path)


def build_objective(cfg: Config):
    """Flow matching with the scheduler config's shift (``objective.shift: null``) and uniform times
    (``objective.timestep_sampling: null``); I2V: only the latent channels are noised."""
    root = df.check_pretrained(cfg.model, _parts(cfg.model))
    flow = df.flow_objective(
        cfg, scheduler_shift(df.part_config(root, "scheduler")), default_sampling="uniform"
    )
    if not is_i2v(root):
        return flow
    return ConditionedFlow(flow, int(df.part_config(root, "vae").get("z_dim", 16)))


def _solver(model: WanDenoiser, cfg: Config) -> dict:
    """``flow_sample_latents``' solver arguments: the folder's scheduler (``sample.scheduler: auto``), or
    Euler on the shifted grid (``euler``, or when the folder's scheduler is FlowMatchEuler: the same thing).
    ``sample.shift`` (null: the scheduler's) replaces the folder's shift in both."""
    if cfg.sample.scheduler not in ("auto", "euler"):
        raise FrameloomError(f"sample.scheduler must be auto or euler, not {cfg.sample.scheduler!r}")
    scheduler = folder_scheduler(model.pretrained, cfg.sample.shift)
    if cfg.sample.scheduler == "auto" and not is_euler(scheduler):
        return {"scheduler": scheduler, "steps": cfg.sample.steps}
    return {"sigmas": flow_match_sigmas(cfg.sample.steps, dict(scheduler.config))}


def describe_sampler(model: WanDenoiser, cfg: Config) -> str:
    """What ``sample_videos`` integrates with, for the log and the mp4 metadata."""
    solver = _solver(model, cfg)
    config = df.part_config(model.pretrained, "scheduler")
    shift = cfg.sample.shift if cfg.sample.shift is not None else scheduler_shift(config)
    name = type(solver["scheduler"]).__name__ if "scheduler" in solver else "Euler (FlowMatchEuler grid)"
    return f"{name}, {cfg.sample.steps} steps, shift {shift:g}, guidance {cfg.sample.guidance:g}"


@torch.no_grad()
def sample_latents(
    model: WanDenoiser,
    text_encoder,
    codec,
    cfg: Config,
    prompts,
    seeds,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalized latents ``(N, C, t, h, w)`` with the folder's scheduler (``_solver``); I2V takes
    ``images`` ``(N, 3, H, W)`` in [-1, 1] (or ``model.config.validation_images``)."""
    grid = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    conditions = None
    if model.i2v:
        if images is None:
            images = validation_images(cfg, len(prompts))
        cond, image = codec.condition(images.to(codec.device), cfg.data.num_frames)
        conditions = torch.cat([cond.float(), pack_image_embeds(image.float(), grid)], dim=1)
    return flow_sample_latents(
        model,
        text_encoder,
        prompts,
        seeds=seeds,
        latent_shape=(model.latent_channels, *grid),
        guidance=cfg.sample.guidance,
        negative_prompt=cfg.sample.negative_prompt,
        conditions=conditions,
        **_solver(model, cfg),
    )


@torch.no_grad()
def sample_videos(model, text_encoder, codec, cfg: Config, prompts, seeds, images=None) -> torch.Tensor:
    """Videos ``(N, 3, T, H, W)`` in [-1, 1] (the family ``sample`` hook)."""
    return decode_latents(codec, sample_latents(model, text_encoder, codec, cfg, prompts, seeds, images))


@torch.no_grad()
def validate(model: WanDenoiser, text_encoder, codec, cfg: Config, out_dir) -> list[Path]:
    """``validation.prompts`` through ``WanPipeline`` / ``WanImageToVideoPipeline`` around the in-training
    transformer (LoRA active); I2V takes ``model.config.validation_images`` and the codec's CLIP parts."""
    if not model.i2v:
        return validate_with_pipeline(model, text_encoder, codec, cfg, out_dir)
    from PIL import Image

    images = validation_images(cfg, len(cfg.validation.prompts))
    u8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return validate_with_pipeline(
        model,
        text_encoder,
        codec,
        cfg,
        out_dir,
        extra=lambda i: {"image": Image.fromarray(u8[i])},  # the pipeline's image processor takes PIL
        image_encoder=codec.image_encoder,
        image_processor=codec.image_processor,
    )


# diffusers module path -> the original Wan / ComfyUI path (the inverse of diffusers' Wan LoRA conversion,
# diffusers/loaders/lora_conversion_utils.py: _convert_non_diffusers_wan_lora_to_diffusers).
_COMFY_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
_COMFY_TOP = {
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
    "patch_embedding": "patch_embedding",
}


def comfyui_module(path: str) -> str:
    """A diffusers module path of ``WanTransformer3DModel`` -> its name in the original Wan checkpoints,
    which ComfyUI uses: ``blocks.3.attn1.to_q`` -> ``blocks.3.self_attn.q`` (docs/families.md has the table)."""
    parts = path.split(".")
    if len(parts) > 2 and parts[0] == "blocks":
        rest = ".".join(parts[2:])
        if rest in _COMFY_BLOCK:
            return f"blocks.{parts[1]}.{_COMFY_BLOCK[rest]}"
    if path in _COMFY_TOP:
        return _COMFY_TOP[path]
    raise FrameloomError(
        f"no ComfyUI name for the Wan module {path!r} (choose other model.lora.target_modules)"
    )
