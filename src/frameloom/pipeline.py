"""Builds the pieces a run needs from its config: device, clip spec, codec, text encoder, cache, datasets.

Shared by `cache`, `train`, `sample` and the quickstart so that each of them turns a config into components
in exactly one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from frameloom.config.schema import Config
from frameloom.data.captions import CaptionRules, row_caption
from frameloom.data.manifest import load_manifest
from frameloom.data.paths import OUTSIDE_ROOT, OutsideRoot, PathRules, resolve_entry
from frameloom.data.video import ClipSpec, DecodeError, decode_clip, row_fps_or_nan
from frameloom.errors import FrameloomError

TINY_BYT5 = "tiny-byt5"


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FrameloomError("train.device is cuda but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """`train.mixed_precision` -> the autocast dtype of training, validation and sampling (None: fp32):
    `auto` is bf16 on CUDA and fp32 elsewhere, `bf16` always, `no` never."""
    if mixed_precision == "no" or (mixed_precision == "auto" and device.type != "cuda"):
        return None
    if mixed_precision in ("auto", "bf16"):
        return torch.bfloat16
    raise FrameloomError(f"train.mixed_precision must be auto, bf16 or no, not {mixed_precision!r}")


def clip_spec(cfg: Config) -> ClipSpec:
    """The config's clip spec, checked: one stride rule, speed_factor >= 1, a known temporal crop and frame
    policy, and a num_frames valid under that policy (docs/datasets.md, "Frame rules")."""
    from frameloom.data.video import FRAME_POLICIES, TEMPORAL_CROPS, check_length

    d = cfg.data
    strides = [k for k in ("frame_stride", "target_fps", "fps_max") if getattr(d, k) is not None]
    if len(strides) > 1:
        raise FrameloomError(
            f"set at most one of data.frame_stride, data.target_fps and data.fps_max (got {strides})"
        )
    if d.speed_factor < 1:
        raise FrameloomError(f"data.speed_factor must be >= 1, got {d.speed_factor}")
    if d.temporal_crop not in TEMPORAL_CROPS:
        raise FrameloomError(
            f"data.temporal_crop must be one of {', '.join(TEMPORAL_CROPS)}, got {d.temporal_crop!r}"
        )
    if d.frame_policy is not None:
        if d.frame_policy not in FRAME_POLICIES:
            raise FrameloomError(
                f"data.frame_policy must be null or one of {', '.join(FRAME_POLICIES)}, got {d.frame_policy!r}"
            )
        check_length(d.num_frames, d.frame_policy, cfg.parallel.sp_size)  # ClipError is a FrameloomError
    return ClipSpec(
        num_frames=d.num_frames,
        frame_stride=d.frame_stride,
        target_fps=d.target_fps,
        height=d.height,
        width=d.width,
        fps_max=d.fps_max,
        speed_factor=d.speed_factor,
        temporal_crop=d.temporal_crop,
        frame_policy=d.frame_policy,
        sp_size=cfg.parallel.sp_size if d.frame_policy == "opensora_plan" else 1,
        resize=_checked_resize(d.resize),
        hflip=bool(d.hflip),
    )


def _checked_resize(name: str) -> str:
    if name not in ("cover", "adm"):
        raise FrameloomError(f"data.resize must be cover or adm, not {name!r}")
    return name


def caption_rules(cfg: Config) -> CaptionRules:
    """The config's caption rules (``data.caption_aesthetic``, ``data.caption_fps_suffix``,
    ``data.caption_motion_score``, ``data.caption_choice``, ``data.caption_clean``), checked."""
    d = cfg.data
    return CaptionRules(
        aesthetic=d.caption_aesthetic,
        fps_suffix=bool(d.caption_fps_suffix),
        motion_score=bool(d.caption_motion_score),
        choice=d.caption_choice,
        clean=d.caption_clean,
    )


def bucket_policy(cfg: Config):
    """The ``data.bucket`` policy bound to the manifest's columns (``data/buckets.py``); None for ``none``.

    Built once per run and shared by the cache (which entries exist) and the sampler (which it reads)."""
    from frameloom.data.buckets import build_policy, read_columns

    if cfg.data.bucket == "none":
        return None
    return build_policy(cfg, read_columns(manifest_path(cfg)))


def uncacheable(cfg: Config) -> list[str]:
    """Why this run's training input cannot come from the cache (empty: it can).

    The cache holds one clip and one caption per (row, bucket); a per-epoch random temporal window or a
    per-epoch random aesthetic phrase changes them every epoch, so such runs decode and encode on the fly
    (docs/datasets.md, "Caching")."""
    reasons = []
    if cfg.data.temporal_crop == "random":
        reasons.append("data.temporal_crop=random draws a new window every epoch")
    if cfg.data.caption_aesthetic == "random":
        reasons.append("data.caption_aesthetic=random draws a new phrase every epoch")
    return reasons


def path_rules(cfg: Config) -> PathRules:
    """The run's path rules (``data/paths.py``): ``data.extra_roots`` and ``data.strict_roots``."""
    return PathRules.make(cfg.data.extra_roots, cfg.data.strict_roots)


def use_precomputed(cfg: Config) -> bool:
    """Whether training reads pre-extracted tensors (``data/precomputed.py``): ``data.use_cache:
    precomputed``, or ``auto`` with a ``latent`` file named on every manifest row."""
    from frameloom.data.precomputed import has_latents

    if cfg.data.use_cache == "precomputed":
        return True
    return cfg.data.use_cache == "auto" and has_latents(manifest_path(cfg))


def precomputed_text_complete(cfg: Config) -> bool:
    """Whether every manifest row names a ``text_fea`` file (then no text encoder is loaded for training)."""
    from frameloom.data.manifest import read_manifest

    table = read_manifest(manifest_path(cfg), columns=["text_fea"])
    return "text_fea" in table.column_names and table.column("text_fea").null_count == 0


def precomputed_dataset(cfg: Config, codec: Any):
    """The pre-extracted-tensor dataset of the config: latents cut to the clip's latent length (the codec's
    temporal compression), ``data.latent_normalization`` (``auto``: the family's), ``data.empty_text_fea`` (relative to the
    manifest's folder), the run's path rules."""
    from frameloom.data.precomputed import PrecomputedDataset, resolve_normalization

    manifest = manifest_path(cfg)
    empty = cfg.data.empty_text_fea
    if empty is not None and not Path(empty).is_absolute():
        empty = str(manifest.resolve().parent / empty)
    if empty is not None and not Path(empty).is_file():
        raise FrameloomError(f"data.empty_text_fea not found: {empty}")
    return PrecomputedDataset(
        manifest,
        latent_frames=lambda frames: codec.latent_size(frames, cfg.data.height, cfg.data.width)[0],
        spec_frames=cfg.data.num_frames,
        normalization=resolve_normalization(cfg.data.latent_normalization, cfg.model.family, codec),
        rules=path_rules(cfg),
        empty_text_fea=empty,
    )


def batch_text(batch: dict, text_encoder: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Text conditioning of an on-the-fly batch: ``(emb (B, L, D), mask (B, L), extras {name: (B, ...)})``.

    Captions are encoded by ``text_encoder``; rows of a precomputed batch that carry stored features
    (``batch["text_features"]``) keep those instead (padded together with the encoded ones)."""
    if "text_emb" in batch:  # every row of this batch had its features
        return batch["text_emb"].float(), batch["text_mask"].bool(), dict(batch.get("text_extras", {}))
    stored = batch.get("text_features")
    if not stored or all(f is None for f in stored):
        emb, mask = text_encoder.encode(batch["text"])
        return emb, mask, dict(text_encoder.encode_extras(batch["text"]))
    todo = [i for i, f in enumerate(stored) if f is None]
    rows: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = [None] * len(stored)  # type: ignore[list-item]
    for i, f in enumerate(stored):
        if f is not None:
            rows[i] = (f[0].float(), f[1].bool(), {k: v.float() for k, v in f[2].items()})
    if todo:
        texts = [batch["text"][i] for i in todo]
        emb, mask = text_encoder.encode(texts)
        extras = text_encoder.encode_extras(texts)
        for j, i in enumerate(todo):
            real = mask[j].bool().cpu()
            rows[i] = (
                emb[j].float().cpu()[real],
                real[real],
                {k: v[j].float().cpu() for k, v in extras.items()},
            )
    longest = max(r[0].shape[0] for r in rows)
    dim = rows[0][0].shape[1]
    emb = torch.zeros(len(rows), longest, dim)  # (B, L, D)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)  # (B, L)
    for i, (e, m, _) in enumerate(rows):
        emb[i, : e.shape[0]], mask[i, : e.shape[0]] = e, m
    names = rows[0][2].keys()
    return emb, mask, {k: torch.stack([r[2][k] for r in rows]) for k in names}


def manifest_path(cfg: Config) -> Path:
    if not cfg.data.manifest:
        raise FrameloomError("data.manifest is not set (pass data.manifest=PATH)")
    path = Path(cfg.data.manifest)
    if not path.exists():
        raise FrameloomError(f"data.manifest not found: {path}")
    return path


def cache_root(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return manifest_path(cfg).resolve().parent / ".frameloom_cache"


def load_codec(cfg: Config, device: torch.device | str = "cpu"):
    from frameloom.models.codecs import DiffusersVAECodec, PixelCodec
    from frameloom.models.registry import get_family

    family = get_family(cfg.model.family)
    if family.load_codec is not None:
        return family.load_codec(cfg, torch.device(device))
    if cfg.model.codec == "pixel":
        return PixelCodec()
    path = Path(cfg.model.codec)
    if not path.is_dir():
        raise FrameloomError(f"model.codec: not 'pixel' and not a directory: {path}")
    return DiffusersVAECodec.from_pretrained(path).to(device)


def text_encoder_dir(cfg: Config) -> Path:
    """The encoder's directory; `tiny-byt5` is built (deterministically, seed 0) beside the run on first use."""
    name = cfg.model.text_encoder
    if name is None:
        raise FrameloomError("model.text_encoder is not set (a local T5 directory, or tiny-byt5)")
    if name == TINY_BYT5:
        from frameloom.models.text import build_tiny_t5

        path = Path(cfg.run_dir).resolve().parent / ".frameloom_models" / TINY_BYT5
        if not path.is_dir():  # built aside and renamed in: a kill mid-build leaves no half encoder here
            import os
            import shutil

            tmp = path.parent / f".tmp-{TINY_BYT5}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_t5(tmp, seed=0)
            try:
                os.rename(tmp, path)
            except OSError:  # another process built it meanwhile (the same, deterministic encoder)
                shutil.rmtree(tmp, ignore_errors=True)
        return path
    path = Path(name)
    if not path.is_dir():
        raise FrameloomError(f"model.text_encoder: not a directory: {path}")
    return path


def load_text_encoder(cfg: Config, device: torch.device | str = "cpu"):
    from frameloom.models.registry import get_family
    from frameloom.models.text import T5TextEncoder

    family = get_family(cfg.model.family)
    if family.load_text_encoder is not None:
        return family.load_text_encoder(cfg, torch.device(device))
    return T5TextEncoder.from_pretrained(
        text_encoder_dir(cfg), max_length=cfg.model.text_max_length or 64
    ).to(device)


def open_store(cfg: Config):
    from frameloom.cache.store import CacheStore

    return CacheStore(cache_root(cfg))


def run_cache(cfg: Config, *, progress: bool = True, shard: tuple[int, int] = (0, 1)):
    """`frameloom cache`: encode every row's clip and caption into the content-keyed store.

    With a bucket policy each row is encoded at the spec of every bucket it can land in (any epoch), and
    captions carry the run's caption rules, so the trainer reads exactly what it would encode on the fly.
    A run whose clips or captions change per epoch (``uncacheable``) is refused with the reason."""
    from frameloom.cache.builder import build_cache
    from frameloom.parallel.env import main_first

    reasons = uncacheable(cfg)
    if reasons:
        raise FrameloomError(
            f"nothing to cache: {'; '.join(reasons)}, and the cache holds one clip and caption per sample; "
            "training encodes such runs on the fly (use data.temporal_crop=start and "
            "data.caption_aesthetic=off|fixed to train from the cache)"
        )
    spec, rules, policy = clip_spec(cfg), caption_rules(cfg), bucket_policy(cfg)
    device = resolve_device(cfg.train.device)
    return build_cache(
        manifest_path(cfg),
        spec=spec,
        codec=load_codec(cfg, device),
        text_encoder=main_first(lambda: load_text_encoder(cfg, device)),  # under torchrun: built by rank 0
        store=open_store(cfg),
        progress=progress,
        shard=shard,
        buckets=policy,
        caption_rules=rules,
        rules=path_rules(cfg),
    )


class ClipDataset(Dataset):
    """On-the-fly clips (used when the cache is incomplete): item -> video float (C, T, H, W), caption and
    ``fps``, the rate of the frames as sampled (``data.video.row_fps``; NaN for images and unknown rates).

    An item is a row index, or a ``SampleRef`` (row, bucket, epoch) from a bucketed sampler: the clip is then
    decoded at the bucket's shape (``use_buckets``), with the epoch's temporal crop. A row that fails to
    decode is replaced by ``substitute_index``'s pick from its bucket (a pure function of seed, epoch, row
    and attempt), logged with its path; the item says ``substituted: 1`` so the trainer can count it, and
    lists each failure (``failures``: path, row, kind, reason) for the run's quarantine.jsonl.
    Rows are read one at a time from the columnar manifest (no list of row dicts).

    ``decode_timeout`` > 0 decodes in a sandbox subprocess (``data/sandbox.py``): a crash or a hang longer
    than that many seconds fails only its sample. ``quarantine`` (``data/quarantine.py``) names the run's
    quarantine file: a sample recorded there as crashed or hung is not decoded again.

    The item's draw ``(seed, row, epoch)`` decides the ``random`` temporal window (a new one each epoch, the
    same one in a resumed run) and the ``random`` aesthetic phrase; the caption is ``keys.caption``'s text
    with ``caption_rules`` applied at the spec the clip is decoded with (as the cache builds it).
    """

    MAX_SUBSTITUTES = 8

    def __init__(
        self,
        manifest: str | Path,
        spec: ClipSpec,
        *,
        seed: int = 0,
        caption_rules: CaptionRules | None = None,
        rules: PathRules | None = None,
        decode_timeout: float = 0.0,
        quarantine: str | Path | None = None,
    ):
        from frameloom.data.quarantine import Quarantine
        from frameloom.data.sandbox import DecodeSandbox

        self.manifest = Path(manifest)
        self.rules = rules or PathRules()
        self.table = load_manifest(self.manifest, self.rules)  # decode_clip reads cut/crop/rotation too
        self.spec = spec
        self.root = self.manifest.resolve().parent
        self.seed = seed
        self.caption_rules = caption_rules
        self.planner = None  # sampler.EpochPlanner when a bucket policy is active
        self.sandbox = DecodeSandbox(decode_timeout) if decode_timeout > 0 else None
        self.quarantine = Quarantine(quarantine) if quarantine is not None else None

    def use_buckets(self, planner, *, seed: int) -> None:
        """Decode at the shapes of ``planner``'s policy (None: every clip at ``spec``); ``seed`` drives the
        temporal crop and the substitutes."""
        self.planner = planner
        self.seed = seed

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict:
        return self.table.slice(i, 1).to_pylist()[0]

    def _checked(self, row: dict) -> dict:
        """The row, its file checked against the path rules where it is opened (symlinks followed): a file
        that leads out of its root fails like an undecodable one (``outside_root``) and is substituted."""
        try:
            resolve_entry(self.root, str(row["path"]), self.rules.extra_roots, bound=self.rules.strict)
        except OutsideRoot as exc:
            raise DecodeError(str(row["path"]), f"{OUTSIDE_ROOT}: {exc.detail}") from None
        return row

    def _spec(self, row: dict, bucket: int) -> ClipSpec:
        if self.planner is None or bucket < 0:
            return self.spec
        return self.planner.policy.clip_spec(self.spec, row.get("fps"), bucket)

    def _members(self, epoch: int, bucket: int):
        import numpy as np

        if self.planner is None or bucket < 0:
            return np.arange(len(self))
        return self.planner.members(epoch, bucket)

    def _decode(self, row: dict, spec: ClipSpec, draw: tuple[int, int, int]) -> torch.Tensor:
        """One clip: refused if its file leads out of its root (``_checked``) or it is quarantined as
        crashing/hanging, else decoded (in the sandbox when ``decode_timeout`` > 0)."""
        from frameloom.data.sandbox import DecodeCrash

        row = self._checked(row)
        known = self.quarantine.known(str(row["path"])) if self.quarantine is not None else None
        if known is not None:
            raise DecodeCrash(str(row["path"]), known["reason"], known["kind"])
        if self.sandbox is not None:
            return self.sandbox.decode(row, spec, root=self.root, output="float", draw=draw)
        return decode_clip(row, spec, root=self.root, output="float", draw=draw)

    def __getitem__(self, item) -> dict:
        import logging

        from frameloom.data.sampler import substitute_index

        index, bucket, epoch = tuple(item) if isinstance(item, tuple) else (int(item), -1, 0)
        current = index
        failures = []
        for attempt in range(self.MAX_SUBSTITUTES + 1):
            row = self.row(current)
            spec = self._spec(row, bucket)
            draw = (self.seed, current, epoch)
            try:
                video = self._decode(row, spec, draw)
            except DecodeError as exc:
                kind = getattr(exc, "kind", "error")
                failures.append(
                    {"path": str(row["path"]), "row": current, "kind": kind, "reason": exc.reason}
                )
                replacement = substitute_index(self.seed, epoch, index, attempt, self._members(epoch, bucket))
                logging.getLogger("frameloom.data").warning(
                    "sample %d (%s) failed to decode (%s); substituting sample %s",
                    current,
                    exc.path,
                    exc.reason,
                    replacement,
                )
                if replacement is None:
                    raise
                current = replacement
                continue
            text = row_caption(row, self.caption_rules, spec, draw)
            return {
                "video": video,
                "text": text,
                "fps": row_fps_or_nan(row, spec),  # the frames' rate as sampled (LTX-Video's RoPE time scale)
                "index": current,
                "substituted": int(current != index),
                "failures": failures,
            }
        raise DecodeError(str(self.row(index)["path"]), f"it and {self.MAX_SUBSTITUTES} substitutes failed")
