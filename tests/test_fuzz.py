"""Fuzzing every dialect: random mutations of a valid source (cell types, nulls, huge numbers, unicode, bad
bytes, truncation). Every run of ``frameloom prepare`` (and of ``convert`` on what it kept) must end in a
clean manifest or in one ``frameloom CMD: error: ...`` line with exit 2, never in a traceback."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frameloom.cli import main
from frameloom.data.manifest import read_manifest
from test_dialects import make_layout

RUNS = int(os.environ.get("FRAMELOOM_FUZZ_RUNS", "24"))  # mutated inputs per dialect (and per Parquet)

VALUES = [None, "", "nan", "-1", "0", "1e30", "-1e308", "3.5", "abc", "😀 ünï", "[1,2", "[]", "{}", "true",
          "\u2028", "\f", "x" * 5000, "../../etc/passwd", "/", "\\", "\0"]  # fmt: skip
JSON_VALUES = [None, "", "abc", -1, 0, 1e30, 2**70, 3.5, True, [], {}, [1], [1, 2, 3, 4, 5], "😀", {"height": "x"},
               [None, None], float("inf")]  # fmt: skip


def _outcome(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: its own usage line
        code = int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - exactly what the test hunts
        pytest.fail(f"traceback for {argv}: {type(exc).__name__}: {exc}")
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line and "it/s]" not in line]
    return code, "\n".join(err)


def _check(argv: list[str], capsys, out: Path, tally: dict) -> None:
    code, err = _outcome(argv, capsys)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith(f"frameloom {argv[0]}: error: "), err
        tally["errors"] += 1
        return
    tally["manifests"] += 1
    if argv[0] == "prepare":
        read_manifest(out)  # what was written reads back
        for fmt, name in (("opensora", "o.csv"), ("pyramid", "p.jsonl"), ("opensora-plan", "pl/data.txt")):
            code, err = _outcome(["convert", str(out), "--to", fmt, "--out", str(out.parent / name)], capsys)
            assert code in (0, 2) and (code == 0 or len(err.splitlines()) == 1), err


def _mutate_text(rng: random.Random, data: bytes) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return data[: rng.randrange(len(data) + 1)]  # truncated
    if kind == 1:
        i = rng.randrange(len(data) + 1)
        return (
            data[:i] + rng.choice([b"\xff\xfe", b"\x00", "\u2028".encode(), b"\r", b'"', b"\n\n"]) + data[i:]
        )
    if kind == 2:
        lines = data.split(b"\n")
        rng.shuffle(lines)
        return b"\n".join(lines)
    return data + rng.choice([b"\n,,,,", b"\n{", b"\n[]", "\nü".encode()])


def _mutate_csv(rng: random.Random, text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    r = rng.randrange(len(rows))
    c = rng.randrange(len(rows[r]))
    value = rng.choice(VALUES)
    rows[r][c] = "" if value is None else value
    if rng.random() < 0.2:
        rows[r] = rows[r][: rng.randrange(len(rows[r]) + 1)]  # a short row
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _mutate_records(rng: random.Random, records: list) -> list:
    records = copy.deepcopy(records)
    rec = rng.choice(records)
    if not isinstance(rec, dict) or rng.random() < 0.1:
        records[rng.randrange(len(records))] = rng.choice(JSON_VALUES)
        return records
    key = rng.choice([*rec.keys(), "num_frames", "fps", "cut", "crop", "cap", "resolution", "latent"])
    if rng.random() < 0.2:
        rec.pop(key, None)
    else:
        rec[key] = rng.choice(JSON_VALUES)
    return records


FORMATS = ["folder", "opensora", "opensora-plan", "cogvideox", "pyramid"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_prepare_never_tracebacks(tmp_path, capsys, fmt):
    rng = random.Random(FORMATS.index(fmt))
    source = make_layout(fmt, tmp_path / "d")
    root = tmp_path / "d"
    targets = {
        "folder": root / "captions.jsonl",
        "opensora": root / "meta.csv",
        "opensora-plan": root / "anno.json",
        "cogvideox": root / "prompts.txt",
        "pyramid": root / "data.jsonl",
    }
    target = targets[fmt]
    original = target.read_bytes()
    tally = {"errors": 0, "manifests": 0}
    for run in range(RUNS):
        if fmt == "opensora" and run % 2 == 0:
            data = _mutate_csv(rng, original.decode()).encode()
        elif fmt == "opensora-plan" and run % 2 == 0:
            data = json.dumps(_mutate_records(rng, json.loads(original)), allow_nan=True).encode()
        elif fmt in ("pyramid", "folder") and run % 2 == 0:
            lines = [json.loads(x) for x in original.decode().splitlines() if x.strip()]
            data = "".join(json.dumps(x) + "\n" for x in _mutate_records(rng, lines)).encode()
        elif fmt == "cogvideox" and run % 3 == 0:
            target = root / rng.choice(["prompts.txt", "videos.txt", "images.txt"])
            data = _mutate_text(rng, target.read_bytes())
        else:
            data = _mutate_text(rng, original)
        backup = target.read_bytes()
        target.write_bytes(data)
        out = tmp_path / f"out{run}" / "m.parquet"
        flags = ["--trust-metadata"] if run % 3 == 1 else []
        _check(
            ["prepare", str(source), "--out", str(out), "--quiet", "--format", fmt, *flags],
            capsys,
            out,
            tally,
        )
        target.write_bytes(backup)
        target = targets[fmt]
    print(
        f"fuzz {fmt}: {RUNS} inputs, {tally['manifests']} manifests, {tally['errors']} one-line errors, 0 tracebacks"
    )
    assert tally["manifests"] + tally["errors"] == RUNS


def test_fuzz_parquet_cells_never_traceback(tmp_path, capsys):
    # Open-Sora Parquet tables and manifests with columns of the wrong Arrow type.
    rng = random.Random(7)
    source = make_layout("opensora", tmp_path / "d")
    prepared = tmp_path / "d" / "m.parquet"
    assert main(["prepare", str(source), "--out", str(prepared), "--quiet"]) == 0
    table = pq.read_table(prepared)
    tally = {"errors": 0, "manifests": 0}
    bad_columns = [
        lambda n: pa.array(["abc"] * n),
        lambda n: pa.array([None] * n, pa.null()),
        lambda n: pa.array([[1, 2]] * n),
        lambda n: pa.array([{"a": 1}] * n),
        lambda n: pa.array([1e30] * n),
        lambda n: pa.array([float("nan")] * n),
        lambda n: pa.array([-5] * n),
        lambda n: pa.array([True] * n),
        lambda n: pa.array([b"\xff"] * n, pa.binary()),
    ]
    for run in range(RUNS):
        name = rng.choice(table.column_names)
        col = rng.choice(bad_columns)(table.num_rows)
        mutated = table.set_column(table.column_names.index(name), name, col)
        path = tmp_path / f"p{run}" / "meta.parquet"
        path.parent.mkdir()
        pq.write_table(mutated, path)
        out = path.parent / "m.parquet"
        _check(
            ["prepare", str(path), "--out", str(out), "--quiet", "--allow-root", str(tmp_path / "d")],
            capsys,
            out,
            tally,
        )
        if run % 4 == 0:  # inspect draws a figure: a quarter of the inputs keep the test quick
            _check(["inspect", str(path), "--out", str(path.parent / "i.png")], capsys, path, tally)
    tried = RUNS + len(range(0, RUNS, 4))
    print(
        f"fuzz parquet: {tried} inputs, {tally['manifests']} clean, {tally['errors']} one-line errors, 0 tracebacks"
    )
    assert tally["manifests"] + tally["errors"] == tried


def _class_layout(root: Path) -> None:
    """imagenet: 4 PNGs listed by labels.csv and labels.jsonl; fastdit: 3 feature/label .npy pairs."""
    import numpy as np
    from PIL import Image

    lines = []
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"i{i}.png")
        lines.append({"path": f"i{i}.png", "label": i % 2, "class_name": ["cat", "dog"][i % 2]})
    (root / "labels.csv").write_text(
        "path,label,class_name\n" + "".join(f"{x['path']},{x['label']},{x['class_name']}\n" for x in lines)
    )
    (root / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for sub in ("f_features", "f_labels"):
        (root / "fd" / sub).mkdir(parents=True)
    for i in range(3):
        np.save(root / "fd" / "f_features" / f"{i}.npy", np.zeros((1, 4, 2, 2), np.float32))
        np.save(root / "fd" / "f_labels" / f"{i}.npy", np.array([i]))


@pytest.mark.parametrize("fmt", ["imagenet", "fastdit"])
def test_fuzz_class_dialects_never_traceback(tmp_path, capsys, fmt):
    # dit15's class dialects on the columnar listing: label tables (CSV and JSON lines) and .npy pairs.
    rng = random.Random(11 + (fmt == "fastdit"))
    root = tmp_path / "d"
    root.mkdir()
    _class_layout(root)
    tally = {"errors": 0, "manifests": 0}
    for run in range(RUNS):
        if fmt == "imagenet":
            target = root / ("labels.csv" if run % 2 == 0 else "labels.jsonl")
            source = target
            original = target.read_bytes()
            if run % 4 == 0:
                data = _mutate_csv(rng, original.decode()).encode()
            elif run % 4 == 1:
                lines = [json.loads(x) for x in original.decode().splitlines() if x.strip()]
                data = "".join(json.dumps(x) + "\n" for x in _mutate_records(rng, lines)).encode()
            else:
                data = _mutate_text(rng, original)
        else:
            source = root / "fd"
            target = root / "fd" / rng.choice(["f_features", "f_labels"]) / f"{rng.randrange(3)}.npy"
            original = target.read_bytes()
            cut = 0 if run < 2 else rng.randrange(len(original) + 1)  # an empty .npy first (EOFError)
            data = _mutate_text(rng, original) if run % 2 else original[:cut]
        target.write_bytes(data)
        out = tmp_path / f"out{run}" / "m.parquet"
        _check(["prepare", str(source), "--out", str(out), "--quiet", "--format", fmt], capsys, out, tally)
        target.write_bytes(original)
    print(
        f"fuzz {fmt}: {RUNS} inputs, {tally['manifests']} manifests, {tally['errors']} one-line errors, 0 tracebacks"
    )
    assert tally["manifests"] + tally["errors"] == RUNS
