"""Open-Sora 2.0's sampler: the shifted grid, oscillating and temporal image guidance by hand, the three guidance
branches (prompt + image, negative + image, negative alone) with stand-in encoders, and image-to-video with the
tiny MMDiT and VAE keeping the given first frame."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from frameloom.config import load_config
from frameloom.models.opensora2.codecs import load_hunyuan_vae
from frameloom.models.opensora2.model import MMDiTConfig, OpenSoraMMDiT
from frameloom.models.opensora2.text import OpenSoraTextEncoder, build_tiny_clip, load_clip
from frameloom.models.text import PaddedT5TextEncoder, build_tiny_t5
from frameloom.sampling.opensora2 import (
    guided_velocity,
    image_condition,
    opensora_timesteps,
    oscillating_scale,
    sample_latents,
    temporal_image_scale,
)
from opensora2_tiny import build_vae, redraw


def test_grid_and_guidance_schedules_by_hand():
    # S = 256 tokens per frame, one latent frame: shift 1, the uniform grid
    assert opensora_timesteps(4, 256, 1) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    # S = 1024, 4 latent frames: a = 1.4 * 2 = 2.8; t = 0.5 -> 2.8 * 0.5 / (1 + 1.8 * 0.5) = 0.73684
    grid = opensora_timesteps(2, 1024, 4)
    assert grid == pytest.approx([1.0, 1.4 / 1.9, 0.0])
    assert opensora_timesteps(2, 1024, 4, shift=3.0)[1] == pytest.approx(1.5 / 2.0)
    # oscillation: full scale for 10 steps, then every even step only
    assert [oscillating_scale(7.5, i) for i in (0, 9, 10, 11, 12, 13)] == [7.5, 7.5, 7.5, 1.0, 7.5, 1.0]
    # temporal image guidance at step 2 of 4: upper = linspace(3, 1, 5)[2] = 2; frames: linspace(1, 2, 3)
    assert temporal_image_scale(3.0, 2, 4, 3).tolist() == [1.0, 1.5, 2.0]
    v = guided_velocity(torch.tensor(4.0), torch.tensor(2.0), torch.tensor(1.0), 7.5, 3.0)
    assert v.item() == 1 + 3 * (2 - 1) + 7.5 * (4 - 2)
    ref = torch.full((1, 2, 1, 1, 1), 5.0)
    loop = image_condition(ref, 3, "loop")
    assert loop[0, 0, :, 0, 0].tolist() == [1, 0, 1] and loop[0, 1:, :, 0, 0].tolist() == [[5, 0, 5]] * 2


class _StubText:
    """Prompts encode to ones, the (empty) negative prompt to zeros; pooled likewise."""

    device = torch.device("cpu")

    def encode(self, texts):
        emb = torch.stack([torch.full((3, 4), float(bool(t))) for t in texts])
        return emb, torch.ones(len(texts), 3, dtype=torch.bool)

    def encode_extras(self, texts):
        return {"pooled": torch.tensor([[float(bool(t))] * 2 for t in texts])}


class _StubCodec:
    device = torch.device("cpu")
    compression = (4, 8, 8)

    def latent_size(self, t, h, w):
        return 1 + (t - 1) // 4, h // 8, w // 8

    def encode(self, video):
        return torch.full((video.shape[0], 2, 1, 2, 2), 5.0)


class _BranchModel(torch.nn.Module):
    """v = 1 + 2 [prompt text] + [image condition]: the three branches give 4, 2 and 1."""

    patch_size, latent_channels = 2, 2
    config = SimpleNamespace(cond_embed=True)

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, x, t, text, mask, pooled=None, cond=None):
        self.calls.append((x.shape[0], cond))
        has_text = text.flatten(1).amax(1)  # (B,)
        has_image = cond[:, 0].flatten(1).amax(1) if cond is not None else torch.zeros(x.shape[0])
        return (1 + 2 * has_text + has_image).view(-1, 1, 1, 1, 1).expand_as(x).clone()


def _cfg(*extra):
    return load_config(
        None, ["data.num_frames=5", "data.height=16", "data.width=16", "sample.steps=1", *extra]
    )


def test_three_branches_carry_prompt_and_image_as_upstream():
    model = _BranchModel()
    image = torch.zeros(1, 3, 16, 16)
    x = sample_latents(model, _StubText(), _StubCodec(), _cfg("sample.guidance=7.5"), ["a cat"], [0], image)
    assert model.calls[0][0] == 3  # one batched forward: [prompt + image, negative + image, negative alone]
    cond = model.calls[0][1]
    assert cond[0, 0, 0].min() == 1 and cond[2].abs().sum() == 0 and torch.equal(cond[0], cond[1])
    noise = torch.randn((2, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    v = 1 + 3.0 * (2 - 1) + 7.5 * (4 - 2)  # image guidance default 3
    torch.testing.assert_close(x[0, :, 1], noise[:, 1] - v)  # one Euler step from t = 1 to 0
    assert (x[0, :, 0] == 5.0).all()  # the conditioned frame is the reference latent
    # text-to-video: two branches, v = v_0 + g (v_c - v_0) = 1 + 7.5 * 2
    t2v = _BranchModel()
    x = sample_latents(t2v, _StubText(), _StubCodec(), _cfg(), ["a cat"], [0])
    assert t2v.calls[0][0] == 2 and t2v.calls[0][1] is None
    torch.testing.assert_close(x[0], noise - (1 + 5.0 * 2))  # sample.guidance default 5 in the schema


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("os2_sampling")
    t5 = PaddedT5TextEncoder.from_pretrained(build_tiny_t5(root / "t5"), max_length=8, keep_padding=True)
    clip, tok = load_clip(build_tiny_clip(root / "clip", max_length=16))
    text = OpenSoraTextEncoder(t5, clip, tok, clip_max_length=16)
    codec = load_hunyuan_vae(build_vae(root))
    model = redraw(
        OpenSoraMMDiT(
            MMDiTConfig(
                in_channels=16,
                vec_in_dim=16,
                context_in_dim=32,
                hidden_size=32,
                num_heads=2,
                depth=1,
                depth_single_blocks=1,
                axes_dim=[4, 6, 6],
                mlp_ratio=2.0,
                cond_embed=True,
            )
        ),  # fmt: skip
        std=0.05,
    ).eval()
    return model, text, codec


def test_image_to_video_keeps_the_given_first_frame(tiny, tmp_path):
    model, text, codec = tiny
    # T5 at a fixed length, unmasked (as Open-Sora runs it)
    assert text.encode(["a", ""])[1].all() and text.encode(["a"])[0].shape == (1, 8, 32)
    assert text.encode_extras(["a", "b"])["pooled"].shape == (2, 16)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    cfg = _cfg("sample.steps=2", "sample.oscillating_guidance=true")
    latents = sample_latents(model, text, codec, cfg, ["a red ball", "a cat"], [0, 1], image)
    encoded = codec.encode(image[:, :, None])  # the image as a one-frame video: (2, 4, 1, 2, 2)
    assert latents.shape == (2, 4, 2, 2, 2)
    torch.testing.assert_close(latents[:, :, :1], encoded, rtol=0, atol=1e-6)
    assert not torch.allclose(latents[:, :, 1], encoded[:, :, 0])  # the rest is generated
    loop = sample_latents(model, text, codec, _cfg("sample.image_mode=loop"), ["a"], [0], image[:1])
    torch.testing.assert_close(loop[:, :, -1:], encoded[:1], rtol=0, atol=1e-6)
    # a video depends only on its prompt and seed, not on its batch
    alone = sample_latents(model, text, codec, cfg, ["a cat"], [1], image[1:])
    torch.testing.assert_close(alone, latents[1:], rtol=1e-5, atol=1e-5)
