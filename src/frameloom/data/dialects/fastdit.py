"""The fast-DiT dialect: pre-extracted SD-VAE features, one ``.npy`` per image and one per label.

fast-DiT's ``extract_features.py`` writes ``<root>/imagenet256_features/<i>.npy`` (float32 ``(1, 4, h, w)``,
``vae.encode(x).latent_dist.sample() * 0.18215``) and ``<root>/imagenet256_labels/<i>.npy`` (int ``(1,)``),
and its ``train.py`` pairs the two folders by their sorted file lists. Here files are paired by name (an
unpaired file is rejected, where upstream only asserts equal counts), and each pair becomes a manifest row
whose ``path`` and ``latent`` are the feature file, with ``label``, ``text`` (the label as a string: the
caption a class-conditional model reads), ``num_frames`` 1 and the image size (8 x the latent grid), so
training reads the latents directly (data/precomputed.py) and never an image or a VAE.

``source``: the features root (holding one ``*_features`` + ``*_labels`` pair of folders), or the
``*_features`` folder itself. Files are read with ``allow_pickle=False``; only array headers and labels are
read while listing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from frameloom.data.dialects.base import BAD_ENTRY, Listing, Part
from frameloom.errors import FrameloomError

__all__ = ["VAE_FACTOR", "feature_folders", "read_fastdit"]

VAE_FACTOR = 8
"""SD-VAE's spatial compression: an (h, w) latent grid is an (8h, 8w) image."""


def feature_folders(source: Path) -> tuple[Path, Path]:
    """(features folder, labels folder) of a fast-DiT features root (or of its ``*_features`` folder)."""
    if source.name.endswith("_features"):
        labels = source.with_name(source.name[: -len("_features")] + "_labels")
        if labels.is_dir():
            return source, labels
        raise FrameloomError(f"{source}: no sibling labels folder {labels.name}")
    pairs = [
        (d, d.with_name(d.name[: -len("_features")] + "_labels"))
        for d in sorted(source.iterdir())
        if d.is_dir() and d.name.endswith("_features")
    ]
    pairs = [(f, lab) for f, lab in pairs if lab.is_dir()]
    if len(pairs) != 1:
        raise FrameloomError(
            f"{source}: expected one <name>_features + <name>_labels pair of folders (fast-DiT's "
            f"imagenet256_features / imagenet256_labels), found {len(pairs)}"
        )
    return pairs[0]


def _npy_files(folder: Path) -> dict[str, Path]:
    return {e.name: Path(e.path) for e in os.scandir(folder) if e.is_file() and e.name.endswith(".npy")}


def read_fastdit(source: str | os.PathLike) -> Listing:
    """The pairs of a fast-DiT features root as a ``Listing`` (module docstring), in upstream's sorted order."""
    source = Path(source)
    if not source.is_dir():
        raise FrameloomError(f"--format fastdit needs a folder, but {source} is not one")
    features_dir, labels_dir = feature_folders(source)
    features, labels = _npy_files(features_dir), _npy_files(labels_dir)
    columns: dict[str, list] = {name: [] for name in _COLUMNS}
    rejects: list[tuple[str, str, str]] = []
    for name in sorted(set(labels) - set(features)):
        rejects.append((str(labels[name]), BAD_ENTRY, f"label without a feature file {name}"))
    for name in sorted(features):
        feature = features[name]
        if name not in labels:
            rejects.append((str(feature), BAD_ENTRY, f"no label file {labels_dir.name}/{name}"))
            continue
        try:
            shape = np.load(feature, mmap_mode="r", allow_pickle=False).shape
            label_value = np.load(labels[name], allow_pickle=False).reshape(-1)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty or cut-short file
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            rejects.append((str(feature), BAD_ENTRY, f"unreadable .npy: {text}"))
            continue
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[0] != 1) or label_value.size != 1:
            detail = f"feature shape {shape} (expected (1, C, h, w)), {label_value.size} label value(s)"
            rejects.append((str(feature), BAD_ENTRY, detail))
            continue
        if label_value.dtype.kind not in "iu" or int(label_value[0]) < 0:
            rejects.append((str(feature), BAD_ENTRY, f"label {label_value[0]!r} is not a class index"))
            continue
        label = int(label_value[0])
        h, w = shape[-2:]
        rel = feature.relative_to(source).as_posix()
        for key, value in zip(_COLUMNS, (rel, rel, label, str(label), 1, int(h) * VAE_FACTOR,
                                         int(w) * VAE_FACTOR, 1.0, True)):  # fmt: skip
            columns[key].append(value)
    table = pa.table({key: pa.array(values, _COLUMNS[key]) for key, values in columns.items()})
    # Files found by scanning the root: they (and symlinks among them) must stay under it.
    return Listing([Part(source, table, str(source))], bound=True, rejects=rejects)


_COLUMNS: dict[str, pa.DataType] = {
    "path": pa.string(),
    "latent": pa.string(),
    "label": pa.int64(),
    "text": pa.string(),
    "num_frames": pa.int64(),
    "height": pa.int64(),
    "width": pa.int64(),
    "fps": pa.float64(),
    "is_image": pa.bool_(),
}
"""A fast-DiT row: ``path`` and ``latent`` are the feature file; the label is also the caption."""
