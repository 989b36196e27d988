"""Wan 2.1 image-to-video conditioning, carried inside the latent so the trainer and cache stay unchanged.

What Wan 2.1 I2V conditions on (diffusers ``WanImageToVideoPipeline.prepare_latents`` / ``encode_image``,
Wan 2.1 without ``expand_timesteps`` and without a last frame):

1. ``video_condition``: the first frame followed by ``T - 1`` black (zero) frames, in pixels ``[-1, 1]``,
   VAE-encoded (distribution mode) and normalized like every Wan latent: ``(z - mean) / std``
   -> ``cond (B, C, t, h, w)``. (Wan's VAE is causal, so its first frame equals the clip latent's first
   frame, but the later frames encode "black after this image" and depend on the image through the cache:
   they are not derivable from the clip latent, so the codec encodes them.)
2. A mask of ``k = vae temporal factor`` (4) channels: pixel frame 0 is known (1), frames 1.. are not (0);
   frame 0 is repeated ``k`` times so the ``k + T - 1 = k t`` entries fold into ``(k, t)``: latent frame 0 is
   all ones, every later latent frame all zeros -> ``mask (B, k, t, h, w)``.
3. The transformer input is ``cat([x_t (C), mask (k), cond (C)], dim=1)`` (``in_channels = 2 C + k``, 36 for
   Wan 2.1 I2V); the noisy part alone is integrated, the prediction has ``C`` channels.
4. The image embedding: CLIP vision (``CLIPImageProcessor`` then ``CLIPVisionModel``), the *penultimate*
   hidden states ``(B, N, D)`` (257 x 1280 for ViT-H/14), passed as ``encoder_hidden_states_image``.

How frameloom carries it (``WanI2VCodec``): a clip's "latent" is ``[z (C) | cond (C) | image (K)]`` on the
channel axis, where the image embedding is flattened, zero-padded and laid out as ``K = ceil(N D / (t h w))``
extra channels (``pack_image_embeds``; 3 channels at 81x480x832). The cache stores that tensor as is;
``ConditionedFlow.draw`` noises only the first ``C`` channels and hands the rest through in ``x_t``; the Wan
adapter builds the mask and unpacks the rest (wan/adapter.py). Nothing in the trainer knows about I2V.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from frameloom.errors import FrameloomError
from frameloom.models.codecs import DiffusersVAECodec, LatentCodec, config_sha256, weights_sha256
from frameloom.objectives.base import StepContext, TrainingInputs
from frameloom.objectives.flow import FlowMatching

__all__ = [
    "ConditionedFlow",
    "WanI2VCodec",
    "first_frame_mask",
    "image_channels",
    "pack_image_embeds",
    "split_i2v",
    "unpack_image_embeds",
]


# --------------------------------------------------------------------------------------------------------
# layout (pure functions)


def image_channels(tokens: int, dim: int, grid: tuple[int, int, int]) -> int:
    """``K = ceil(tokens * dim / (t * h * w))``: channels that hold a ``(tokens, dim)`` embedding."""
    t, h, w = grid
    return math.ceil(tokens * dim / (t * h * w))


def pack_image_embeds(emb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``(B, N, D)`` -> ``(B, K, t, h, w)``: flattened row-major, zero-padded to ``K t h w`` values."""
    b, n, d = emb.shape
    t, h, w = grid
    k = image_channels(n, d, grid)
    flat = torch.nn.functional.pad(emb.reshape(b, n * d), (0, k * t * h * w - n * d))
    return flat.reshape(b, k, t, h, w)


def unpack_image_embeds(packed: torch.Tensor, tokens: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack_image_embeds``: ``(B, K, t, h, w)`` -> ``(B, tokens, dim)``."""
    return packed.flatten(1)[:, : tokens * dim].reshape(packed.shape[0], tokens, dim)


def first_frame_mask(
    batch: int, channels: int, grid: tuple[int, int, int], *, dtype=torch.float32, device=None
) -> torch.Tensor:
    """Wan's I2V mask ``(B, k, t, h, w)``: ones at latent frame 0, zeros after (module docstring, step 2)."""
    t, h, w = grid
    mask = torch.zeros(batch, channels, t, h, w, dtype=dtype, device=device)
    mask[:, :, 0] = 1
    return mask


def split_i2v(
    x: torch.Tensor, channels: int, tokens: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[x (C) | cond (C) | image (K)]`` -> ``x (B, C, t, h, w)``, ``cond (B, C, t, h, w)``,
    ``image (B, tokens, dim)``."""
    if x.shape[1] <= 2 * channels:
        raise FrameloomError(
            f"Wan I2V expects [latent | condition | image] channels (> {2 * channels}), got {x.shape[1]}: "
            "the cache or codec is not the I2V one"
        )
    return (
        x[:, :channels],
        x[:, channels : 2 * channels],
        unpack_image_embeds(x[:, 2 * channels :], tokens, dim),
    )


# --------------------------------------------------------------------------------------------------------
# the objective


class ConditionedFlow:
    """Flow matching on the first ``channels`` channels of ``x0``; the others are conditions, passed through.

    ``draw``: times and noise as ``FlowMatching.draw`` (times first, then noise of the *noised part's*
    shape, both from the generator), ``x_t = [(1 - t) z + t noise | conditions]``, target ``noise - z``.
    ``loss``: the flow loss of the ``channels``-channel prediction (``FlowMatching.loss``: MSE, weighted by
    its ``loss_weighting``).
    """

    def __init__(self, flow: FlowMatching, channels: int):
        self.flow = flow
        self.channels = int(channels)

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        z, conditions = x0[:, : self.channels], x0[:, self.channels :]
        inputs = self.flow.draw(z, generator, ctx)  # shift 'auto' etc. see the latent part only
        inputs.x_t = torch.cat([inputs.x_t, conditions.to(inputs.x_t.dtype)], dim=1)
        inputs.extras["conditions"] = conditions
        return inputs

    def loss(self, pred: torch.Tensor, inputs: TrainingInputs) -> torch.Tensor:
        return self.flow.loss(pred, inputs)


# --------------------------------------------------------------------------------------------------------
# the codec


def _frames_to_pil(frames: torch.Tensor) -> list:
    """``(B, 3, H, W)`` in ``[-1, 1]`` -> PIL images (what the pipeline's image processor receives)."""
    from PIL import Image

    u8 = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # exact for decoded uint8 frames
    return [Image.fromarray(f.permute(1, 2, 0).cpu().numpy()) for f in u8]


class WanI2VCodec(LatentCodec):
    """The Wan VAE plus the I2V conditions (module docstring): ``encode`` returns
    ``[z | cond | image]``; ``decode`` decodes the first ``latent_channels`` channels."""

    def __init__(self, vae_codec: DiffusersVAECodec, image_encoder, image_processor):
        self.vae_codec = vae_codec
        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.image_processor = image_processor
        self.latent_channels = vae_codec.latent_channels
        self.compression = vae_codec.compression
        self.device = vae_codec.device
        self.dtype = vae_codec.dtype
        self.image_tokens, self.image_dim = self._embedding_shape()
        identity = {
            "codec": "wan-i2v-v1",
            "vae": vae_codec.identity,
            "image_encoder": {
                "config": config_sha256(image_encoder.config),
                "weights": weights_sha256(image_encoder),
                "dtype": str(next(image_encoder.parameters()).dtype),
            },
            "image_processor": hashlib.sha256(image_processor.to_json_string().encode()).hexdigest(),
        }
        self.identity = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    @property
    def vae(self):
        return self.vae_codec.vae

    def _embedding_shape(self) -> tuple[int, int]:
        """``(N, D)`` of the image embedding: ``(image_size / patch_size)^2 + 1`` tokens (class token)."""
        cfg = self.image_encoder.config
        return (cfg.image_size // cfg.patch_size) ** 2 + 1, int(cfg.hidden_size)

    @classmethod
    def from_pretrained(
        cls,
        root: str | Path,
        *,
        subfolder: str = "vae",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        tiling: bool = False,
        slicing: bool = False,
    ) -> WanI2VCodec:
        """``<root>/<subfolder>`` (the VAE), ``<root>/image_encoder`` (CLIPVisionModel),
        ``<root>/image_processor``."""
        from transformers import CLIPImageProcessor, CLIPVisionModel

        root = Path(root)
        vae = DiffusersVAECodec.from_pretrained(
            root, subfolder=subfolder, dtype=dtype, tiling=tiling, slicing=slicing
        )
        try:
            image_encoder = CLIPVisionModel.from_pretrained(
                str(root / "image_encoder"), local_files_only=True, dtype=dtype
            )
            processor = CLIPImageProcessor.from_pretrained(
                str(root / "image_processor"), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise FrameloomError(
                f"cannot load the Wan I2V image encoder/processor from {root}: {exc}"
            ) from None
        codec = cls(vae, image_encoder, processor)  # identity hashed on CPU, before any move
        if device is not None:
            codec.to(device)
        return codec

    def to(self, device: torch.device | str) -> WanI2VCodec:
        self.vae_codec.to(device)
        self.image_encoder.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def encode_image(self, frames: torch.Tensor) -> torch.Tensor:
        """First frames ``(B, 3, H, W)`` in ``[-1, 1]`` -> CLIP penultimate hidden states ``(B, N, D)``."""
        pixels = self.image_processor(images=_frames_to_pil(frames), return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, next(self.image_encoder.parameters()).dtype)
        return self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    @torch.no_grad()
    def condition(self, frames: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """First frames ``(B, 3, H, W)`` -> ``cond (B, C, t, h, w)`` (steps 1) and ``image (B, N, D)`` (4)."""
        b, c, h, w = frames.shape
        video = torch.cat([frames[:, :, None], frames.new_zeros(b, c, num_frames - 1, h, w)], dim=2)
        return self.vae_codec.encode(video), self.encode_image(frames)

    @torch.no_grad()
    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, T, H, W)`` -> ``[z (C) | cond (C) | image (K)]`` ``(B, 2C + K, t, h, w)``."""
        z = self.vae_codec.encode(video, generator)  # (B, C, t, h, w)
        cond, image = self.condition(video[:, :, 0], video.shape[2])
        packed = pack_image_embeds(image.to(z.dtype), tuple(z.shape[2:]))  # (B, K, t, h, w)
        return torch.cat([z, cond.to(z.dtype), packed], dim=1)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae_codec.decode(latent[:, : self.latent_channels])
