"""`frameloom inspect`: counts, histograms, the bucket table with reasons, the PNG, and the command line."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frameloom.cli import main
from frameloom.config import load_config
from frameloom.data.inspect import default_png, inspect_manifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def manifest(tmp_path) -> Path:
    # (height, width, frames, fps, is_image)
    rows = [
        (1080, 1920, 240, 24.0, False),  # 10 s
        (1080, 1920, 240, 24.0, False),  # 10 s
        (1080, 1920, 240, 24.0, False),  # 10 s
        (720, 1280, 90, 30.0, False),  # 3 s
        (720, 1280, 90, 30.0, False),  # 3 s
        (480, 480, 20, 60.0, False),  # 1/3 s: too short for every frame count below
        (100, 100, 300, 24.0, False),  # 12.5 s, area 10000: too small for 256px
        (1024, 768, 1, 0.0, True),  # an image
    ]
    h, w, t, fps, img = (list(x) for x in zip(*rows))
    table = pa.table(
        {
            "path": [f"v{i}.{'png' if im else 'mp4'}" for i, im in enumerate(img)],
            "text": ["x"] * len(rows),
            "num_frames": t,
            "height": h,
            "width": w,
            "fps": fps,
            "aspect_ratio": [a / b for a, b in zip(h, w)],
            "resolution": [a * b for a, b in zip(h, w)],
            "is_image": img,
        }
    )
    path = tmp_path / "data" / "m.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    return path


BUCKETS = (
    "data.bucket=opensora",
    "data.bucket_config={256px: {1: [1.0, 4], 65: [1.0, 2], 33: [1.0, 2]}}",
)


def test_counts_and_histograms(manifest, tmp_path):
    report = inspect_manifest(manifest, out=tmp_path / "fig.png")
    assert (report.rows, report.videos, report.images) == (8, 7, 1)
    # 3 x 10 s + 2 x 3 s + 1/3 s + 12.5 s = 48.83 s
    assert report.hours == pytest.approx((30 + 6 + 1 / 3 + 12.5) / 3600)
    duration, fps, side, aspect = report.histograms
    # bins 0-1, 1-2, 2-4, 4-8, 8-16, ...: 1/3 s; 3 s x 2; 10 s x 3 and 12.5 s
    assert duration.counts[:5] == [1, 0, 2, 0, 4]
    assert dict(zip(fps.labels, fps.counts))["23.5-24.5"] == 4 and fps.missing == 0
    # short sides 1080 x 3 -> 1080-1440; 720 x 2; 480 -> 480-720; 100 -> 0-240; 768 (image) -> 720-1080
    assert dict(zip(side.labels, side.counts)) == {
        "0-240 px": 1,
        "240-360 px": 0,
        "360-480 px": 0,
        "480-720 px": 1,
        "720-1080 px": 3,
        "1080-1440 px": 3,
        "1440-2160 px": 0,
        ">= 2160 px": 0,
    }
    # h / w: 0.5625 x 5 -> 0.5-0.6; 1.0 x 2 -> 0.95-1.05; 1.333 -> 1.3-1.6
    assert dict(zip(aspect.labels, aspect.counts))["0.5-0.6"] == 5
    assert dict(zip(aspect.labels, aspect.counts))["0.95-1.05"] == 2
    assert dict(zip(aspect.labels, aspect.counts))["1.3-1.6"] == 1
    assert report.policy is None and "bucket policy" not in report.text()
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_MAGIC


def test_bucket_table(manifest):
    cfg = load_config(None, list(BUCKETS))
    report = inspect_manifest(manifest, cfg)
    # No fps_max: T = frames. 1080p rows: 240 >= 65 -> 256px/65/16:9 (3 rows, batch 2: 1 batch, 1 left over);
    # 720p rows: 90 -> 65, same bucket; so 5 rows, 2 batches, remainder 1. The image: 256px/1/3:4 (h/w 1.333).
    buckets = {b.name: (b.samples, b.batches) for b in report.buckets}
    assert buckets == {"256px/65/16:9": (5, 2), "256px/1/3:4": (1, 0)}
    assert report.dropped == {"too_small": 1, "too_short": 1, "remainder": 2}
    text = report.text()
    assert "bucket policy opensora (epoch 0)" in text
    assert "256px/65/16:9" in text and "too_small 1" in text and "remainder 2" in text
    assert report.png == default_png(manifest) == manifest.parent / "m.inspect.png"
    assert report.png.read_bytes()[:8] == PNG_MAGIC


def test_cli(manifest, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        "data:\n  bucket: opensora\n  bucket_config:\n    256px: {1: [1.0, 4], 65: [1.0, 2], 33: [1.0, 2]}\n"
    )
    out = tmp_path / "x.png"
    assert main(["inspect", str(manifest), "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rows: 8 (7 videos, 1 images)" in printed and "256px/65/16:9" in printed
    assert out.read_bytes()[:8] == PNG_MAGIC
    # Overrides alone make a config too.
    assert main(["inspect", str(manifest), "--out", str(out), "data.bucket=fixed", "data.num_frames=65"]) == 0
    assert "bucket policy fixed" in capsys.readouterr().out
    # Bad input: one line, exit 2.
    assert main(["inspect", str(tmp_path / "missing.parquet")]) == 2
    err = capsys.readouterr().err
    assert "manifest not found" in err and len(err.strip().splitlines()) == 1
    assert main(["inspect", str(manifest), "data.bucket=opensora"]) == 2
    assert "bucket_config" in capsys.readouterr().err
