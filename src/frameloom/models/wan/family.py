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

import json
from pathlib import Path

import torch

from frameloom.config.schema import Config, ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models import diffusers_family as df
from frameloom.models.wan.adapter import WanDenoiser
from frameloom.models.wan.i2v import ConditionedFlow, WanI2VCodec
from frameloom.models.wan.sampling import flow_sample_latents, validate_with_pipeline
from frameloom.models.wan.schedule import flow_match_sigmas, load_scheduler_config, scheduler_shift
from frameloom.models.wan.text import WanTextEncoder, load_t5_like
from frameloom.objectives.flow import FlowMatching

__all__ = [
    "build_denoiser",
    "build_objective",
    "comfyui_module",
    "family",
    "is_i2v",
    "load_codec",
    "load_denoiser",
    "load_text_encoder",
    "sample_videos",
    "validate",
]

PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
I2V_PARTS = ("image_encoder", "image_processor")


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FrameloomError(f"cannot read {path}: {exc}") from None


def is_i2v(root: str | Path) -> bool:
    """Whether ``root`` holds Wan I2V: its transformer takes image tokens (``image_dim`` set)."""
    return _json(Path(root) / "transformer" / "config.json").get("image_dim") is not None


def _root(model_cfg: ModelConfig) -> Path:
    root = df.check_pretrained(model_cfg, PARTS)
    if is_i2v(root):
        df.check_pretrained(model_cfg, PARTS + I2V_PARTS)
    return root


def load_codec(cfg: Config, device: torch.device):
    """T2V: the frozen ``AutoencoderKLWan`` codec; I2V: ``WanI2VCodec`` (VAE + CLIP image encoder)."""
    root = _root(cfg.model)
    if not is_i2v(root):
        return df.load_vae_codec(cfg, device)
    return WanI2VCodec.from_pretrained(
        root,
        dtype=df.parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
        tiling=cfg.model.vae_tiling,
        slicing=cfg.model.vae_slicing,
    )


def load_text_encoder(cfg: Config, device: torch.device):
    """UMT5 with Wan's prompt cleaning (wan/text.py), ``model.text_max_length`` tokens, ``model.id_token``."""
    root = _root(cfg.model)
    encoder = load_t5_like(
        root,
        WanTextEncoder,
        max_length=cfg.model.text_max_length,
        dtype=df.parse_dtype(cfg.model.encoder_dtype, "model.encoder_dtype"),
        device=device,
    )
    return df.with_id_token(encoder, cfg.model.id_token)


def build_denoiser(model_cfg: ModelConfig, latent_channels: int, text_dim: int) -> WanDenoiser:
    """The pretrained transformer (LoRA when ``model.lora.rank > 0``) in frameloom's layout; the text is
    zero-padded to ``model.text_max_length`` tokens (Wan 2.1 was trained with 512).

    ``latent_channels``/``text_dim`` are checked against the transformer when given (> 0).
    """
    root = _root(model_cfg)
    transformer = df.load_trainable_transformer(model_cfg)
    config = transformer.config
    if latent_channels and latent_channels != config.out_channels:
        raise FrameloomError(
            f"the VAE has {latent_channels} latent channels, the transformer predicts {config.out_channels}"
        )
    if text_dim and text_dim != config.text_dim:
        raise FrameloomError(
            f"the text encoder has dim {text_dim}, the transformer expects {config.text_dim}"
        )
    image_tokens = None
    if config.image_dim is not None:
        vision = _json(root / "image_encoder" / "config.json")
        vision = vision.get("vision_config", vision)
        image_tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2 + 1
        if int(vision["hidden_size"]) != config.image_dim:
            raise FrameloomError(
                f"the image encoder has width {vision['hidden_size']}, the transformer expects {config.image_dim}"
            )
    return WanDenoiser(
        transformer, root, model_cfg.lora, text_len=model_cfg.text_max_length, image_tokens=image_tokens
    )


def load_denoiser(path: str) -> WanDenoiser:
    """A diffusers directory (or its ``transformer/`` folder) -> the full-weights denoiser, no LoRA."""
    root = Path(path)
    pretrained = root if (root / "model_index.json").is_file() else root.parent
    return build_denoiser(ModelConfig(family="wan", pretrained=str(pretrained), text_max_length=512), 0, 0)


def _flow(cfg: Config, default_shift: float) -> FlowMatching:
    o = cfg.objective
    if o.name != "flow":
        raise FrameloomError(
            f"model.family {cfg.model.family} trains with objective.name=flow, not {o.name!r}"
        )
    try:
        return FlowMatching(
            timestep_sampling=o.timestep_sampling,
            logit_mean=o.logit_mean,
            logit_std=o.logit_std,
            shift=float(o.shift) if o.shift != 1.0 else default_shift,
        )
    except ValueError as exc:
        raise FrameloomError(f"objective: {exc}") from None


def build_objective(cfg: Config):
    """Flow matching with the scheduler config's shift; I2V: only the latent channels are noised."""
    root = _root(cfg.model)
    flow = _flow(cfg, scheduler_shift(load_scheduler_config(root)))
    if not is_i2v(root):
        return flow
    channels = int(_json(root / "vae" / "config.json").get("z_dim", 16))
    return ConditionedFlow(flow, channels)


def _sigmas(model: WanDenoiser, cfg: Config) -> torch.Tensor:
    config = load_scheduler_config(model.pretrained)
    if cfg.sample.shift != 1.0:  # an explicit sampling shift replaces the scheduler's
        config = {**config, "shift": float(cfg.sample.shift), "flow_shift": float(cfg.sample.shift)}
    return flow_match_sigmas(cfg.sample.steps, config)


def _validation_images(cfg: Config, n: int) -> torch.Tensor:
    from frameloom.models.cogvideox.sampling import load_images  # the shared image reader of I2V families

    paths = list(cfg.model.config.get("validation_images") or [])
    if not paths:
        raise FrameloomError(
            "an image-to-video model needs model.config.validation_images (one image per prompt)"
        )
    return load_images([paths[i % len(paths)] for i in range(n)], cfg.data.height, cfg.data.width)


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
    """Normalized latents ``(N, C, t, h, w)``; I2V takes ``images`` ``(N, 3, H, W)`` in [-1, 1] (or
    ``model.config.validation_images``)."""
    grid = codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    conditions = None
    if model.i2v:
        from frameloom.models.wan.i2v import pack_image_embeds

        if images is None:
            images = _validation_images(cfg, len(prompts))
        cond, image = codec.condition(images.to(codec.device), cfg.data.num_frames)
        conditions = torch.cat([cond.float(), pack_image_embeds(image.float(), grid)], dim=1)
    return flow_sample_latents(
        model,
        text_encoder,
        prompts,
        seeds=seeds,
        latent_shape=(model.latent_channels, *grid),
        sigmas=_sigmas(model, cfg),
        guidance=cfg.sample.guidance,
        negative_prompt=cfg.sample.negative_prompt,
        conditions=conditions,
    )


@torch.no_grad()
def sample_videos(model, text_encoder, codec, cfg: Config, prompts, seeds, images=None) -> torch.Tensor:
    """Videos ``(N, 3, T, H, W)`` in [-1, 1] (the family ``sample`` hook; wan/sampling.py)."""
    latents = sample_latents(model, text_encoder, codec, cfg, prompts, seeds, images)
    return torch.cat([codec.decode(x[None]).float().clamp(-1, 1).cpu() for x in latents])


def build_pipeline(model: WanDenoiser, text_encoder, codec):
    """``WanPipeline`` / ``WanImageToVideoPipeline`` around the in-training transformer and the loaded parts."""
    if not model.i2v:
        return df.build_pipeline(model.pretrained, model.transformer, text_encoder, codec)
    from diffusers import WanImageToVideoPipeline

    te = getattr(text_encoder, "inner", text_encoder)
    scheduler_cls = df._component_class(Path(model.pretrained), "scheduler")
    return WanImageToVideoPipeline(
        tokenizer=te.tokenizer,
        text_encoder=te.model,
        vae=codec.vae,
        scheduler=scheduler_cls.from_pretrained(str(model.pretrained), subfolder="scheduler"),
        image_processor=codec.image_processor,
        image_encoder=codec.image_encoder,
        transformer=model.transformer,
    )


@torch.no_grad()
def validate(model: WanDenoiser, text_encoder, codec, cfg: Config, out_dir) -> list[Path]:
    """``validation.prompts`` through the Wan pipeline around the in-training transformer (LoRA active)."""
    pipe = build_pipeline(model, text_encoder, codec)
    images = _validation_images(cfg, len(cfg.validation.prompts)) if model.i2v else None

    def extra(i: int) -> dict:
        if images is None:
            return {}
        from PIL import Image

        u8 = ((images[i] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return {"image": Image.fromarray(u8)}

    return validate_with_pipeline(pipe, model, text_encoder, cfg, out_dir, extra)


def pipeline_class(cfg: Config) -> type:
    """``WanPipeline`` or ``WanImageToVideoPipeline`` (``model_index.json``'s class)."""
    return df.pipeline_class(_root(cfg.model))


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


def family():
    from frameloom.models.registry import Family

    return Family(
        "wan",
        build_denoiser,
        load_denoiser,
        load_codec=load_codec,
        load_text_encoder=load_text_encoder,
        build_objective=build_objective,
        sample=sample_videos,
        validate=validate,
        pipeline_class=pipeline_class,
        comfyui_module=comfyui_module,
    )
