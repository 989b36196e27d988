"""Cache keys: pure functions of exactly the inputs that determine a cached tensor.

CogVideoX's fine-tuning scripts cache latents in a folder named after the model and ``FxHxW`` under the data
root; change a video, a caption or the VAE and the stale files are silently reused until someone deletes
them by hand. frameloom keys every entry on its content instead:

- a video entry on (the file's identity, the clip spec, the row's own frame/region selection, the codec's
  identity);
- a text entry on (the caption, the text encoder's identity).

So changing a file re-encodes that file's entries only, changing the clip spec re-encodes all video entries
(but no text), and swapping the VAE or the text encoder re-encodes only that kind. Nothing is ever deleted
by hand; stale entries are simply never asked for again (and can be garbage-collected later).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from frameloom.data.captions import CaptionRules, row_caption
from frameloom.data.manifest import resolve_path
from frameloom.data.video import ClipSpec

__all__ = ["file_identity", "row_view", "video_key", "text_key", "caption", "row_video_key", "CHUNK"]

# How much of the head and tail of a file is hashed.
CHUNK = 1 << 20  # 1 MiB

# Bump when the meaning of an entry changes (layout, dtype policy...), so old entries are not reused.
KEY_VERSION = "frameloom-cache-v1"
EXTRA_PREFIX = "extra."
"""Text entries store a text encoder's extra per-caption tensors (``encode_extras``) under ``extra.<name>``."""


def file_identity(path: str | os.PathLike) -> str:
    """A cheap fingerprint of a file's content: sha256 of (size, mtime_ns, first MiB, last MiB).

    - ``size`` catches appends, truncations and most re-encodes;
    - ``mtime_ns`` catches in-place edits anywhere in the file (every normal write updates it), which the two
      hashed chunks alone would miss in the middle of a large video;
    - the first and last MiB catch a file replaced by another one that happens to share size and mtime (for
      example copied with ``cp -p``/``rsync -t``); together with the size, they pin container headers and the
      index (``moov`` atom) that decide what a decoder reads.

    Hashing whole files would be exact but reads every byte of a multi-terabyte data set; two MiB per file is
    cheap. The path is deliberately not part of it: the same file moved or shared by two manifests is reused.
    Copying a data set without preserving mtimes does re-encode it, which is the safe direction to err in.
    """
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size = stat.st_size
        h = hashlib.sha256()
        h.update(f"{size}|{stat.st_mtime_ns}|".encode())
        h.update(f.read(CHUNK))
        if size > CHUNK:
            # The last MiB; for files under 2 MiB, whatever follows the head (no byte is hashed twice).
            f.seek(max(size - CHUNK, CHUNK))
            h.update(f.read(CHUNK))
    return h.hexdigest()


def row_view(row: Mapping[str, Any]) -> str:
    """The manifest columns ``decode_clip`` reads besides the file itself, as stable text.

    Two rows can point at the same file but select different frames (``cut_start``/``cut_end``: scene cuts of
    one long video) or regions (``crop``), or override its ``rotation``; those must not share a cache entry.
    ``num_frames`` and ``fps`` are included because frame selection (``target_fps``, clip length checks)
    computes with the manifest's values, not the file's: a re-probed manifest that reports them differently
    must not reuse entries selected with the old values. Absent and empty columns read the same.
    """
    fields = {}
    for name in ("cut_start", "cut_end", "crop", "rotation", "is_image", "num_frames", "fps"):
        value = row.get(name)
        if value is not None:
            fields[name] = list(value) if isinstance(value, (list, tuple)) else value
    return json.dumps(fields, sort_keys=True, default=str)


def video_key(file_id: str, spec: ClipSpec, codec_identity: str, row_part: str = "") -> str:
    """Hex sha256 naming one clip's latent: the file, the clip spec, the row's selection, the codec.

    - ``file_id`` (``file_identity``): a changed file changes only its own entries;
    - ``spec.key()``: frame count, stride/fps, start, crop and size decide which pixels are encoded, so a new
      spec (e.g. another resolution) re-encodes every video but no text;
    - ``row_part`` (``row_view(row)``): per-row cuts/crops of a shared file;
    - ``codec_identity``: another VAE (or the same one in another dtype) gives other latents.
    """
    parts = [KEY_VERSION, "video", file_id, spec.key(), row_part, codec_identity]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def text_key(text: str, encoder_identity: str) -> str:
    """Hex sha256 naming one caption's embeddings: the exact caption text and the encoder's identity.

    The text is used verbatim (no stripping or lowercasing) because the tokenizer sees it verbatim; the
    encoder identity covers weights, tokenizer and ``max_length``. No video input is part of it, so two clips
    with the same caption share one entry and a change of clip spec never re-encodes text.
    """
    parts = [KEY_VERSION, "text", encoder_identity, text]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def caption(row: Mapping[str, Any], rules: CaptionRules | None = None, spec: ClipSpec | None = None) -> str:
    """The caption a row is trained with: its ``text`` column, ``""`` when empty (an unconditional sample),
    with the run's caption rules applied (``captions.row_caption``; ``spec`` is the clip spec the row is
    decoded with, for the fps suffix). The text key is on this final text, so changing a rule re-encodes
    exactly the captions whose text it changes."""
    return row_caption(row, rules, spec)


def row_video_key(
    row: Mapping[str, Any],
    manifest_path: str | os.PathLike,
    spec: ClipSpec,
    codec_identity: str,
    file_ids: dict[str, str] | None = None,
) -> str:
    """``video_key`` of a manifest row; ``file_ids`` memoizes ``file_identity`` per resolved path.

    Raises ``OSError`` when the row's file cannot be read.
    """
    path = str(resolve_path(manifest_path, row["path"]))
    if file_ids is None:
        file_ids = {}
    if path not in file_ids:
        file_ids[path] = file_identity(path)
    return video_key(file_ids[path], spec, codec_identity, row_view(row))
