"""LTX-Video's per-clip frame rates: each clip's rate as sampled (the manifest's fps after the frame policy's
stride) travels through the dataset, the collate and the cache into the adapter's RoPE time scale, one rate per
sample; sampling runs at ``sample.fps`` (null: 25)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from families import LTX_CLIP, build_tiny_ltx, family_config
from frameloom import pipeline as pl
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.data.video import ClipSpec, row_fps, sampled_fps
from frameloom.models.ltx_video.adapter import LTXDenoiser
from frameloom.train.trainer import train

TEXT_LEN = 16


@pytest.fixture(scope="module")
def ltx_dir(tmp_path_factory) -> Path:
    return build_tiny_ltx(tmp_path_factory.mktemp("ltx") / "model")


def _manifest(root: Path, rates: tuple[float, ...], num_frames: int) -> Path:
    """One synthetic clip per rate (``num_frames`` frames, written at that rate) in one manifest."""
    tables = []
    for k, fps in enumerate(rates):
        sub = root / f"set{k}"
        synthetic.write_synthetic_set(sub, num_clips=1, seed=k, progress=False, fps=fps, num_frames=num_frames,
                                      height=LTX_CLIP["height"], width=LTX_CLIP["width"])  # fmt: skip
        table = pq.read_table(sub / "manifest.parquet")
        paths = [f"set{k}/{p}" for p in table.column("path").to_pylist()]
        tables.append(table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths)))
    pq.write_table(pa.concat_tables(tables), root / "manifest.parquet")
    return root / "manifest.parquet"


def _cfg(ltx_dir: Path, manifest: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        family_config(
            "ltx_video", ltx_dir, manifest, run_dir,
            *(f"data.{k}={v}" for k, v in LTX_CLIP.items()),
            f"model.text_max_length={TEXT_LEN}", "train.steps=1", "model.lora.rank=2", *extra,
        ),
    )  # fmt: skip


def _record_forward(monkeypatch) -> list:
    """Every ``frame_rate`` the adapter's forward receives during training."""
    seen = []
    forward = LTXDenoiser.forward

    def recording(self, x_t, t, text_emb, text_mask, frame_rate=None):
        seen.append(frame_rate)
        return forward(self, x_t, t, text_emb, text_mask, frame_rate=frame_rate)

    monkeypatch.setattr(LTXDenoiser, "forward", recording)
    return seen


# ------------------------------------------------------------------------------------------------ the rate


def test_sampled_fps_follows_the_frame_policy():
    """The rate of the frames fed to the model, by hand: 30 fps at stride 2 -> 15; target 12 -> 12; fps_max 24
    on 60 fps -> stride ceil(2.5) = 3 -> 20; spread of 10 over 100 frames -> every 10th -> 3; speed factor 2
    on 40 positions for 10 frames keeps 20 (floor(linspace(0, 39, 20)), mean step 39 / 19) -> 30 * 19 / 39."""
    assert sampled_fps(30.0, 100, ClipSpec(num_frames=5, frame_stride=2)) == 15.0
    assert sampled_fps(30.0, 100, ClipSpec(num_frames=5, target_fps=12)) == pytest.approx(12.0, abs=1e-12)
    assert sampled_fps(60.0, 100, ClipSpec(num_frames=5, fps_max=24)) == 20.0
    assert sampled_fps(30.0, 100, ClipSpec(num_frames=10, frame_spread=True)) == 3.0
    assert sampled_fps(30.0, 40, ClipSpec(num_frames=10, speed_factor=2.0)) == pytest.approx(30 * 19 / 39)
    assert sampled_fps(0.0, 100, ClipSpec(num_frames=5)) is None
    # the row as decode_clip reads it: the cut's length counts, images have no rate
    spec = ClipSpec(num_frames=10, frame_spread=True)
    assert row_fps({"path": "a.mp4", "fps": 30.0, "num_frames": 100, "cut_start": 50}, spec) == 6.0
    assert row_fps({"path": "a.png", "fps": 30.0, "num_frames": 1}, spec) is None


def test_stride_two_on_30fps_is_15_through_the_cache(ltx_dir, tmp_path, monkeypatch):
    """A 30 fps file sampled at stride 2: the cache entry carries 15, the cached dataset reads it back (and
    recomputes it from the manifest for an entry cached before entries carried it), and the model sees 15."""
    from frameloom.cache.dataset import CachedClipDataset

    manifest = _manifest(tmp_path, (30.0, 30.0), num_frames=10)
    cfg = _cfg(ltx_dir, manifest, tmp_path / "run", "data.frame_stride=2", "data.require_cache=true")
    report = pl.run_cache(cfg, progress=False)
    assert report.encoded == 2
    store = pl.open_store(cfg)
    keys = [p.stem for p in sorted((store.root / "video").rglob("*.safetensors"))]
    assert len(keys) == 2 and all(store.get("video", k)["fps"].tolist() == [15.0] for k in keys)

    codec, encoder = pl.load_codec(cfg), pl.load_text_encoder(cfg)
    dataset = CachedClipDataset(manifest, pl.clip_spec(cfg), codec.identity, encoder.identity, store)
    assert [dataset[i]["fps"] for i in range(2)] == [15.0, 15.0]
    assert dataset.collate([dataset[0], dataset[1]])["fps"].tolist() == [15.0, 15.0]
    old = store.get("video", keys[0])
    store.put("video", keys[0], {"latent": old["latent"]})  # an entry as caches before this change wrote it
    assert "fps" not in store.get("video", keys[0]) and [dataset[i]["fps"] for i in range(2)] == [15.0, 15.0]

    seen = _record_forward(monkeypatch)
    train(cfg)
    assert len(seen) == 1 and seen[0].tolist() == [15.0, 15.0]


def test_mixed_rates_give_each_sample_the_rope_of_its_own_rate(ltx_dir, tmp_path, monkeypatch):
    """One batch of a 12 fps and a 30 fps clip (decoded on the fly): the model gets (B,) = {12, 30}, and the
    RoPE of each sample equals diffusers' LTXVideoRotaryPosEmbed called on that sample alone with the
    pipeline's scale (vae_t / rate, vae_s, vae_s)."""
    from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed

    ropes = []
    rope_forward = LTXVideoRotaryPosEmbed.forward

    def recording(self, hidden_states, num_frames=None, height=None, width=None, rope_interpolation_scale=None, video_coords=None):  # fmt: skip
        out = rope_forward(
            self, hidden_states, num_frames, height, width, rope_interpolation_scale, video_coords
        )
        ropes.append((self, hidden_states, (num_frames, height, width), out))
        return out

    monkeypatch.setattr(LTXVideoRotaryPosEmbed, "forward", recording)
    seen = _record_forward(monkeypatch)
    manifest = _manifest(tmp_path, (12.0, 30.0), num_frames=5)
    train(_cfg(ltx_dir, manifest, tmp_path / "run", "data.use_cache=never"))

    assert len(seen) == 1 and sorted(seen[0].tolist()) == [12.0, 30.0]
    (rope, hidden, grid, (cos, sin)), = ropes  # fmt: skip
    assert cos.shape[0] == 2 and grid[0] == 2  # two latent frames: the time positions depend on the rate
    vae_t, vae_s = 4, 4  # the tiny VAE: time /4, space /4
    for i, rate in enumerate(seen[0].tolist()):
        alone = LTXVideoRotaryPosEmbed(rope.dim, rope.base_num_frames, rope.base_height, rope.base_width,
                                       rope.patch_size, rope.patch_size_t, rope.theta)  # fmt: skip
        want_cos, want_sin = rope_forward(alone, hidden[i : i + 1], *grid, (vae_t / rate, vae_s, vae_s))
        torch.testing.assert_close(cos[i : i + 1], want_cos, atol=0, rtol=0)
        torch.testing.assert_close(sin[i : i + 1], want_sin, atol=0, rtol=0)
    fixed_cos, _ = rope_forward(rope, hidden[:1], *grid, (vae_t / 25.0, vae_s, vae_s))
    assert (cos[:1] - fixed_cos).abs().max() > 1e-3  # the clip's own rate, not a fixed 25


def test_sampling_runs_at_sample_fps(ltx_dir, tmp_path, monkeypatch):
    """frameloom's LTX sampler passes sample.fps as the frame rate, 25 (LTXPipeline's) when it is null; mp4s
    of other families keep 8 when it is null."""
    from frameloom.models.ltx_video import family
    from frameloom.models.registry import sample_fps

    seen = []
    monkeypatch.setattr(family, "flow_sample_latents", lambda *a, **kw: seen.append(kw["model_kwargs"]))
    model = SimpleNamespace(pretrained=ltx_dir, latent_channels=8)
    codec = SimpleNamespace(latent_size=lambda t, h, w: (2, h // 4, w // 4))
    manifest = tmp_path / "none.parquet"
    for extra, rate in (((), 25.0), (("sample.fps=12",), 12.0)):
        cfg = _cfg(ltx_dir, manifest, tmp_path, *extra)
        family.sample_latents(model, None, codec, cfg, ["a cat"], [0])
        assert seen[-1] == {"frame_rate": rate} and sample_fps(cfg) == rate
    dit = load_config(None, ["model.family=dit"])
    assert sample_fps(dit) == 8.0
    assert sample_fps(load_config(None, ["model.family=dit", "sample.fps=4"])) == 4.0
