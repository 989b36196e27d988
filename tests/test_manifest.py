"""Canonical manifest: schema, Parquet/CSV round trips, validation errors, path resolution."""

from pathlib import Path

import pyarrow as pa
import pytest

from frameloom.data.manifest import ManifestError, from_rows, read_manifest, resolve_path, write_manifest

ROWS = [
    {"path": "a.mp4", "text": "a cat", "num_frames": 49, "height": 480, "width": 720, "fps": 24.0},
    {
        "path": "/abs/b.mp4",
        "text": "a dog",
        "num_frames": 17,
        "height": 720,
        "width": 1280,
        "fps": 30.0,
        "captions": ["a dog", "a brown dog"],
        "crop": [0, 640, 0, 360],
        "aesthetic": 5.5,
        "color": "red",
    },
]


def test_derived_columns_and_types():
    table = from_rows(ROWS)
    assert table.column("aspect_ratio").to_pylist() == [480 / 720, 720 / 1280]
    assert table.column("resolution").to_pylist() == [345600, 921600]
    assert table.schema.field("num_frames").type == pa.int64()
    assert table.schema.field("captions").type == pa.list_(pa.string())
    assert table.column("color").to_pylist() == [None, "red"]  # extra attributes are kept


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_round_trip(tmp_path, suffix):
    table = from_rows(ROWS)
    path = write_manifest(table, tmp_path / f"m{suffix}")
    back = read_manifest(path)
    assert back.to_pylist() == table.to_pylist()


def test_opensora_csv_is_a_manifest(tmp_path):
    csv = tmp_path / "meta.csv"
    csv.write_text(
        "path,text,num_frames,height,width,aspect_ratio,resolution,fps\nv.mp4,hi,51,256,256,1.0,65536,24.0\n"
    )
    assert read_manifest(csv).to_pylist()[0]["num_frames"] == 51


def test_validation_errors(tmp_path):
    with pytest.raises(ManifestError, match="missing required column"):
        from_rows([{"path": "a", "text": "", "num_frames": 1, "height": 1}])
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.parquet")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text,num_frames,height,width,aspect_ratio,resolution,fps\nv.mp4,hi,many,1,1,1,1,1\n")
    with pytest.raises(ManifestError, match="num_frames"):
        read_manifest(bad)


def test_resolve_path(tmp_path):
    assert resolve_path(tmp_path / "m.parquet", "clips/a.mp4") == tmp_path / "clips" / "a.mp4"
    assert resolve_path(tmp_path / "m.parquet", "/x/a.mp4") == Path("/x/a.mp4")
