"""Training samples from tensors extracted beforehand: the manifest's ``latent`` (and ``text_fea``) files.

Pyramid Flow's recommended path (SEED_FACTS.md): ``tools/extract_video_vae_latents.py`` writes one torch file
per video, and ``tools/extract_text_features.py`` one per caption; training then reads those and never a video
or a text encoder. fast-DiT (issue 15) writes one ``.npy`` per image (and per label) the same way. This
dataset reads any of them through the manifest (``latent``, ``text_fea`` and an optional ``label`` column):

- **latent files**: ``.pt``/``.pth`` (loaded only with ``torch.load(weights_only=True)``: tensors and plain
  containers, never code), ``.npy`` (``allow_pickle=False``) or ``.safetensors``; a tensor, or a dict with a
  ``latent`` key (or a single tensor). Pyramid Flow stores ``(1, C, T, H, W)`` bf16 VAE samples *before*
  its latent normalisation; fast-DiT ``(1, C, H, W)`` float32 already scaled by 0.18215. A leading batch
  dimension of 1 is dropped, and an image latent ``(C, H, W)`` becomes ``(C, 1, H, W)``.
- **text_fea files**: a dict as Pyramid Flow writes it, ``{prompt_embed (1, L, D), prompt_attention_mask
  (1, L), pooled_prompt_embed (1, P)}`` (T5 tokens padded to 128 with their mask, and the pooled CLIP
  vector), or frameloom's own ``{emb, mask, extra.<name>}``; the tokens are trimmed to the mask's real
  positions (as the text cache stores them) and the pooled vector becomes ``text_extras["pooled"]`` (P,).
- ``data.latent_normalization``: Pyramid Flow normalises at training time (``get_vae_latent``): the first
  latent frame ``(z - s1) * k1`` (miniflux ``pyramid_flux``: s1 = -0.04, k1 = 1 / 1.8726; SD3
  ``pyramid_mmdit``: s1 = 0.1490, k1 = 1 / 1.8415), the others ``(z + 0.2343) / 3.0986``; ``none`` takes
  the stored values as the denoiser's latents (fast-DiT's are already scaled); ``auto`` (default) is the
  family's (``resolve_normalization``: the pyramid_flow family's variant, else ``none``).

Items have the cached dataset's shape: ``{"latent": (C, t, h, w) float, "text_emb": (L, D), "text_mask":
(L,) bool, "index": i, "text_extras": {name: tensor}}``; a row without ``text_fea`` gives ``"text"`` (its
caption) instead, for the trainer's text encoder. Under a bucket policy a latent is cut to its bucket's
latent length (Pyramid Flow keeps the first ``max_frames`` latent frames the same way). ``check_first``
compares the first row's tensors with the model before training starts, for a one-line error.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from frameloom.data.manifest import load_manifest, read_manifest
from frameloom.data.paths import OutsideRoot, PathRules, resolve_entry
from frameloom.errors import FrameloomError

__all__ = [
    "LATENT_NORMALIZATIONS",
    "PrecomputedDataset",
    "PrecomputedError",
    "collate_precomputed",
    "has_latents",
    "load_tensor_file",
    "normalize_latent",
    "resolve_normalization",
    "text_features",
]

LATENT_NORMALIZATIONS: dict[str, tuple[float, float] | None] = {
    "none": None,
    "pyramid_flux": (-0.04, 1 / 1.8726),
    "pyramid_mmdit": (0.1490, 1 / 1.8415),
}
"""First-frame (shift, scale) of Pyramid Flow's latent normalisation per DiT (``pyramid_dit_for_video_gen_pipeline``)."""
PYRAMID_VIDEO_SHIFT, PYRAMID_VIDEO_SCALE = -0.2343, 1 / 3.0986
"""Pyramid Flow's normalisation of the latent frames after the first."""
_PYRAMID_VARIANTS = {"miniflux": "pyramid_flux", "sd3": "pyramid_mmdit"}
"""Pyramid Flow's DiT variant (its codec's ``variant``) -> the normalisation of its raw stored latents."""
_TOKEN_KEYS = ("prompt_embed", "text_emb", "emb")
_MASK_KEYS = ("prompt_attention_mask", "text_mask", "mask")
_POOLED_KEYS = {"pooled_prompt_embed": "pooled", "pooled": "pooled"}


class PrecomputedError(FrameloomError):
    """A pre-extracted tensor file that cannot be used (unreadable, the wrong kind, the wrong shape)."""


def has_latents(manifest: str | os.PathLike) -> bool:
    """Whether every row of the manifest names a ``latent`` file (reads that column only)."""
    table = read_manifest(manifest, columns=["latent"])
    return "latent" in table.column_names and table.num_rows > 0 and table.column("latent").null_count == 0


def load_tensor_file(path: str | os.PathLike) -> Any:
    """A ``.pt``/``.pth`` (``weights_only``), ``.npy`` (no pickles) or ``.safetensors`` file's content:
    a tensor, or a dict of tensors. Anything else is a ``PrecomputedError``, never executed."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrecomputedError(
            f"{path} holds more than tensors; refused (weights_only=True): {first}"
        ) from None
    except FileNotFoundError:
        raise PrecomputedError(f"tensor file not found: {path}") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file can raise anything; it is one clear line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrecomputedError(f"cannot load tensor file {path}: {text}") from None


def _the_tensor(content: Any, path: Path, key: str) -> torch.Tensor:
    if isinstance(content, torch.Tensor):
        return content
    if isinstance(content, dict):
        if isinstance(content.get(key), torch.Tensor):
            return content[key]
        tensors = [v for v in content.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    raise PrecomputedError(f"{path}: expected a tensor or a dict with {key!r}, got {type(content).__name__}")


def normalize_latent(latent: torch.Tensor, mode: str) -> torch.Tensor:
    """Pyramid Flow's latent normalisation (``get_vae_latent``; module doc) of a ``(C, T, H, W)`` latent:
    frame 0 ``(z - s1) * k1``, frames 1.. ``(z - s) * k``; ``none`` returns it unchanged."""
    if mode not in LATENT_NORMALIZATIONS:
        raise PrecomputedError(
            f"data.latent_normalization must be one of {', '.join(LATENT_NORMALIZATIONS)}, got {mode!r}"
        )
    first = LATENT_NORMALIZATIONS[mode]
    if first is None:
        return latent
    out = latent.float().clone()  # (C, T, H, W)
    out[:, :1] = (out[:, :1] - first[0]) * first[1]
    out[:, 1:] = (out[:, 1:] - PYRAMID_VIDEO_SHIFT) * PYRAMID_VIDEO_SCALE
    return out


def resolve_normalization(mode: str, family: str, codec: Any) -> str:
    """``data.latent_normalization`` with ``auto`` made concrete: Pyramid Flow's files hold raw VAE latents
    (its tools normalise at training time), so the ``pyramid_flow`` family takes its variant's normalisation
    (the codec's ``variant``: miniflux -> ``pyramid_flux``, sd3 -> ``pyramid_mmdit``); every other family's
    files (fast-DiT's) are stored as the denoiser takes them (``none``)."""
    if mode != "auto":
        return mode
    if family == "pyramid_flow":
        variant = getattr(codec, "variant", None)
        if variant not in _PYRAMID_VARIANTS:
            raise PrecomputedError(
                f"data.latent_normalization=auto: unknown Pyramid Flow variant {variant!r}; set pyramid_flux or "
                "pyramid_mmdit"
            )
        return _PYRAMID_VARIANTS[variant]
    return "none"


def latent_from(content: Any, path: Path) -> torch.Tensor:
    """The ``(C, t, h, w)`` latent of a latent file's content (module doc: batch of one dropped, an image
    latent given one frame)."""
    latent = _the_tensor(content, path, "latent")
    if latent.dim() in (4, 5) and latent.shape[0] == 1:
        latent = latent[0]
    if latent.dim() == 3:
        latent = latent.unsqueeze(1)  # (C, H, W) -> (C, 1, H, W)
    if latent.dim() != 4:
        raise PrecomputedError(
            f"{path}: a latent must be (C, T, H, W) (or with a batch of 1), got {tuple(latent.shape)}"
        )
    return latent


def text_features(content: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(emb (L, D), mask (L,) bool, extras {name: (...)})`` of a text_fea file's content (module doc)."""
    if isinstance(content, torch.Tensor):
        content = {"emb": content}
    if not isinstance(content, dict):
        raise PrecomputedError(f"{path}: expected a dict of text features, got {type(content).__name__}")
    emb = next((content[k] for k in _TOKEN_KEYS if isinstance(content.get(k), torch.Tensor)), None)
    if emb is None:
        raise PrecomputedError(
            f"{path}: no token features (one of {', '.join(_TOKEN_KEYS)}); has {', '.join(map(str, content))}"
        )
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.dim() != 2:
        raise PrecomputedError(
            f"{path}: token features must be (L, D) (or with a batch of 1), got {tuple(emb.shape)}"
        )
    mask = next((content[k] for k in _MASK_KEYS if isinstance(content.get(k), torch.Tensor)), None)
    mask = torch.ones(emb.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    if mask.shape[0] != emb.shape[0]:
        raise PrecomputedError(f"{path}: mask of {mask.shape[0]} tokens for {emb.shape[0]} token features")
    extras: dict[str, torch.Tensor] = {}
    for key, value in content.items():
        if not isinstance(value, torch.Tensor) or key in _TOKEN_KEYS or key in _MASK_KEYS:
            continue
        name = _POOLED_KEYS.get(key, key[len("extra.") :] if key.startswith("extra.") else key)
        extras[name] = value[0] if value.dim() >= 2 and value.shape[0] == 1 else value
    return emb[mask], mask[mask], extras  # trimmed to the real tokens, as the text cache stores them


def latent_label(path: Path) -> torch.Tensor:
    """A label stored as a tensor file (fast-DiT writes one ``.npy`` per label): its single value."""
    value = _the_tensor(load_tensor_file(path), path, "label").reshape(-1)
    return value[0] if value.numel() == 1 else value


def collate_precomputed(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack precomputed items: ``latent (B, C, t, h, w)``, ``index``; text as ``collate_text`` does when
    every item has features (``text_emb``, ``text_mask``, ``text_extras``), else ``text`` (captions) for the
    text encoder, and ``text_features`` with the features of the items that have them (``None`` for the
    others); ``label (B, ...)`` when the items carry one."""
    from frameloom.cache.dataset import collate_text

    shapes = {tuple(item["latent"].shape) for item in batch}
    if len(shapes) > 1:
        raise PrecomputedError(
            f"latents of one batch must share a shape, got {sorted(shapes)} (use a bucket policy)"
        )
    if all("text_emb" in item for item in batch):
        out = collate_text(batch)
    else:
        out = {
            "latent": torch.stack([item["latent"] for item in batch]),
            "index": torch.tensor([item["index"] for item in batch], dtype=torch.long),
            "text": [item.get("text", "") for item in batch],
            "text_features": [
                (item["text_emb"], item["text_mask"], item.get("text_extras", {}))
                if "text_emb" in item
                else None
                for item in batch
            ],
        }
    if all("label" in item for item in batch):
        out["label"] = torch.stack([torch.as_tensor(item["label"]) for item in batch])
    return out


class PrecomputedDataset(Dataset):
    """Items from the manifest's pre-extracted tensors (module doc).

    ``latent_frames(num_frames) -> t`` maps a bucket's clip frames to latent frames (the codec's temporal
    compression); ``spec_frames`` is the clip length without buckets. ``normalization`` is
    ``data.latent_normalization``; ``rules`` the path rules (checked on load, and per file, symlinks
    followed, when it is read).
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        *,
        latent_frames: Callable[[int], int] | None = None,
        spec_frames: int | None = None,
        normalization: str = "none",
        rules: PathRules | None = None,
        empty_text_fea: str | os.PathLike | None = None,
    ):
        if normalization not in LATENT_NORMALIZATIONS:
            raise PrecomputedError(
                f"data.latent_normalization must be one of auto, {', '.join(LATENT_NORMALIZATIONS)}, got "
                f"{normalization!r}"
            )
        self.manifest = Path(manifest)
        self.root = self.manifest.resolve().parent
        self.rules = rules or PathRules()
        self.table = load_manifest(self.manifest, self.rules)
        if "latent" not in self.table.column_names or self.table.column("latent").null_count:
            missing = (
                self.table.num_rows
                if "latent" not in self.table.column_names
                else self.table.column("latent").null_count
            )
            raise PrecomputedError(
                f"{self.manifest}: {missing} row(s) have no 'latent' file; every row needs one"
            )
        self.latent_frames = latent_frames
        self.spec_frames = spec_frames
        self.normalization = normalization
        self.policy = None
        self.empty_text_fea = empty_text_fea
        col = self.table.column("text_fea") if "text_fea" in self.table.column_names else None
        self.text_complete = col is not None and col.null_count == 0

    collate = staticmethod(collate_precomputed)
    draws_per_epoch = False

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict[str, Any]:
        return self.table.slice(i, 1).to_pylist()[0]

    def use_buckets(self, planner: Any, *, seed: int) -> None:  # noqa: ARG002 - no random draws here
        """Called by ``sampler.build_sampler``: items become ``SampleRef``s; latents are cut to their bucket."""
        self.policy = None if planner is None else planner.policy

    def _file(self, value: str) -> Path:
        try:
            return resolve_entry(self.root, value, self.rules.extra_roots, bound=self.rules.strict)
        except OutsideRoot as exc:
            raise PrecomputedError(f"{value}: outside_root: {exc.detail}") from None

    def load_latent(self, row: dict[str, Any]) -> torch.Tensor:
        path = self._file(row["latent"])
        return normalize_latent(latent_from(load_tensor_file(path), path), self.normalization)

    def load_text(self, value: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        path = self._file(value)
        return text_features(load_tensor_file(path), path)

    def _wanted_frames(self, bucket: int) -> int | None:
        if self.policy is not None and bucket >= 0:
            frames = int(self.policy.table.num_frames[bucket])
        else:
            frames = self.spec_frames
        if frames is None or self.latent_frames is None:
            return None
        return self.latent_frames(frames)

    def __getitem__(self, item: Any) -> dict[str, Any]:
        index, bucket, _epoch = tuple(item) if isinstance(item, tuple) else (int(item), -1, 0)
        row = self.row(index)
        latent = self.load_latent(row)  # (C, T, H, W)
        t = self._wanted_frames(bucket)
        if t is not None:
            if latent.shape[1] < t:
                raise PrecomputedError(
                    f"row {index}: latent {row['latent']} has {latent.shape[1]} latent frames, the clip needs {t}"
                )
            latent = latent[:, :t]  # the first t latent frames (Pyramid Flow: latent[:, :, :max_frames])
        out: dict[str, Any] = {"latent": latent.float(), "index": index}
        if row.get("text_fea") is not None:
            out["text_emb"], out["text_mask"], out["text_extras"] = self.load_text(row["text_fea"])
        else:
            out["text"] = "" if row.get("text") is None else str(row["text"])
        label = row.get("label")
        if label is not None:
            out["label"] = (
                torch.as_tensor(label) if not isinstance(label, str) else latent_label(self._file(label))
            )
        return out

    @property
    def text_dim(self) -> int | None:
        """The token feature size of the first row's text_fea (None without text features)."""
        first = self._first_text()
        return None if first is None else int(first[0].shape[1])

    def _first_text(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:
        if "text_fea" not in self.table.column_names:
            return None
        col = self.table.column("text_fea")
        valid = pc.indices_nonzero(pc.is_valid(col)).to_pylist()
        return self.load_text(col[valid[0]].as_py()) if valid else None

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None:
        """The empty prompt's features (caption dropout): ``data.empty_text_fea``, else a row whose text is
        "" and has a text_fea file; None when neither exists."""
        if self.empty_text_fea is not None:
            return text_features(load_tensor_file(self.empty_text_fea), Path(self.empty_text_fea))
        if "text_fea" not in self.table.column_names:
            return None
        empty = pc.and_(
            pc.equal(pc.fill_null(self.table.column("text"), ""), ""),
            pc.is_valid(self.table.column("text_fea")),
        )
        rows = pc.indices_nonzero(empty).to_pylist()
        return self.load_text(self.table.column("text_fea")[rows[0]].as_py()) if rows else None

    def text_sample(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The token features of up to ``count`` rows evenly spaced over the manifest (text statistics)."""
        if "text_fea" not in self.table.column_names:
            return []
        col = self.table.column("text_fea")
        valid = np.asarray(pc.indices_nonzero(pc.is_valid(col)).to_numpy())
        if not len(valid):
            return []
        picks = valid[np.unique(np.linspace(0, len(valid) - 1, min(len(valid), count)).astype(np.int64))]
        return [self.load_text(col[int(i)].as_py())[:2] for i in picks]

    def check_extras(self, sizes: dict[str, int], empty: dict[str, torch.Tensor] | None = None) -> None:
        """Compare the last dimension of the first row's stored text extras (and of the empty prompt's,
        ``empty``) with ``sizes`` (name -> what the model takes; the first row must have each). One
        ``PrecomputedError`` line."""
        first = self._first_text()
        found = [("text features " + self._first_text_name(), first[2], True)] if first is not None else []
        if empty:  # (none when caption dropout is off: never used)
            found.append(("the empty prompt's text features", empty, False))
        for where, extras, needed in found:
            for name, want in sizes.items():
                if name in extras and extras[name].shape[-1] != want:
                    raise PrecomputedError(
                        f"{where} have a {name!r} vector of {extras[name].shape[-1]}, but the model takes {want}"
                    )
                if name not in extras and needed:
                    raise PrecomputedError(
                        f"{where} have no {name!r} vector (e.g. Pyramid Flow's pooled_prompt_embed), which the "
                        "model takes"
                    )

    def _first_text_name(self) -> str:
        col = self.table.column("text_fea")
        return str(col[pc.indices_nonzero(pc.is_valid(col)).to_pylist()[0]].as_py())

    def check_first(
        self,
        channels: int,
        grid: tuple[int, int, int] | None,
        text_dim: int | None,
        where: str = "data.height x data.width",
    ) -> None:
        """Compare the first row's latent (channels, latent height and width, and enough latent frames for
        ``grid``'s t: the latent grid the row trains at, which ``where`` names for the message) and the first
        text features (token size) with the model. One ``PrecomputedError`` line."""
        row = self.row(0)
        latent = self.load_latent(row)
        shape = tuple(latent.shape)
        if shape[0] != channels:
            raise PrecomputedError(
                f"precomputed latent {row['latent']} has shape {shape}: {shape[0]} channels, but the model takes "
                f"{channels} (model.codec / the family's VAE)"
            )
        if grid is not None:
            t, h, w = grid
            if shape[2:] != (h, w):
                raise PrecomputedError(
                    f"precomputed latent {row['latent']} has shape {shape}: a {shape[2]}x{shape[3]} latent grid, but "
                    f"{where} gives {h}x{w}; set them to the extraction's size"
                )
            if shape[1] < t:
                frames = "data.num_frames" if where.startswith("data.") else where
                raise PrecomputedError(
                    f"precomputed latent {row['latent']} has {shape[1]} latent frames, {frames} needs {t}"
                )
        first = self._first_text() if text_dim is not None else None
        if first is not None and first[0].shape[1] != text_dim:
            col = self.table.column("text_fea")
            name = col[pc.indices_nonzero(pc.is_valid(col)).to_pylist()[0]].as_py()
            raise PrecomputedError(
                f"text features {name} have {first[0].shape[1]} dims per token, but the model takes {text_dim}"
            )
