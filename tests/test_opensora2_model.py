"""Open-Sora 2.0's MMDiT: released key names load strictly, stage changes name their keys, the Flux -> Open-Sora
conversion round-trips with identical outputs, RoPE layouts, and the model's small maths by hand.

Parity with upstream (hpcaitech/Open-Sora ``MMDiTModel``, run in a scratch folder with plain-PyTorch stand-ins
for its flash-attention and liger kernels, every weight redrawn): max abs difference 0.0 with rotate-half RoPE
(unfused, with and without cond_in), 2.4e-6 with Flux's fused interleaved layout (Flux computes the
frequencies in float64); recorded in docs/opensora2.md, not re-run here (upstream code is not vendored).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import save_file

from frameloom.config.schema import ModelConfig
from frameloom.errors import FrameloomError
from frameloom.models.opensora2.family import build_denoiser
from frameloom.models.opensora2.model import MMDiTConfig, OpenSoraMMDiT, pack, timestep_embedding, unpack
from frameloom.models.opensora2.rope import (
    apply_rope,
    half_to_interleaved,
    interleaved_to_half,
    rope_angles,
    rope_tables,
    video_positions,
)
from frameloom.models.opensora2.weights import flux_to_opensora, opensora_to_flux
from opensora2_tiny import redraw

TINY = dict(in_channels=16, vec_in_dim=12, context_in_dim=20, hidden_size=32, mlp_ratio=2.0, num_heads=2,
            depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6])  # fmt: skip


def released_keys(c: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The key names and shapes of ``Open_Sora_v2.safetensors`` for config ``c``, written out from
    Open-Sora's layer definitions (layers.py: MLPEmbedder, SelfAttention unfused, Modulation, DoubleStreamBlock,
    SingleStreamBlock, LastLayer; model.py: img_in, time_in, vector_in, cond_in, txt_in), not from our model."""
    D, M, hd = c.hidden_size, int(c.hidden_size * c.mlp_ratio), c.hidden_size // c.num_heads
    keys: dict[str, tuple[int, ...]] = {}

    def lin(name: str, i: int, o: int, bias: bool = True) -> None:
        keys[f"{name}.weight"] = (o, i)
        if bias:
            keys[f"{name}.bias"] = (o,)

    lin("img_in", c.in_channels, D)
    lin("time_in.in_layer", 256, D)
    lin("time_in.out_layer", D, D)
    lin("vector_in.in_layer", c.vec_in_dim, D)
    lin("vector_in.out_layer", D, D)
    lin("cond_in", c.in_channels + c.patch_size**2, D)
    lin("txt_in", c.context_in_dim, D)
    for i in range(c.depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            lin(f"{b}_mod.lin", D, 6 * D)
            for p in ("q_proj", "k_proj", "v_proj"):
                lin(f"{b}_attn.{p}", D, D)
            keys[f"{b}_attn.norm.query_norm.scale"] = (hd,)
            keys[f"{b}_attn.norm.key_norm.scale"] = (hd,)
            lin(f"{b}_attn.proj", D, D)
            lin(f"{b}_mlp.0", D, M)
            lin(f"{b}_mlp.2", M, D)
    for i in range(c.depth_single_blocks):
        b = f"single_blocks.{i}"
        lin(f"{b}.q_proj", D, D)
        lin(f"{b}.k_proj", D, D)
        lin(f"{b}.v_mlp", D, D + M)
        lin(f"{b}.linear2", D + M, D)
        keys[f"{b}.norm.query_norm.scale"] = (hd,)
        keys[f"{b}.norm.key_norm.scale"] = (hd,)
        lin(f"{b}.modulation.lin", D, 3 * D)
    lin("final_layer.linear", D, c.in_channels)
    lin("final_layer.adaLN_modulation.1", D, 2 * D)
    return keys


def _released_file(tmp_path, drop: str | None = None, **overrides):
    c = MMDiTConfig(**{**TINY, "cond_embed": True, **overrides})
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(s, generator=g)
        for k, s in released_keys(c).items()
        if not (drop and k.startswith(drop))
    }
    path = tmp_path / "Open_Sora_v2.safetensors"
    save_file(state, str(path))
    return path, state


def _model_cfg(path, **config) -> ModelConfig:
    return ModelConfig(family="opensora2", pretrained=str(path), config={**TINY, **config})


def test_released_key_names_load_strictly(tmp_path):
    path, state = _released_file(tmp_path)
    model = build_denoiser(_model_cfg(path, cond_embed=True), 0, 0)
    got = model.state_dict()
    # 14 embedder + 2 x 32 double + 2 x 12 single + 4 final keys
    assert set(got) == set(state) and len(state) == 106
    for key, value in state.items():
        assert torch.equal(got[key], value), key
    # 11B preset: the count of Flux-dev plus cond_in (counted from the config, not built)
    from frameloom.models.opensora2.model import count_parameters

    assert count_parameters(MMDiTConfig(cond_embed=True)) == 11_891_390_528


def test_missing_or_unexpected_keys_are_one_line_naming_them(tmp_path, caplog):
    path, _ = _released_file(tmp_path, drop="cond_in")
    with pytest.raises(FrameloomError, match=r"missing cond_in.bias, cond_in.weight") as err:
        build_denoiser(_model_cfg(path, cond_embed=True), 0, 0)
    assert "\n" not in str(err.value)
    # a stage change that adds cond_in says so, and the new input starts at zero (no condition)
    with caplog.at_level(logging.WARNING, logger="frameloom.opensora2"):
        model = build_denoiser(_model_cfg(path, cond_embed=True, new_keys=["cond_in"]), 0, 0)
    assert (
        "new key(s) keep their initial values (model.config.new_keys): cond_in.bias, cond_in.weight"
        in caplog.text
    )
    assert model.cond_in.weight.abs().sum() == 0


def test_t2v_config_no_longer_drops_the_released_cond_in_silently(tmp_path, caplog):
    path, state = _released_file(tmp_path)
    with pytest.raises(FrameloomError, match=r"unexpected cond_in.bias, cond_in.weight.*drop_keys"):
        build_denoiser(_model_cfg(path, cond_embed=False), 0, 0)
    with caplog.at_level(logging.WARNING, logger="frameloom.opensora2"):
        model = build_denoiser(_model_cfg(path, cond_embed=False, drop_keys=["cond_in"]), 0, 0)
    assert "dropped 2 key(s) (model.config.drop_keys): cond_in.bias, cond_in.weight" in caplog.text
    assert not hasattr(model, "cond_in") and torch.equal(model.img_in.weight, state["img_in.weight"])


def test_shape_mismatch_is_named_and_a_replaced_layer_is_declared(tmp_path):
    path, state = _released_file(tmp_path, context_in_dim=24)
    with pytest.raises(FrameloomError, match=r"shape of txt_in.weight \(32, 24\) vs \(32, 20\)"):
        build_denoiser(_model_cfg(path, cond_embed=True), 0, 0)
    # a stage change that replaces a layer (another text width, or img_in for the DC-AE) drops and re-adds it
    model = build_denoiser(_model_cfg(path, cond_embed=True, drop_keys=["txt_in"], new_keys=["txt_in"]), 0, 0)
    assert torch.equal(model.img_in.weight, state["img_in.weight"]) and model.txt_in.weight.shape == (32, 20)


# ---------------------------------------------------------------- RoPE


def test_interleaved_rope_equals_rotate_half_on_permuted_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 16)  # (B, heads, N, hd)
    cos, sin = rope_tables(rope_angles(video_positions(2, 2, 2, text_len=2), [4, 6, 6]))
    perm = interleaved_to_half(16)
    assert perm.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15]
    assert torch.equal(perm[half_to_interleaved(16)], torch.arange(16))
    interleaved = apply_rope(x, cos, sin, "interleaved")
    half = apply_rope(x[..., perm], cos, sin, "rotate_half")
    torch.testing.assert_close(half, interleaved[..., perm], rtol=0, atol=0)
    # the two layouts differ on the same channels (the parity pitfall SEED_MODELS.md warns about)
    assert (apply_rope(x, cos, sin, "rotate_half") - interleaved).abs().max() > 0.1


def test_rope_angles_and_rotation_by_hand():
    pos = torch.tensor([[2.0, 3.0, 5.0]])
    angles = rope_angles(pos, [2, 4, 2], theta=100.0)  # t: 2 * 1; h: 3 * [1, 100^-1/2]; w: 5 * 1
    torch.testing.assert_close(angles, torch.tensor([[2.0, 3.0, 0.3, 5.0]]))
    # channel pair (0, 4) of a rotate-half vector turns by angle 2: (1, 0) -> (cos 2, sin 2)
    x = torch.zeros(1, 1, 1, 8)
    x[..., 0] = 1.0
    out = apply_rope(x, *rope_tables(angles), "rotate_half")
    assert out[0, 0, 0, 0].item() == pytest.approx(math.cos(2.0)) and out[0, 0, 0, 4].item() == pytest.approx(
        math.sin(2.0)
    )
    # text tokens sit at (0, 0, 0): no rotation
    assert video_positions(1, 1, 2, text_len=2).tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]]


# ---------------------------------------------------------------- Flux conversion


def test_flux_checkpoint_converts_with_identical_outputs_and_round_trips():
    flux = redraw(OpenSoraMMDiT(MMDiTConfig(**TINY, fused_qkv=True, rope="interleaved", guidance_embed=True)))
    flux_state = flux.state_dict()
    converted, dropped = flux_to_opensora(flux_state)
    assert sorted(dropped) == [
        "guidance_in.in_layer.bias", "guidance_in.in_layer.weight", "guidance_in.out_layer.bias",
        "guidance_in.out_layer.weight",
    ]  # fmt: skip
    ours = OpenSoraMMDiT(MMDiTConfig(**TINY))  # released layout: unfused, rotate-half
    ours.load_state_dict(converted, strict=True)
    # the same model without the guidance embedder (Open-Sora 2.0 has none) gives the same velocity
    reference = OpenSoraMMDiT(MMDiTConfig(**TINY, fused_qkv=True, rope="interleaved"))
    reference.load_state_dict({k: v for k, v in flux_state.items() if not k.startswith("guidance_in")})
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 5, 20, generator=g)
    pooled, t = torch.randn(2, 12, generator=g), torch.rand(2, generator=g)
    with torch.no_grad():
        want, got = reference(x, t, text, None, pooled=pooled), ours(x, t, text, None, pooled=pooled)
    assert want.abs().mean() > 0.1
    # measured 1.9e-6 at |v| ~ 2.3 (channel summation order)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # Open-Sora -> Flux gives back the Flux tensors exactly
    back = opensora_to_flux(converted)
    assert set(back) == {k for k in flux_state if not k.startswith("guidance_in")}
    assert all(torch.equal(back[k], flux_state[k]) for k in back)


def test_flux_file_loads_through_the_family(tmp_path, caplog):
    flux = redraw(OpenSoraMMDiT(MMDiTConfig(**TINY, fused_qkv=True, rope="interleaved", guidance_embed=True)))
    save_file(flux.state_dict(), str(tmp_path / "flux1-dev.safetensors"))
    cfg = _model_cfg(tmp_path / "flux1-dev.safetensors", pretrained_format="flux")
    with caplog.at_level(logging.WARNING, logger="frameloom.opensora2"):
        model = build_denoiser(cfg, 0, 0)
    assert "conversion dropped guidance_in.in_layer.bias" in caplog.text
    assert torch.equal(
        model.double_blocks[0].img_attn.v_proj.weight, flux.double_blocks[0].img_attn.qkv.weight[64:]
    )
    # i2v from Flux: cond_in is new and must be named
    with pytest.raises(FrameloomError, match="missing cond_in"):
        build_denoiser(
            _model_cfg(tmp_path / "flux1-dev.safetensors", pretrained_format="flux", cond_embed=True), 0, 0
        )


# ---------------------------------------------------------------- small maths


def test_pack_layout_and_timestep_embedding_by_hand():
    x = torch.arange(2 * 3 * 1 * 4 * 2, dtype=torch.float32).reshape(2, 3, 1, 4, 2)
    packed = pack(x, 2)  # b c t (h p) (w q) -> b (t h w) (c p q)
    assert packed.shape == (2, 2, 12)
    # token 1 of sample 0 = rows 2..3, columns 0..1: channel 0 gives [4, 5, 6, 7], channel 1 adds 8 to each
    assert packed[0, 1, :4].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert packed[0, 1, 4:8].tolist() == [12.0, 13.0, 14.0, 15.0]
    assert torch.equal(unpack(packed, (1, 2, 1), 2), x)
    emb = timestep_embedding(torch.tensor([0.5]), dim=4)  # args 1000 t * [1, 10000^-1/2] = [500, 5]
    torch.testing.assert_close(emb, torch.tensor([[math.cos(500), math.cos(5), math.sin(500), math.sin(5)]]))


def test_cond_none_is_the_zero_condition_and_pooled_is_required():
    model = redraw(OpenSoraMMDiT(MMDiTConfig(**TINY, cond_embed=True)))
    g = torch.Generator().manual_seed(2)
    x, text, pooled = (
        torch.randn(1, 4, 2, 4, 4, generator=g),
        torch.randn(1, 3, 20, generator=g),
        torch.randn(1, 12),
    )
    t = torch.tensor([0.3])
    with torch.no_grad():
        zero = model(x, t, text, None, pooled=pooled, cond=torch.zeros(1, 5, 2, 4, 4))
        torch.testing.assert_close(model(x, t, text, None, pooled=pooled), zero, rtol=0, atol=0)
        assert not torch.allclose(
            model(x, t, text, None, pooled=pooled, cond=torch.ones(1, 5, 2, 4, 4)), zero
        )
    with pytest.raises(ValueError, match="pooled"):
        model(x, t, text, None)
