"""Open-Sora-Plan v1.3's DiT (models/opensora_plan/model.py): released key names and strict loading, Skiparse
(rearrangement, inverse, groups, sparse_n = 1 == dense, the 32-block layout), 3D RoPE, and its pieces against
diffusers' PixArt modules with the same weights.

Parity with upstream (PKU-YuanGroup/Open-Sora-Plan ``OpenSoraT2V_v1_3``, run at tiny size outside the
repository, weights redrawn from a fixed seed): max |difference| 0.0 for sparse_n 1 and 4 on 15, 27 and 32
tokens (with Skiparse padding), fp32 CPU (docs/opensora_plan.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frameloom.errors import FrameloomError
from frameloom.models.opensora_plan.family import load_denoiser
from frameloom.models.opensora_plan.model import OpenSoraPlanConfig, OpenSoraPlanT2V, timestep_embedding
from frameloom.models.opensora_plan.released import DIT_CLASS, released_dit_shapes, write_folder
from frameloom.models.opensora_plan.rope import apply_rope_3d, rope_3d_tables
from frameloom.models.opensora_plan.skiparse import block_kind, skiparse, skiparse_pad, unskiparse

TINY = dict(
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=8,
    out_channels=8,
    num_layers=4,
    cross_attention_dim=24,
    caption_channels=16,
    patch_size=2,
    patch_size_t=1,
    sparse1d=True,
    sparse_n=2,
)


def tiny_model(seed: int = 0, **changes) -> OpenSoraPlanT2V:
    torch.manual_seed(seed)
    model = OpenSoraPlanT2V(OpenSoraPlanConfig(**{**TINY, **changes}))
    for p in model.parameters():  # every path carries signal (the released init zeroes nothing, but be sure)
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def inputs(grid=(2, 3, 3), batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    x = torch.randn(batch, 8, t, 2 * h, 2 * w, generator=g)
    text = torch.randn(batch, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:batch]
    return x, torch.tensor([3, 900])[:batch], text, mask


# -------------------------------------------------------------------------------------------------------- keys


def test_released_state_dict_loads_strictly(tmp_path):
    cfg = {**TINY, "sparse_n": 4}
    shapes = released_dit_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    folder = write_folder(tmp_path / "any93x640x640", DIT_CLASS, cfg, state)
    model = load_denoiser(folder)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.config.sparse_n == 4 and [b.kind for b in model.transformer_blocks] == [
        None,
        None,
        "single",
        "group",
    ]


def test_key_mismatch_is_one_line(tmp_path):
    state = {k: torch.zeros(s) for k, s in released_dit_shapes(TINY).items()}
    del state["transformer_blocks.1.attn2.to_k.weight"]
    state["transformer_blocks.0.attn1.norm_q.weight"] = torch.zeros(12)
    folder = write_folder(tmp_path / "bad", DIT_CLASS, TINY, state)
    with pytest.raises(FrameloomError) as err:
        load_denoiser(folder)
    message = str(err.value)
    assert "\n" not in message
    assert "missing 1 key(s): transformer_blocks.1.attn2.to_k.weight" in message
    assert "unexpected 1 key(s): transformer_blocks.0.attn1.norm_q.weight" in message
    with pytest.raises(FrameloomError, match="_class_name"):
        load_denoiser(write_folder(tmp_path / "vae", "WFVAEModel", TINY, {}))
    with pytest.raises(FrameloomError, match="activation_fn"):
        OpenSoraPlanConfig.from_dict({**TINY, "activation_fn": "geglu"})


# -------------------------------------------------------------------------------------------------------- skiparse


def test_block_kinds_of_the_32_block_model():
    """Blocks 2..29 sparse, odd ones group skip, even ones single skip; 0, 1, 30, 31 dense."""
    kinds = [block_kind(i, True) for i in range(32)]
    assert kinds[:2] == [None, None] and kinds[30:] == [None, None]
    assert [i for i, k in enumerate(kinds) if k == "single"] == list(range(2, 30, 2))
    assert [i for i, k in enumerate(kinds) if k == "group"] == list(range(3, 30, 2))
    assert all(k is None for k in (block_kind(i, False) for i in range(32)))
    model = OpenSoraPlanT2V(OpenSoraPlanConfig(num_layers=32, num_attention_heads=1, attention_head_dim=6,
                                               cross_attention_dim=6, caption_channels=4))  # fmt: skip
    assert [b.kind for b in model.transformer_blocks] == kinds


def test_skiparse_groups_by_hand_and_inverse():
    x = torch.arange(16.0).view(1, 1, 16, 1)  # token i carries the value i
    single = skiparse(x, 2, "single")  # (2, 1, 8, 1): every 2nd token
    assert single[0, 0, :, 0].tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert single[1, 0, :, 0].tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    group = skiparse(x, 2, "group")  # runs of 2, 4 apart
    assert group[0, 0, :, 0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert group[1, 0, :, 0].tolist() == [2, 3, 6, 7, 10, 11, 14, 15]
    y = torch.randn(3, 2, 32, 5)
    for n in (1, 2, 4):
        for kind in ("single", "group"):
            assert torch.equal(unskiparse(skiparse(y, n, kind), n, kind), y)
    # batch order (group, batch) like upstream's "(k b)"
    assert torch.equal(skiparse(y, 4, "single")[5], y[2, :, 1::4])
    assert skiparse_pad(18, 2) == 2 and skiparse_pad(18, 4) == 14 and skiparse_pad(32, 4) == 0


@pytest.mark.parametrize("kind", ["single", "group"])
@pytest.mark.parametrize("grid", [(2, 3, 3), (2, 2, 4)])  # 18 tokens (padded) and 16
def test_sparse_self_attention_equals_masked_dense(kind, grid):
    """A sparse block attends exactly as dense attention restricted to each token's group."""
    model = tiny_model()
    block = model.transformer_blocks[2 if kind == "single" else 3]
    assert block.kind == kind
    n, heads = block.sparse_n, block.heads
    num = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, num, 24, generator=torch.Generator().manual_seed(3))
    rope = rope_3d_tables(grid, 12)
    got = block.self_attention(x, rope)
    q, k, v = (
        proj(x).view(2, num, heads, -1).transpose(1, 2)
        for proj in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v)
    )
    q, k = apply_rope_3d(q, *rope), apply_rope_3d(k, *rope)
    idx = torch.arange(num)
    group = idx % n if kind == "single" else (idx // n) % n
    allowed = group[:, None] == group[None, :]  # (N, N)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    ref = block.attn1.to_out[0](ref.transpose(1, 2).reshape(2, num, 24))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, block.attn1.to_out[0](
        F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, num, 24)), atol=1e-3)  # fmt: skip


def test_sparse_n_1_equals_dense():
    dense = tiny_model(sparse1d=False)
    sparse = tiny_model(sparse_n=1)
    sparse.load_state_dict(dense.state_dict())
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sparse(*args), dense(*args), rtol=0, atol=0)
        four = tiny_model(sparse_n=4)
        four.load_state_dict(dense.state_dict())
        assert (four(*args) - dense(*args)).abs().max() > 1e-3  # sparse blocks do change the result


# -------------------------------------------------------------------------------------------------------- positions and pieces


def test_rope_3d_hand_values():
    """head_dim 6: one frequency (1) per axis; the token at (t=1, h=0, w=2) turns its t pair by 1 rad and its
    w pair by 2 rad, with the rotate-half pairing (dims 0-1 of each axis part)."""
    cos, sin = rope_3d_tables((2, 1, 3), 6)
    token = 1 * 3 + 2  # time-major order
    x = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 6).expand(1, 1, 6, 6).clone()
    out = apply_rope_3d(x, cos, sin)[0, 0, token]
    expected = torch.tensor([torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0)), 1.0, 0.0,
                             torch.cos(torch.tensor(2.0)), torch.sin(torch.tensor(2.0))])  # fmt: skip
    torch.testing.assert_close(out, expected)
    half = rope_3d_tables((1, 1, 5), 6, scales=(1.0, 1.0, 2.0))[1]
    torch.testing.assert_close(half[4, 2, 0], torch.sin(torch.tensor(2.0)))  # position 4 / interpolation 2


def test_pieces_equal_diffusers_pixart_modules():
    from diffusers.models.attention import FeedForward
    from diffusers.models.embeddings import PixArtAlphaTextProjection, get_timestep_embedding
    from diffusers.models.normalization import AdaLayerNormSingle

    model = tiny_model()
    t = torch.tensor([0.0, 17.0, 999.0])
    torch.testing.assert_close(
        timestep_embedding(t), get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    )
    ada = AdaLayerNormSingle(24)
    ada.load_state_dict(model.adaln_single.state_dict())
    ref, ref_emb = ada(
        t, {"resolution": None, "aspect_ratio": None}, batch_size=3, hidden_dtype=torch.float32
    )
    got, got_emb = model.adaln_single(t)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_emb, ref_emb)
    proj = PixArtAlphaTextProjection(in_features=16, hidden_size=24)
    proj.load_state_dict(model.caption_projection.state_dict())
    text = torch.randn(2, 5, 16)
    torch.testing.assert_close(model.caption_projection(text), proj(text))
    ff = FeedForward(24, activation_fn="gelu-approximate")
    ff.load_state_dict(model.transformer_blocks[0].ff.state_dict())
    h = torch.randn(2, 7, 24)
    torch.testing.assert_close(model.transformer_blocks[0].ff(h), ff(h))


def test_forward_shapes_and_text_mask():
    model = tiny_model()
    x, t, text, mask = inputs()
    with torch.no_grad():
        out = model(x, t, text, mask)
        assert out.shape == x.shape
        # masked text tokens do not matter
        text2 = text.clone()
        text2[0, 3:] = 100.0
        torch.testing.assert_close(model(x, t, text2, mask)[0], out[0])


def test_activation_checkpointing_leaves_grads_unchanged():
    """parallelize's per-block checkpointing recomputes the same block (Skiparse included): same gradients."""
    from frameloom.config.schema import ParallelConfig
    from frameloom.parallel.memory import apply_activation_checkpointing

    grads = []
    for ckpt in (False, True):
        model = tiny_model(sparse_n=2).train()
        if ckpt:
            assert apply_activation_checkpointing(model, ParallelConfig(activation_checkpointing="full")) == 4
        model(*inputs()).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name
