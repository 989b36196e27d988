"""frameloom's VideoDiT and 3D RoPE: shapes, masks, packing, init, gradients, save/load round trip."""

from __future__ import annotations

import math

import pytest
import torch

from frameloom.models.dit import DIT_PRESETS, VideoDiT
from frameloom.models.dit.rope import apply_rope, grid_positions, rope_angles, rope_axes_dims, rope_freqs

TEXT_DIM = 16


def _randomize_zero_init(model: VideoDiT, seed: int = 0) -> VideoDiT:
    """Give the adaLN-Zero layers (and final layer) non-zero weights so the model computes something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _tiny(patch_size=(1, 2, 2), in_channels: int = 4, seed: int = 0, **kw) -> VideoDiT:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, depth=2, num_heads=2)
    cfg.update(kw)
    model = VideoDiT(in_channels=in_channels, patch_size=patch_size, text_dim=TEXT_DIM, **cfg)
    return _randomize_zero_init(model, seed).eval()


def _inputs(B: int, C: int, T: int, H: int, W: int, L: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g)
    t = torch.rand(B, generator=g)
    text = torch.randn(B, L, TEXT_DIM, generator=g)
    return x, t, text


# ------------------------------------------------------------------------------------------------ RoPE


def test_rope_axes_split() -> None:
    assert rope_axes_dims(64) == (16, 24, 24)
    assert rope_axes_dims(16) == (4, 6, 6)
    assert rope_axes_dims(72) == (18, 26, 28)
    for hd in (6, 8, 16, 32, 64, 72, 128):
        dims = rope_axes_dims(hd)
        assert sum(dims) == hd and all(d % 2 == 0 and d >= 2 for d in dims)
    with pytest.raises(ValueError):
        rope_axes_dims(7)


def test_grid_positions_row_major() -> None:
    pos = grid_positions(2, 3, 4)
    assert pos.shape == (24, 3)
    assert pos[0].tolist() == [0, 0, 0]
    assert pos[1].tolist() == [0, 0, 1]
    assert pos[4].tolist() == [0, 1, 0]
    assert pos[12].tolist() == [1, 0, 0]


def test_rope_relative_property() -> None:
    """After rotation, q . k depends only on the position difference (per axis, fractional too)."""
    hd = 32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, hd, generator=g)  # (B, N, heads, head_dim)
    k = torch.randn(1, 1, 1, hd, generator=g)

    def dot(pq: list[float], pk: list[float]) -> float:
        fq = rope_freqs(torch.tensor([pq]), hd)
        fk = rope_freqs(torch.tensor([pk]), hd)
        return float((apply_rope(q, fq) * apply_rope(k, fk)).sum())

    base = dot([1.0, 2.0, 3.0], [4.0, 0.0, 5.5])
    for offset in ([3.0, 0.0, 0.0], [0.0, 7.0, 0.0], [0.0, 0.0, -2.25], [5.0, 11.0, 13.5]):
        pq = [1.0 + offset[0], 2.0 + offset[1], 3.0 + offset[2]]
        pk = [4.0 + offset[0], 0.0 + offset[1], 5.5 + offset[2]]
        assert math.isclose(base, dot(pq, pk), rel_tol=1e-4, abs_tol=1e-4)
    # and it does depend on the difference along every axis
    assert not math.isclose(base, dot([1.0, 2.0, 3.0], [5.0, 0.0, 5.5]), abs_tol=1e-3)
    assert not math.isclose(base, dot([1.0, 2.0, 3.0], [4.0, 1.0, 5.5]), abs_tol=1e-3)
    assert not math.isclose(base, dot([1.0, 2.0, 3.0], [4.0, 0.0, 6.5]), abs_tol=1e-3)


def test_rope_angles_hand_values() -> None:
    # head_dim 16 -> (t, h, w) dims (4, 6, 6) -> pairs 2, 3, 3; inverse frequencies theta^(-2i/dim)
    ang = rope_angles(torch.tensor([[2.0, 3.0, 5.0]]), 16, theta=100.0)[0]
    expected = [2.0, 2.0 * 100 ** (-2 / 4)]
    expected += [3.0 * 100 ** (-2 * i / 6) for i in range(3)] + [5.0 * 100 ** (-2 * i / 6) for i in range(3)]
    torch.testing.assert_close(ang, torch.tensor(expected))


def test_rope_is_a_rotation() -> None:
    x = torch.randn(2, 10, 3, 16)  # (B, N, heads, head_dim)
    y = apply_rope(x, rope_freqs(grid_positions(1, 2, 5), 16))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x, rope_freqs(torch.zeros(10, 3), 16)), x)
    # per-sample positions (B, N, 3) give the same as shared ones when equal
    pos = grid_positions(1, 2, 5)
    torch.testing.assert_close(apply_rope(x, rope_freqs(pos.expand(2, -1, -1), 16)), y)
    # bf16 in, bf16 out
    assert apply_rope(x.bfloat16(), rope_freqs(pos, 16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize(
    "patch,grid",
    [
        ((1, 2, 2), (1, 4, 4)),
        ((1, 2, 2), (2, 8, 6)),
        ((1, 2, 2), (3, 4, 8)),
        ((2, 2, 2), (2, 8, 6)),
        ((1, 1, 1), (3, 4, 8)),
        ((1, 4, 4), (2, 8, 8)),
    ],
)
def test_output_shapes(patch, grid) -> None:
    model = _tiny(patch_size=patch, out_channels=6)
    x, t, text = _inputs(2, 4, *grid)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = model(x, t, text, text_mask=mask)
    assert out.shape == (2, 6, *grid)
    assert torch.isfinite(out).all()


def test_same_model_different_grids_and_int_patch() -> None:
    model = _tiny(patch_size=2)
    assert model.patch == (1, 2, 2)
    for grid in ((1, 4, 4), (2, 8, 6), (3, 4, 8)):
        x, t, text = _inputs(1, 4, *grid)
        assert model(x, t, text).shape == (1, 4, *grid)


def test_bad_grid_raises() -> None:
    model = _tiny(patch_size=(1, 2, 2))
    x, t, text = _inputs(1, 4, 1, 5, 4)
    with pytest.raises(ValueError, match="divisible"):
        model(x, t, text)


def test_patchify_roundtrip() -> None:
    model = _tiny(patch_size=(2, 2, 4))
    x = torch.randn(2, 4, 4, 6, 8)
    tokens, grid = model.patchify(x)
    assert tokens.shape == (2, 2 * 3 * 2, 4 * 2 * 2 * 4) and grid == (2, 3, 2)
    torch.testing.assert_close(model.unpatchify(tokens, grid), x)


def test_adaln_zero_init_outputs_zero() -> None:
    torch.manual_seed(0)
    model = VideoDiT(in_channels=4, text_dim=TEXT_DIM, **DIT_PRESETS["tiny"])
    x, t, text = _inputs(2, 4, 2, 4, 4)
    out = model(x, t, text)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0


def test_text_mask_ignores_padding() -> None:
    model = _tiny()
    x, t, text = _inputs(2, 4, 1, 4, 4, L=6)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    out = model(x, t, text, text_mask=mask)
    garbage = text.clone()
    garbage[0, 3:] = 100.0  # change only masked tokens of sample 0
    out2 = model(x, t, garbage, text_mask=mask)
    torch.testing.assert_close(out, out2)
    # the same as giving sample 0 only its real tokens
    out3 = model(x[:1], t[:1], text[:1, :3])
    torch.testing.assert_close(out[:1], out3, atol=1e-5, rtol=1e-5)


def test_all_false_text_mask_is_finite_and_means_no_text() -> None:
    model = _tiny()
    x, t, text = _inputs(2, 4, 1, 4, 4)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True
    out = model(x, t, text, text_mask=mask)
    assert torch.isfinite(out).all()
    # row 0 does not depend on its text at all
    out2 = model(x, t, torch.randn_like(text) * 50, text_mask=mask)
    torch.testing.assert_close(out[0], out2[0])


def test_block_diagonal_mask_equals_separate_sequences() -> None:
    """Two sequences packed along time with a block-diagonal mask give what each gives alone."""
    model = _tiny(patch_size=(1, 2, 2))
    g = torch.Generator().manual_seed(3)
    Ta, Tb, H, W = 2, 3, 4, 6
    xa, xb = torch.randn(1, 4, Ta, H, W, generator=g), torch.randn(1, 4, Tb, H, W, generator=g)
    t = torch.tensor([0.3])
    text = torch.randn(1, 5, TEXT_DIM, generator=g)

    out_a = model(xa, t, text)
    out_b = model(xb, t, text)

    packed = torch.cat([xa, xb], dim=2)  # (1, 4, Ta+Tb, H, W)
    na, nb = Ta * (H // 2) * (W // 2), Tb * (H // 2) * (W // 2)
    # the second sequence's positions restart at t = 0
    pos = torch.cat([grid_positions(Ta, H // 2, W // 2), grid_positions(Tb, H // 2, W // 2)])
    mask = torch.zeros(1, na + nb, na + nb, dtype=torch.bool)
    mask[:, :na, :na] = True
    mask[:, na:, na:] = True
    out = model(packed, t, text, attn_mask=mask, positions=pos[None])
    torch.testing.assert_close(out[:, :, :Ta], out_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, Ta:], out_b, atol=1e-5, rtol=1e-5)

    # the same mask as (B, 1, N, N) bool and as an additive float mask
    out_4d = model(packed, t, text, attn_mask=mask[:, None], positions=pos)
    torch.testing.assert_close(out_4d, out)
    additive = torch.zeros(1, na + nb, na + nb).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(model(packed, t, text, attn_mask=additive, positions=pos), out)

    # without the mask the two halves do interact
    assert not torch.allclose(model(packed, t, text, positions=pos)[:, :, :Ta], out_a, atol=1e-4)


def test_bool_mask_with_empty_row_is_finite() -> None:
    model = _tiny()
    x, t, text = _inputs(1, 4, 1, 4, 4)
    n = 4
    mask = torch.ones(1, n, n, dtype=torch.bool)
    mask[:, 3] = False  # a padding token that may attend nothing
    assert torch.isfinite(model(x, t, text, attn_mask=mask)).all()


def test_gradients_reach_every_parameter() -> None:
    model = _tiny(patch_size=(1, 2, 2)).train()
    x, t, text = _inputs(2, 4, 2, 4, 4)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    out = model(x, t, text, text_mask=mask)
    loss = (out - torch.randn_like(out)).pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing, missing
    # and one optimizer step changes the output
    before = out.detach()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.allclose(model(x, t, text, text_mask=mask), before)


def test_timestep_changes_output_and_scalar_timestep() -> None:
    model = _tiny()
    x, _, text = _inputs(2, 4, 1, 4, 4)
    a = model(x, torch.tensor([0.1, 0.1]), text)
    b = model(x, torch.tensor([0.9, 0.9]), text)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model(x, 0.1, text), a)


def test_presets_build() -> None:
    assert DIT_PRESETS["XL"] == dict(hidden_size=1152, depth=28, num_heads=16)
    for name in ("tiny", "S"):
        model = VideoDiT(in_channels=4, text_dim=TEXT_DIM, **DIT_PRESETS[name])
        assert len(model.blocks) == DIT_PRESETS[name]["depth"]


def test_save_pretrained_roundtrip(tmp_path) -> None:
    model = _tiny(patch_size=(1, 2, 2), out_channels=8)
    model.save_pretrained(tmp_path / "dit")
    assert (tmp_path / "dit" / "config.json").exists()
    assert (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").exists()
    loaded = VideoDiT.from_pretrained(tmp_path / "dit").eval()
    assert loaded.patch == (1, 2, 2) and loaded.out_channels == 8
    x, t, text = _inputs(2, 4, 2, 4, 6)
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    torch.testing.assert_close(
        loaded(x, t, text, text_mask=mask), model(x, t, text, text_mask=mask), atol=0, rtol=0
    )


def test_bf16_autocast_forward_backward() -> None:
    model = _tiny().train()
    x, t, text = _inputs(2, 4, 2, 4, 4)
    mask = torch.tensor([[True, False, False, False, False], [False] * 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, text_mask=mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_pooled_text_changes_conditioning_and_ignores_padding():
    torch.manual_seed(0)
    model = VideoDiT(
        in_channels=3,
        patch_size=(1, 2, 2),
        hidden_size=32,
        depth=1,
        num_heads=2,
        text_dim=8,
        pooled_text=True,
    )
    for p in model.parameters():  # leave adaLN-Zero init so the output depends on the conditioning
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(1, 3, 2, 4, 4), torch.tensor([0.5])
    text = torch.randn(1, 3, 8)
    mask = torch.tensor([[True, True, False]])
    padded = torch.cat([text[:, :2], 100 * torch.randn(1, 1, 8)], dim=1)  # garbage in the padded slot
    assert torch.allclose(model(x, t, text, mask), model(x, t, padded, mask), atol=1e-5)
    plain = VideoDiT(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=8)
    assert not hasattr(plain, "pooled_proj") or plain.pooled_proj is None


def test_sincos_embedding_hand_values():
    from frameloom.models.dit.rope import sincos_embedding

    emb = sincos_embedding(torch.tensor([[1.0, 2.0, 3.0]]), 8)  # split (t, h, w) = (2, 2, 4)
    s, c = math.sin, math.cos
    expected = [s(1), c(1), s(2), c(2), s(3), s(0.03), c(3), c(0.03)]
    assert torch.allclose(emb[0], torch.tensor(expected), atol=1e-6)


def test_absolute_pos_embed_is_added_to_patch_embeddings():
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=8)
    with_abs = VideoDiT(**kwargs, absolute_pos_embed=True)
    plain = VideoDiT(**kwargs)
    for p in with_abs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    plain.load_state_dict(with_abs.state_dict())  # no extra parameters: the embedding is fixed
    x, t, text = torch.randn(1, 3, 3, 4, 4), torch.tensor([0.9]), torch.randn(1, 2, 8)
    assert not torch.allclose(with_abs(x, t, text), plain(x, t, text))
    # the fixed embedding differs between frames at the same spatial place
    from frameloom.models.dit.rope import grid_positions, sincos_embedding

    emb = sincos_embedding(grid_positions(3, 2, 2), 32)
    assert emb.shape == (12, 32) and not torch.allclose(emb[0], emb[4])  # frame 0 vs frame 1, same place


def test_velocity_skip_starts_as_t_times_input():
    """adaLN-Zero makes F(x) = 0 at init, so the skip model's first output is exactly t * x."""
    model = VideoDiT(
        in_channels=3,
        patch_size=(1, 2, 2),
        hidden_size=32,
        depth=1,
        num_heads=2,
        text_dim=8,
        velocity_skip=True,
    )
    x, t = torch.randn(2, 3, 2, 4, 4), torch.tensor([0.25, 0.75])
    out = model(x, t, torch.randn(2, 3, 8))
    assert torch.equal(out, t.view(2, 1, 1, 1, 1) * x)
    with pytest.raises(ValueError, match="velocity_skip"):
        VideoDiT(in_channels=3, out_channels=6, hidden_size=32, depth=1, num_heads=2, velocity_skip=True)


def test_positional_conditioning_makes_modulation_per_token():
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=8)
    model = VideoDiT(**kwargs, positional_conditioning=True)
    x, t, text = torch.randn(1, 3, 2, 4, 4), torch.tensor([0.5]), torch.randn(1, 2, 8)
    assert torch.equal(model(x, t, text), torch.zeros_like(x))  # adaLN-Zero still starts at zero
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    plain = VideoDiT(**kwargs)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pos_cond")})
    assert not torch.allclose(model(x, t, text), plain(x, t, text))


def test_pooled_text_is_standardized_by_the_text_statistics():
    """(pooled - mean) / std feeds pooled_proj: a model with statistics (m, s) equals one with (0, 1) whose
    first pooled_proj layer absorbed them (W' = W / s, b' = b - W' m)."""
    from frameloom.models.text import pool_text

    torch.manual_seed(0)
    kwargs = dict(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=2)
    model = VideoDiT(**kwargs, pooled_text=True)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    # statistics of two pooled captions [1, 2] and [3, 6]: mean [2, 4], unbiased std [sqrt 2, 2 sqrt 2]
    model.set_text_statistics(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    assert torch.allclose(model.text_mean, torch.tensor([2.0, 4.0]))
    assert torch.allclose(model.text_std, torch.tensor([2**0.5, 2 * 2**0.5]))
    folded = VideoDiT(**kwargs, pooled_text=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w, b = state["pooled_proj.0.weight"], state["pooled_proj.0.bias"]
    state["pooled_proj.0.weight"] = w / model.text_std
    state["pooled_proj.0.bias"] = b - (w / model.text_std) @ model.text_mean
    state["text_mean"], state["text_std"] = torch.zeros(2), torch.ones(2)
    folded.load_state_dict(state)
    x, t = torch.randn(1, 3, 2, 4, 4), torch.tensor([0.7])
    text, mask = torch.randn(1, 3, 2), torch.tensor([[True, True, False]])
    assert torch.allclose(model(x, t, text, mask), folded(x, t, text, mask), atol=1e-5)
    assert torch.allclose(pool_text(text, mask), text[:, :2].mean(1))
    # the statistics are buffers: saved and loaded with the weights
    assert {"text_mean", "text_std"} <= set(model.state_dict())


def test_positional_conditioning_sees_the_pooled_prompt():
    """With pooled_text, the per-token conditioning depends on (position, prompt) jointly."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=8)
    model = VideoDiT(**kwargs, pooled_text=True, positional_conditioning=True)
    assert model.pos_cond[0].in_features == 32 + 8
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(1, 3, 2, 4, 4), torch.tensor([0.5])
    a, b = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    zero_pos = {
        k: (torch.zeros_like(v) if k.startswith("pos_cond.2") else v) for k, v in model.state_dict().items()
    }
    plain = VideoDiT(**kwargs, pooled_text=True, positional_conditioning=True)
    plain.load_state_dict(zero_pos)  # pos_cond's output layer zeroed: no per-token term
    assert not torch.allclose(model(x, t, a) - plain(x, t, a), model(x, t, b) - plain(x, t, b))


def test_positional_conditioning_reads_the_text_tokens_by_attention():
    """pos_cond_text_attention: the per-token conditioning gets each position's attention readout of the text
    tokens (beside position and pooled text); with that input's weights zeroed the model is the plain one."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=3, patch_size=(1, 2, 2), hidden_size=32, depth=1, num_heads=2, text_dim=8)
    kwargs |= dict(pooled_text=True, positional_conditioning=True)
    model = VideoDiT(**kwargs, pos_cond_text_attention=True)
    assert model.pos_cond[0].in_features == 32 + 8 + 32  # position, pooled text, attention readout
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(2, 3, 2, 4, 4), torch.tensor([0.5, 0.9])
    text, mask = torch.randn(2, 3, 8), torch.tensor([[True, True, False], [True, True, True]])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pos_cond.0.weight"][:, 40:] = 0  # the readout's columns
    plain = VideoDiT(**kwargs)
    plain_state = {k: v for k, v in state.items() if not k.startswith("pos_text_attn")}
    plain.load_state_dict(plain_state | {"pos_cond.0.weight": state["pos_cond.0.weight"][:, :40]})
    zeroed = VideoDiT(**kwargs, pos_cond_text_attention=True)
    zeroed.load_state_dict(state)
    assert torch.allclose(zeroed(x, t, text, mask), plain(x, t, text, mask), atol=1e-6)
    assert not torch.allclose(model(x, t, text, mask), plain(x, t, text, mask), atol=1e-3)
    # The readout ignores padding: changing a padded token changes nothing.
    other = text.clone()
    other[0, 2] = 5.0
    assert torch.allclose(model(x, t, text, mask), model(x, t, other, mask), atol=1e-6)
    with pytest.raises(ValueError, match="needs positional_conditioning"):
        VideoDiT(in_channels=3, hidden_size=32, depth=1, num_heads=2, pos_cond_text_attention=True)
