"""The training loop: one optimizer step = `grad_accum` micro-batches of the objective on the denoiser.

Everything a resumed run needs (model, EMA, optimizer, scheduler, sampler position, RNG states, step,
counters) is one state, saved atomically (checkpoint/io.py, checkpoint/distributed.py). Randomness of a
micro-step (timesteps, noise, caption dropout) comes from a generator on the training device seeded by a hash
of (seed, step, slot) (train/rng.py), where `slot = micro * data_world + data_rank` is the micro-batch's place
in the step's global batch, so a resumed run draws exactly what the uninterrupted run would have drawn, and N
processes with gradient accumulation A draw what one process with accumulation N * A draws (the sampler hands
out micro-batches in the same order).

The hot loop never waits for the device between logging steps: the loss, gradient norm and skip flag of each
step stay on the device (train/interval.py) and reach the host once per `train.log_every` steps (one
all-reduce, one copy); a step with a non-finite gradient norm is skipped by the fused optimizer itself
(train/optim.py) and by the EMA's lerp weight; SIGTERM is agreed on through an asynchronous CPU all-reduce
(train/preemption.py). After `train.max_consecutive_skips` consecutive skipped steps the run stops.

Under torchrun the process joins the process group here (frameloom.parallel.init_distributed), and
`Trainer.parallelize` applies sequence parallelism, checkpointing, compile and DDP/FSDP2 from outside.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from frameloom import pipeline
from frameloom.checkpoint import io as ckpt
from frameloom.checkpoint.distributed import (
    FULL,
    SHARDED,
    PendingSave,
    resume_training_checkpoint,
    save_training_checkpoint,
)
from frameloom.config import Config, dump_yaml
from frameloom.data.quarantine import FILE as QUARANTINE_FILE
from frameloom.data.quarantine import Quarantine
from frameloom.data.sampler import build_sampler
from frameloom.errors import FrameloomError
from frameloom.memory.block_swap import place_on_device
from frameloom.models.registry import get_family, sample_fps
from frameloom.objectives import (
    Conditioning,
    StepContext,
    build_objective,
    caption_dropout_mask,
    predict,
    with_clip_frame_rates,
)
from frameloom.parallel import env as dist_env
from frameloom.parallel.parallelize import Parallelized
from frameloom.parallel.parallelize import parallelize as apply_parallelism
from frameloom.parallel.plan import check_sequence_split, check_video_sync_group, plan_parallel
from frameloom.parallel.sequence import pad_text as pad_text_for_sp
from frameloom.train.ema import EMA
from frameloom.train.interval import IntervalLog, NonFiniteStop
from frameloom.train.loader import build_loader
from frameloom.train.metrics import MetricsLogger
from frameloom.train.optim import build_optimizer, step_unless
from frameloom.train.preemption import Preemption, StopPoll
from frameloom.train.rng import step_generator
from frameloom.train.validation import validate_shared

log = logging.getLogger("frameloom.train")

TEXT_STATISTICS = ("auto", "fit", "keep")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_loss: float | None
    skipped_steps: int
    seconds: float
    preempted: bool = False
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)

    def line(self) -> str:
        status = "stopped by SIGTERM at" if self.preempted else "trained to"
        loss = f"{self.last_loss:.4f}" if self.last_loss is not None else "n/a"
        return (
            f"{status} step {self.step} in {self.seconds:.1f} s, last loss {loss}, "
            f"skipped {self.skipped_steps} non-finite step(s); checkpoint {self.checkpoint}"
        )


def pad_text(embs: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length text embeddings (L_i, D) into (B, L_max, D) with a bool mask (B, L_max)."""
    length = max(e.shape[0] for e in embs)
    out = embs[0].new_zeros(len(embs), length, embs[0].shape[-1])
    mask = torch.zeros(len(embs), length, dtype=torch.bool)
    for i, (e, m) in enumerate(zip(embs, masks)):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = m.bool()
    return out, mask


def enable_fast_fp32(device: torch.device) -> None:
    """TF32 tensor-core matmuls and convolutions for what still runs in fp32 on CUDA (no effect elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class _NullLogger:
    """Metrics of ranks other than 0 go nowhere (rank 0 logs the all-reduced loss)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """Builds the run from a config and trains it. `Trainer(cfg).fit()` or `train(cfg)`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        if cfg.train.steps < 1 or cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
            raise FrameloomError("train.steps, train.batch_size and train.grad_accum must be >= 1")
        if cfg.train.log_every < 1 or cfg.train.max_consecutive_skips < 0:
            raise FrameloomError("train.log_every must be >= 1 and train.max_consecutive_skips >= 0")
        if cfg.model.text_statistics not in TEXT_STATISTICS:
            raise FrameloomError(
                f"model.text_statistics must be auto, fit or keep, not {cfg.model.text_statistics!r}"
            )
        # 0. Processes: torchrun's environment (one process without it); the mesh layout, checked up front.
        device = pipeline.resolve_device(cfg.train.device)
        # CPU-offloaded FSDP reduces its CPU gradient norms: the group needs a CPU backend beside NCCL
        self.env = dist_env.init_distributed(
            device,
            backend=dist_env.default_backend(device.type, cpu_collectives=cfg.parallel.cpu_offload),
            timeout_s=cfg.parallel.timeout_s,
        )
        self.device = self.env.device
        enable_fast_fp32(self.device)
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.plan = plan_parallel(cfg.parallel, self.world_size, cfg.train.batch_size)
        # ranks of one sp group (and one video_sync_group) read the same batch
        self.data_rank, self.data_world = self.plan.data_rank(self.rank), self.plan.data_world
        self.autocast = pipeline.autocast_dtype(cfg.train.mixed_precision, self.device)
        self.objective = build_objective(cfg)
        self._check_video_sync_group_use()

        # 1. Frozen encoders and the data (cached latents when complete, else on-the-fly encoding).
        torch.manual_seed(cfg.seed)
        self.spec = pipeline.clip_spec(cfg)
        self.codec = pipeline.load_codec(cfg, self.device)
        # Pre-extracted latents (and text features) named by the manifest: no video is decoded, and with a
        # text_fea file on every row no text encoder is loaded (data/precomputed.py).
        self.precomputed = pipeline.use_precomputed(cfg)
        text_from_files = self.precomputed and pipeline.precomputed_text_complete(cfg)
        # rank 0 first: a tiny-byt5 encoder is built on first use, and must not be built by every rank at once
        self.text_encoder = (
            None
            if text_from_files
            else dist_env.main_first(lambda: pipeline.load_text_encoder(cfg, self.device))
        )
        self.policy = pipeline.bucket_policy(cfg)  # data.bucket (None: none); the cache and sampler share it
        self.quarantine = Quarantine(self.run_dir / QUARANTINE_FILE)  # samples that failed to decode
        self.dataset, self.cached = self._build_dataset()
        # What the model needs of the encoders; with a complete cache, training reads latents and embeddings
        # only, so the VAE and text encoder leave memory until validation reloads them (`_encoders`).
        self.text_dim = self.text_encoder.dim if self.text_encoder is not None else self.dataset.text_dim
        self.latent_channels = self.codec.latent_channels
        self.latent_grid = self.codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)
        if self.precomputed:  # stored shapes that do not fit the model: one line now, not a crash mid-run
            grid, where = self._first_row_grid()
            self.dataset.check_first(self.latent_channels, grid, self.text_dim, where=where)
        self.empty_emb, self.empty_mask, self.empty_extras = self._empty_prompt()
        self.latent_grids = self._latent_grids()  # every (t, h, w) a batch can have: checked before training

        # 2. The denoiser (with its text statistics, while the text encoder is loaded), EMA, optimizer, schedule.
        family = get_family(cfg.model.family)
        self.model = family.build_denoiser(cfg.model, self.latent_channels, self.text_dim)
        if (
            self.precomputed and self.text_encoder is None
        ):  # stored extras the model cannot take: one line now
            self.dataset.check_extras(_extra_sizes(self.model), self.empty_extras)
        self._fit_text_statistics(self.model)
        if self.cached:
            self._release_encoders()
        # FSDP2 moves the model to the device one unit at a time while sharding it (never whole); otherwise
        # the device, except the frozen weights of parallel.blocks_to_swap blocks (memory/block_swap.py,
        # which refuses FSDP)
        fsdp = self.world_size > 1 and cfg.parallel.data_parallel == "fsdp"
        self.swapper = (
            None
            if fsdp and not cfg.parallel.blocks_to_swap
            else place_on_device(self.model, self.device, cfg.parallel)
        )
        self.model.train()
        self._check_sequence_split(self.model)
        for t, _, _ in self.latent_grids:
            check_video_sync_group(t, self.plan.video_sync_group)
        self.par: Parallelized | None = None
        self.model = self.parallelize(self.model)  # what to call (a DDP wrapper, or the module itself)
        self.module = self.par.module if self.par is not None else self.model  # original parameter names
        self.ema = EMA(self.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = build_optimizer(self.trainable, cfg.optim, cfg.train.steps)
        self.sampler = build_sampler(cfg, self.dataset, self.data_rank, self.data_world, policy=self.policy)
        self.generator = torch.Generator(device=self.device)  # reseeded per micro-step (train/rng.py)
        self.substituted_samples = 0  # samples that failed to decode and were replaced (this process)
        self.step = 0
        self.interval = IntervalLog(world_size=self.world_size)
        self.batches_consumed = 0
        self._empty_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # empty prompt per text length
        self._empty_extras_on: dict[str, torch.Tensor] = {}  # the empty prompt's extras on the device
        self._pending: PendingSave | None = None  # an async checkpoint still being written
        self._ckpt_group = None  # gloo group of the async checkpoint writer
        self._stop_poll = StopPoll(self._cpu_group() if dist_env.is_distributed() else None)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients, up to the last time the host read the interval's flags."""
        return self.interval.skipped_steps

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _cpu_group():
        import torch.distributed as dist

        return dist.new_group(backend="gloo")  # collective: every rank creates it at the same point

    def _check_video_sync_group_use(self) -> None:
        """Pyramid Flow's video_sync_group means something only to an objective that trains one unit of the
        shared video per rank of the group; any other objective would train G identical copies."""
        g = self.plan.video_sync_group
        if g > 1 and not getattr(self.objective, "uses_video_sync_group", False):
            raise FrameloomError(
                f"parallel.video_sync_group={g} needs an objective that trains one autoregressive unit per "
                f"rank of the group (Pyramid Flow's); objective.name={self.cfg.objective.name} with "
                f"model.family={self.cfg.model.family} does not: set parallel.video_sync_group: 1"
            )

    def _build_dataset(self):
        """The cached dataset when every sample's entry is in the store; otherwise on-the-fly decoding, said
        loudly (with the count of missing entries), or refused under `data.require_cache`."""
        from frameloom.cache.dataset import CachedClipDataset

        d = self.cfg.data
        manifest = pipeline.manifest_path(self.cfg)
        if d.use_cache not in ("auto", "never", "precomputed"):
            raise FrameloomError(f"data.use_cache must be auto, never or precomputed, not {d.use_cache!r}")
        if self.precomputed:  # batches of stored tensors; "cached" when every row has its text features too
            dataset = pipeline.precomputed_dataset(self.cfg, self.codec)
            if d.require_cache and self.text_encoder is not None:  # some captions would be encoded every step
                col = dataset.table.column("text_fea") if "text_fea" in dataset.table.column_names else None
                missing = len(dataset) if col is None else col.null_count
                raise FrameloomError(
                    f"data.require_cache=true: {missing} of {len(dataset)} rows of {manifest} name a latent but no "
                    "text_fea file, so their captions would be encoded every step; extract their text features "
                    "or set data.require_cache=false"
                )
            return dataset, self.text_encoder is None
        rules = pipeline.caption_rules(self.cfg)

        def on_the_fly():
            dataset = pipeline.ClipDataset(
                manifest,
                self.spec,
                seed=self.cfg.seed,
                caption_rules=rules,
                rules=pipeline.path_rules(self.cfg),
                decode_timeout=d.decode_timeout,  # crashes and hangs cost one sample (data/sandbox.py)
                quarantine=self.quarantine.path,
            )
            return dataset, False

        if d.use_cache == "never":
            if d.require_cache:
                raise FrameloomError("data.require_cache=true contradicts data.use_cache=never")
            return on_the_fly()
        reasons = pipeline.uncacheable(self.cfg)
        if reasons:
            if d.require_cache:
                raise FrameloomError(
                    f"data.require_cache=true, but this run cannot train from the cache: {'; '.join(reasons)}"
                )
            if self.rank == 0:
                log.warning(
                    "not reading the latent cache: %s; decoding and encoding on the fly", "; ".join(reasons)
                )
            return on_the_fly()
        cached = CachedClipDataset(
            manifest,
            self.spec,
            self.codec.identity,
            self.text_encoder.identity,
            pipeline.open_store(self.cfg),
            buckets=self.policy,  # one entry per (row, bucket) the policy can assign
            caption_rules=rules,
            rules=pipeline.path_rules(self.cfg),
        )
        missing = cached.missing()
        if not missing:
            return cached, True
        what = (
            f"the latent cache {pipeline.cache_root(self.cfg)} lacks the entries of {len(missing)} of "
            f"{len(cached)} samples for this run's codec, text encoder, clip and caption settings"
        )
        if d.require_cache:
            raise FrameloomError(
                f"data.require_cache=true: {what}; run `frameloom cache` with this config first"
            )
        if self.rank == 0:
            log.warning(
                "%s: training decodes and encodes EVERY sample on the fly (slow); run `frameloom cache` with "
                "this config first, or set data.require_cache: true to refuse to start",
                what,
            )
        return on_the_fly()

    def _first_row_grid(self) -> tuple[tuple[int, int, int] | None, str]:
        """(the latent grid row 0 trains at, what sets it): its bucket's under a bucket policy (None when no
        epoch can place it), else the configured clip's."""
        if self.policy is None:
            return self.latent_grid, "data.height x data.width"
        rows, buckets = self.policy.reachable()
        mine = np.asarray(buckets)[np.asarray(rows) == 0]
        if not len(mine):
            return None, ""
        frames, height, width = self.policy.table.shape(int(mine[0]))
        return self.codec.latent_size(
            frames, height, width
        ), f"its bucket ({frames} frames of {height}x{width})"

    def _latent_grids(self) -> list[tuple[int, int, int]]:
        """Every latent (t, h, w) a batch of this run can have: each bucket a policy can assign, else each
        valid clip length of a frame policy (clips shorter than num_frames), else the configured clip."""
        from frameloom.data.video import is_valid_length

        d = self.cfg.data
        shapes = {(d.num_frames, d.height, d.width)}
        if self.policy is not None:
            buckets = np.unique(self.policy.reachable()[1])
            shapes = {self.policy.table.shape(int(b)) for b in buckets}
        elif d.frame_policy is not None:
            sp = self.spec.sp_size
            shapes |= {
                (n, d.height, d.width)
                for n in range(1, d.num_frames + 1)
                if is_valid_length(n, d.frame_policy, sp)
            }
        return sorted({tuple(self.codec.latent_size(*s)) for s in shapes})

    @torch.no_grad()
    def _empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The empty prompt's tokens (L, D), mask (L,) and extra tensors {name: (...)} (caption dropout)."""
        if self.text_encoder is None:  # pre-extracted text features: the empty prompt's stored features
            return self._stored_empty_prompt()
        emb, mask = self.text_encoder.encode([""])
        extras = {k: v[0].float().cpu() for k, v in self.text_encoder.encode_extras([""]).items()}
        length = int(mask[0].sum())
        return emb[0, :length].float().cpu(), mask[0, :length].cpu(), extras

    def _stored_empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        stored = self.dataset.empty_text()
        if stored is not None:
            emb, mask, extras = stored
            return emb.float(), mask.bool(), {k: v.float() for k, v in extras.items()}
        o = self.cfg.objective
        if o.caption_dropout > 0 or (o.extras_dropout or 0) > 0:
            raise FrameloomError(
                "caption dropout needs the empty prompt's text features, and no text encoder is loaded: set "
                'data.empty_text_fea (the features of "" from the same extraction), add a row with empty text '
                "and a text_fea file, or set objective.caption_dropout=0"
            )
        return torch.zeros(1, self.text_dim), torch.ones(1, dtype=torch.bool), {}  # never used: no dropout

    @torch.no_grad()
    def _fit_text_statistics(self, model: torch.nn.Module, max_captions: int = 2048) -> None:
        """Give a denoiser that standardizes its pooled text (VideoDiT's `pooled_text`) the mean/std of the
        training captions' pooled embeddings: up to `max_captions` rows, evenly spaced over the manifest.
        `model.text_statistics`: `auto` fits a model built from scratch and keeps a pretrained model's saved
        values (fine-tuning must not move its standardization), `fit` always, `keep` never. A resumed run
        loads the saved values with the weights."""
        if not getattr(model, "wants_text_statistics", False):
            return
        policy = self.cfg.model.text_statistics
        if policy == "keep" or (policy == "auto" and self.cfg.model.pretrained):
            return
        if self.text_encoder is None:  # pre-extracted text features: pool the stored ones
            from frameloom.models.text import pool_text

            stored = self.dataset.text_sample(max_captions)
            model.set_text_statistics(torch.cat([pool_text(e[None].float(), m[None]) for e, m in stored]))
            return
        from frameloom.data.captions import row_caption
        from frameloom.data.manifest import read_manifest
        from frameloom.models.text import pool_text

        table = read_manifest(pipeline.manifest_path(self.cfg))
        picks = np.unique(np.linspace(0, len(table) - 1, min(len(table), max_captions)).astype(np.int64))
        rules = pipeline.caption_rules(self.cfg)  # the texts as training encodes them (epoch 0's draws)
        rows = table.take(picks).to_pylist()
        texts = [row_caption(r, rules, self.spec, (self.cfg.seed, int(j), 0)) for r, j in zip(rows, picks)]
        pooled = []
        for i in range(0, len(texts), 256):
            emb, mask = self.text_encoder.encode(texts[i : i + 256])
            pooled.append(pool_text(emb.float(), mask).cpu())  # (b, text_dim)
        model.set_text_statistics(torch.cat(pooled))

    def _release_encoders(self) -> None:
        """Drop the codec and text encoder (a cached run trains without them); `_encoders` reloads them."""
        import gc

        self.codec = self.text_encoder = None
        gc.collect()  # free the modules now (reference cycles), not at some later collection
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _encoders(self) -> tuple[Any, Any]:
        """(text encoder, codec), loaded again if released (validation of a cached run)."""
        if self.text_encoder is None:
            self.text_encoder = pipeline.load_text_encoder(self.cfg, self.device)
        if self.codec is None:
            self.codec = pipeline.load_codec(self.cfg, self.device)
        return self.text_encoder, self.codec

    def _check_sequence_split(self, model: torch.nn.Module) -> None:
        """Ulysses splits the video tokens and heads over sp ranks: both must divide, for every latent shape a
        batch can have (each bucket), checked before training."""
        sp = self.plan.sp
        if sp == 1 or not hasattr(model, "patch") or not hasattr(model, "num_heads"):
            return
        pt, ph, pw = model.patch
        for t, h, w in self.latent_grids:
            check_sequence_split(
                (t // pt) * (h // ph) * (w // pw), model.num_heads, sp, where=f"latent grid {t}x{h}x{w}"
            )

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Sequence parallel -> activation checkpointing -> compile -> DDP/FSDP2, from outside the model
        (frameloom.parallel.parallelize); returns what the loop calls. Sets `self.par`."""
        self.par = apply_parallelism(model, self.cfg.parallel, self.env, batch_size=self.cfg.train.batch_size)
        return self.par.forward

    # ------------------------------------------------------------------ data

    def _collate(self, items: list[dict]) -> dict:
        if self.precomputed:
            return self.dataset.collate(items)
        if self.cached:
            from frameloom.cache.dataset import collate_text

            return collate_text(items)
        return {
            "video": torch.stack([it["video"] for it in items]),  # one bucket per batch: one shape
            "text": [it["text"] for it in items],
            "fps": torch.tensor([it["fps"] for it in items], dtype=torch.float32),  # (B,), NaN: unknown
            "index": torch.tensor([it["index"] for it in items]),
            "substituted": sum(it.get("substituted", 0) for it in items),
            "failures": [f for it in items for f in it.get("failures", ())],
        }

    def _loader(self) -> DataLoader:
        return build_loader(self.dataset, self.sampler, self._collate, self.cfg.data, self.device)

    @torch.no_grad()
    def _encode(self, batch: dict) -> tuple[torch.Tensor, Conditioning]:
        """-> latents (B, C, t, h, w) and the text conditioning (tokens (B, L, D), mask (B, L), extras
        {name: (B, ...)}), on the device. Page-locked batches on CUDA: the copies are asynchronous."""
        if self.cached:
            extras = {
                k: v.to(self.device, non_blocking=True).float()
                for k, v in batch.get("text_extras", {}).items()
            }
            return batch["latent"].to(self.device, non_blocking=True).float(), Conditioning(
                batch["text_emb"].to(self.device, non_blocking=True).float(),
                batch["text_mask"].to(self.device, non_blocking=True),
                extras,
            )
        precision = (
            torch.autocast(self.device.type, dtype=self.autocast)
            if self.autocast is not None
            else contextlib.nullcontext()
        )
        with precision:  # on-the-fly encoding in the training precision (bf16 on CUDA by default)
            if "latent" in batch:  # precomputed latents whose captions (some or all) are encoded here
                latent = batch["latent"].to(self.device, non_blocking=True)
            else:
                latent = self.codec.encode(batch["video"].to(self.device, non_blocking=True))
            emb, mask, extras = pipeline.batch_text(batch, self.text_encoder)
        extras = {k: v.to(self.device).float() for k, v in extras.items()}
        return latent.float(), Conditioning(emb.to(self.device).float(), mask.to(self.device), extras)

    def _drop_extras(self, extras: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replace the extra text tensors of the rows where `drop` is True by the empty prompt's (a select on
        the device: the host never reads `drop`)."""
        if not extras:
            return extras
        keep = ~drop.to(next(iter(extras.values())).device)
        out = {}
        for k, v in extras.items():
            empty = self._empty_extras_on.get(k)
            if empty is None or empty.device != v.device or empty.dtype != v.dtype:
                empty = self._empty_extras_on[k] = self.empty_extras[k].to(v)  # one copy per run
            out[k] = torch.where(keep.view(-1, *[1] * (v.dim() - 1)), v, empty)
        return out

    def _empty_row(self, length: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt padded to `length` tokens, on the device (cached: one copy per length)."""
        row = self._empty_rows.get(length)
        if row is None or row[0].device != like.device or row[0].dtype != like.dtype:
            n = self.empty_emb.shape[0]
            emb = torch.zeros(length, self.empty_emb.shape[1], dtype=like.dtype)
            mask = torch.zeros(length, dtype=torch.bool)
            emb[:n], mask[:n] = self.empty_emb, self.empty_mask.bool()
            row = (emb.to(like.device), mask.to(like.device))
            self._empty_rows[length] = row
        return row

    def _drop_captions(self, emb: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
        """Replace the captions where `drop` (B,) is True by the empty prompt (for classifier-free guidance).

        A select on the device (no host read of `drop`); the text is first padded to the empty prompt's
        length when shorter."""
        length = max(emb.shape[1], self.empty_emb.shape[0])
        if emb.shape[1] < length:
            emb = torch.nn.functional.pad(emb, (0, 0, 0, length - emb.shape[1]))  # (B, length, D)
            mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))  # (B, length)
        empty_emb, empty_mask = self._empty_row(length, emb)
        drop = drop.to(emb.device)
        emb = torch.where(drop[:, None, None], empty_emb[None], emb)
        mask = torch.where(drop[:, None], empty_mask[None], mask)
        return emb, mask

    # ------------------------------------------------------------------ one step

    def _micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the (unscaled) loss, a 0-dim device tensor."""
        latent, cond = self._encode(batch)  # (B, C, t, h, w); tokens (B, L, D), mask (B, L), extras
        # The micro-batch's place in the step's global batch: one process with accumulation 2 and two
        # processes without draw the same numbers for the same samples. On the device: noise is drawn where
        # it is used (no host copy); the stream is reseeded from the keys, so resume is exact.
        ctx = StepContext(
            step=self.step,
            micro=micro,
            data_rank=self.data_rank,
            data_world=self.data_world,
            sync_rank=self.plan.sync_rank(self.rank),
            sync_size=self.plan.video_sync_group,
        )
        g = step_generator(self.cfg.seed, self.step, ctx.slot, generator=self.generator)
        inputs = self.objective.draw(latent, g, ctx)  # times, noise -> x_t (B, C, t, h, w), target
        if "fps" in batch:  # the clips' sampled rates (B,), for a denoiser that takes them (LTX-Video's RoPE)
            inputs = with_clip_frame_rates(inputs, batch["fps"].to(self.device, non_blocking=True))
        drop = caption_dropout_mask(latent.shape[0], self.cfg.objective.caption_dropout, g)
        emb, mask = self._drop_captions(cond.emb, cond.mask, drop)
        p_extras = self.cfg.objective.extras_dropout
        if p_extras is not None and cond.extras:  # dropped independently of the tokens (Open-Sora 2.0)
            drop = caption_dropout_mask(latent.shape[0], p_extras, g)
        extras = self._drop_extras(cond.extras, drop)
        if self.plan.sp > 1:  # masked padding to a multiple of sp (families split text with the sequence)
            emb, mask = pad_text_for_sp(emb, mask, self.plan.sp)  # (B, L', D), (B, L')
        cond = Conditioning(emb, mask, extras)
        last = micro == self.cfg.train.grad_accum - 1
        with self.par.gradient_sync(last), self.par.activation_context():
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                pred = predict(self.objective, self.model, inputs, cond)
            loss = self.objective.loss(pred, inputs)
            # Always backward, also on a non-finite loss (its step is dropped below): every process must run
            # the same collectives. loss_scale = sp turns the data-parallel mean over sp ranks into a sum.
            (loss * self.par.loss_scale / self.cfg.train.grad_accum).backward()
        return loss.detach()

    def _optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and apply the accumulated gradients unless their global norm is non-finite.

        Returns (grad norm, skipped flag: 1.0 = skipped), both 0-dim device tensors the host does not read.
        The norm is over all ranks' gradients (all-reduced under DDP, over all shards under FSDP), so every
        rank computes the same flag and skips the same steps."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)  # over all shards under FSDP (a DTensor)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        skipped = (~torch.isfinite(norm)).float()  # found_inf of the fused optimizer
        step_unless(self.optimizer, skipped)  # parameters, moments and step counts untouched when skipped
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, skipped

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """The non-tensor state (model, optimizer, EMA and RNGs are added by the checkpoint writer)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            # At the steps the loop consumed (not the sampler's own count, which DataLoader prefetching runs
            # ahead of); the state says at which world size, so another number of processes resumes there.
            "sampler": self.sampler.state_dict_at(self.batches_consumed),
            "step": self.step,
            "skipped_steps": self.interval.skipped_steps,
            "consecutive_skips": self.interval.consecutive_skips,
            "substituted_samples": self.substituted_samples,  # this process's count (rank 0's is saved)
        }

    def checkpoint_format(self) -> str:
        fmt = self.cfg.checkpoint.format
        if fmt == "auto":
            return SHARDED if self.world_size > 1 else FULL
        if fmt not in (FULL, SHARDED):
            raise FrameloomError(f"checkpoint.format must be auto, full or sharded, not {fmt!r}")
        return fmt

    def _finish_pending(self, wait: bool = True) -> Path | None:
        """Complete an async checkpoint once written (all ranks call this at the same points)."""
        pending = self._pending
        if pending is None or not (wait or pending.ready()):
            return None
        path = pending.finish()
        self._pending = None
        if self.rank == 0:  # never deletes `path`, the newest verified checkpoint
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last, verified=path)
        return path

    def save(self, async_ok: bool = True) -> Path:
        """Write the checkpoint of this step. Sharded checkpoints go out in the background when
        `parallel.async_checkpoint` and `async_ok` (the stop path passes False: it must be complete before
        the process exits, so there is nothing to overlap)."""
        fmt = self.checkpoint_format()
        async_save = self.cfg.parallel.async_checkpoint and fmt == SHARDED and async_ok
        self._finish_pending()  # at most one checkpoint in flight
        if async_save and self._ckpt_group is None and dist_env.is_distributed():
            self._ckpt_group = self._cpu_group()  # the writer thread's own collectives
        pending = save_training_checkpoint(
            self.run_dir,
            self.step,
            module=self.module,
            optimizer=self.optimizer,
            ema=self.ema.state_dict() if self.ema else None,
            state=self.state(),
            fmt=fmt,
            async_save=async_save,
            process_group=self._ckpt_group,
        )
        self._pending = pending
        if pending.done:
            self._finish_pending()
        return pending.final

    def resume(self) -> Path | None:
        # verified; falls back past damaged checkpoints (checkpoint/distributed.py)
        found = resume_training_checkpoint(
            self.run_dir,
            self.cfg.checkpoint.resume,
            module=self.module,
            optimizer=self.optimizer,
            ema=self.ema.state_dict() if self.ema else None,
        )
        if found is None:
            return None
        path, state = found
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved lr belongs to the old run's schedule; recompute it from this config's schedule, so that a
        # run resumed with a longer train.steps follows its new schedule (identical when nothing changed).
        for group, base_lr, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
        ):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        self.sampler.load_state_dict(state["sampler"])
        self.batches_consumed = self.sampler.consumed
        if state["rng"] is not None:  # None: a rank the saving run did not have
            ckpt.restore_rng(state["rng"])
        self.step = int(state["step"])
        self.interval.skipped_steps = int(state["skipped_steps"])
        self.interval.consecutive_skips = int(state.get("consecutive_skips", 0))  # absent before it was saved
        self.substituted_samples = int(state.get("substituted_samples", 0))  # absent before it was saved
        return path

    # ------------------------------------------------------------------ the loop

    def _reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t)  # SUM (gloo has no AVG)
        return t

    def _flush(self, logger: Any, losses: list[float], last_ckpt: Path | None) -> None:
        """Bring the interval's step values to the host (one all-reduce, one copy), log one record per step,
        and stop the run after `train.max_consecutive_skips` consecutive skipped steps (all ranks together:
        the flags are the same everywhere)."""
        started, steps = self._interval_start, len(self.interval.pending)
        records = self.interval.flush(self._reduce_sum if dist_env.is_distributed() else None)
        if not records:
            return
        rate = self._samples_per_step * steps / max(time.perf_counter() - started, 1e-9)
        for record in records:
            logger.log({**record, "samples_per_s": rate})
            losses.append(record["loss"])
        self._interval_start = time.perf_counter()
        limit = self.cfg.train.max_consecutive_skips
        worst = max(r["consecutive_skips"] for r in records)
        if limit and worst >= limit:
            first = next(r["step"] for r in records if r["consecutive_skips"] >= limit) - limit + 1
            raise NonFiniteStop(
                f"{worst} consecutive steps (from step {first} to {records[-1]['step']}) had a non-finite "
                f"gradient norm (train.max_consecutive_skips={limit}): stopped without saving; the last good "
                f"checkpoint is {last_ckpt or 'none (no checkpoint was written)'} - lower optim.lr, check "
                "the data, or resume from it"
            )

    def fit(self) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        main = self.rank == 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if main:
            dump_yaml(cfg, self.run_dir / "config.resolved.yaml")
        resumed = self.resume()
        logger = (
            MetricsLogger(
                self.run_dir,
                resume_step=self.step,
                tensorboard=cfg.logging.tensorboard,
                tb_every=cfg.train.log_every,
            )
            if main
            else _NullLogger()
        )
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            disable=not cfg.train.progress or not main,
            desc="train",
            unit="step",
        )
        if resumed is not None:
            bar.write(f"resumed from {resumed} at step {self.step}")
        losses: list[float] = []
        if cfg.validation.at_start and cfg.validation.prompts and self.step == 0:
            self.validate()  # samples/step-00000000: the model before any training
        last_ckpt: Path | None = resumed
        preempted = False
        self._samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * self.data_world
        self._interval_start = time.perf_counter()
        batches = None
        try:
            with Preemption() as preemption:
                batches = iter(self._loader())  # workers start here, ignoring SIGTERM (train/loader.py)
                while self.step < cfg.train.steps:
                    micro_losses = []
                    for m in range(cfg.train.grad_accum):
                        batch = next(batches)
                        self.batches_consumed += 1
                        self.substituted_samples += int(batch.get("substituted", 0))
                        if batch.get("failures"):  # recorded as consumed: the same list in resumed runs
                            self.quarantine.record(batch["failures"])
                        micro_losses.append(self._micro_step(batch, m))
                    loss = torch.stack(micro_losses).mean()  # this rank's, on the device
                    grad_norm, skipped = self._optimizer_step()
                    self.step += 1
                    if self.ema is not None:
                        self.ema.update(self.module, self.step, skipped)  # weight 0 on a skipped step
                    self.interval.add(
                        self.step,
                        loss,
                        grad_norm,
                        skipped,
                        lr=self.scheduler.get_last_lr()[0],
                        substituted_samples=self.substituted_samples,
                    )
                    bar.update(1)
                    done = self.step >= cfg.train.steps
                    stop = self._stop_poll.poll(preemption.requested)  # every rank agrees (one step late)
                    periodic = bool(cfg.checkpoint.every) and self.step % cfg.checkpoint.every == 0
                    validating = (
                        bool(cfg.validation.every)
                        and self.step % cfg.validation.every == 0
                        and bool(cfg.validation.prompts)
                    )
                    if done or stop or periodic or validating or self.step % cfg.train.log_every == 0:
                        self._flush(logger, losses, last_ckpt)  # may stop the run (non-finite guard)
                        if losses:
                            bar.set_postfix(loss=f"{losses[-1]:.4f}")
                    if validating:
                        self.validate()
                        self._interval_start = time.perf_counter()
                    self._finish_pending(wait=False)  # an async checkpoint written meanwhile is completed
                    if done or stop or periodic:
                        last_ckpt = self.save(async_ok=not (done or stop))
                        self._interval_start = time.perf_counter()
                    if stop and not done:
                        preempted = True
                        bar.write(f"SIGTERM: saved {last_ckpt}; resume with checkpoint.resume=latest")
                        break
            self._finish_pending()  # the last checkpoint is complete before fit returns
            self._stop_poll.close()  # (not on an error: a rank that died may never join the reduction)
        finally:
            # Stop the loader workers now, also on an error (e.g. a peer rank died): the traceback keeps this
            # frame alive until exit, where multiprocessing would SIGTERM them (they ignore it) and wait forever.
            batches = None  # noqa: F841
            bar.close()
            logger.close()
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            last_loss=losses[-1] if losses else None,
            skipped_steps=self.interval.skipped_steps,
            seconds=time.perf_counter() - start,
            preempted=preempted,
            checkpoint=last_ckpt,
            losses=losses,
        )

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """Sample the validation prompts into samples/step-N/ with the live model (EMA weights swapped in when
        `sample.use_ema`): each data-parallel rank its share of the prompts (train/validation.py)."""
        use_ema = self.ema is not None and self.cfg.sample.use_ema
        module = self.module
        was_training = module.training
        module.eval()
        text_encoder, codec = self._encoders()
        try:
            with self.ema.swapped_in(module) if use_ema else contextlib.nullcontext(module):
                paths = validate_shared(
                    module,
                    get_family(self.cfg.model.family),
                    text_encoder,
                    codec,
                    self.cfg,
                    self.run_dir / "samples" / ckpt.step_name(self.step),
                    dp_rank=self.plan.dp_rank(self.rank),
                    dp_size=self.plan.dp_size,
                    writer=self.plan.sp_rank(self.rank) == 0,
                )
        finally:
            del text_encoder, codec
            if self.cached:  # back out of memory until the next validation
                self._release_encoders()
            module.train(was_training)
        dist_env.barrier()  # every rank's files are written
        if self.rank == 0 and self.cfg.logging.tensorboard:  # the mp4s also as animated images (video_log.py)
            from frameloom.train.video_log import log_videos

            log_videos(self.run_dir, [p for p in paths if p.exists()], self.step, sample_fps(self.cfg))
        return paths


def train(cfg: Config) -> TrainResult:
    """`frameloom train`: build the run from `cfg` and train it."""
    return Trainer(cfg).fit()


def _extra_sizes(model: torch.nn.Module) -> dict[str, int]:
    """The text extras a denoiser takes, by name, with their size, as its config states them (Pyramid Flow's
    ``pooled_projection_dim``: the pooled CLIP vector ``pooled``); empty when it states none."""
    config = getattr(model, "config", None)
    pooled = config.get("pooled_projection_dim") if isinstance(config, dict) else None
    return {"pooled": int(pooled)} if pooled else {}
