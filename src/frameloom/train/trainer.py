"""The training loop: one optimizer step = `grad_accum` micro-batches of flow matching on the denoiser.

Everything a resumed run needs (model, EMA, optimizer, scheduler, sampler position, RNG states, step,
counters) is one state, saved atomically (checkpoint/io.py, checkpoint/distributed.py). Randomness of a
micro-step (timesteps, noise, caption dropout) comes from a generator seeded by (seed, step, slot), where
`slot = micro * data_world + data_rank` is the micro-batch's place in the step's global batch, so a resumed
run draws exactly what the uninterrupted run would have drawn, and N processes with gradient accumulation
A draw what one process with accumulation N * A draws (the sampler hands out micro-batches in the same order).

Under torchrun the process joins the process group here (frameloom.parallel.init_distributed), and
`Trainer.parallelize` applies sequence parallelism, checkpointing, compile and DDP/FSDP2 from outside.
"""

from __future__ import annotations

import logging
import math
import signal
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
    load_training_checkpoint,
    save_training_checkpoint,
)
from frameloom.config import Config, dump_yaml
from frameloom.data.sampler import build_sampler
from frameloom.errors import FrameloomError
from frameloom.memory.block_swap import place_on_device
from frameloom.models.registry import get_family
from frameloom.objectives import Conditioning, StepContext, build_objective, caption_dropout_mask, predict
from frameloom.parallel import env as dist_env
from frameloom.parallel.parallelize import Parallelized
from frameloom.parallel.parallelize import parallelize as apply_parallelism
from frameloom.parallel.plan import check_sequence_split, plan_parallel
from frameloom.parallel.sequence import pad_text as pad_text_for_sp
from frameloom.train.ema import EMA
from frameloom.train.metrics import MetricsLogger
from frameloom.train.optim import build_optimizer


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


def step_generator(seed: int, step: int, micro: int, rank: int = 0) -> torch.Generator:
    """The generator of one micro-step: a pure function of (seed, step, micro, rank)."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 65_537 + rank)
    return g


def pad_text(embs: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length text embeddings (L_i, D) into (B, L_max, D) with a bool mask (B, L_max)."""
    length = max(e.shape[0] for e in embs)
    out = embs[0].new_zeros(len(embs), length, embs[0].shape[-1])
    mask = torch.zeros(len(embs), length, dtype=torch.bool)
    for i, (e, m) in enumerate(zip(embs, masks)):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = m.bool()
    return out, mask


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (cluster preemption)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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
        # 0. Processes: torchrun's environment (one process without it); the mesh layout, checked up front.
        self.env = dist_env.init_distributed(pipeline.resolve_device(cfg.train.device))
        self.device = self.env.device
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.plan = plan_parallel(cfg.parallel, self.world_size, cfg.train.batch_size)
        # ranks of one sp group (and one video_sync_group) read the same batch
        self.data_rank, self.data_world = self.plan.data_rank(self.rank), self.plan.data_world
        self.autocast = self._autocast_dtype()

        # 1. Frozen encoders and the data (cached latents when complete, else on-the-fly encoding).
        torch.manual_seed(cfg.seed)
        self.spec = pipeline.clip_spec(cfg)
        self.codec = pipeline.load_codec(cfg, self.device)
        # rank 0 first: a tiny-byt5 encoder is built on first use, and must not be built by every rank at once
        self.text_encoder = dist_env.main_first(lambda: pipeline.load_text_encoder(cfg, self.device))
        self.policy = pipeline.bucket_policy(cfg)  # data.bucket (None: none); the cache and sampler share it
        self.dataset, self.cached = self._build_dataset()
        self.empty_emb, self.empty_mask, self.empty_extras = self._empty_prompt()
        # What the model needs of the encoders; with a complete cache, training reads latents and embeddings
        # only, so the VAE and text encoder leave memory until validation reloads them (`_encoders`).
        self.latent_channels, self.text_dim = self.codec.latent_channels, self.text_encoder.dim
        self.latent_grid = self.codec.latent_size(cfg.data.num_frames, cfg.data.height, cfg.data.width)

        # 2. The denoiser (with its text statistics, while the text encoder is loaded), EMA, optimizer, schedule.
        family = get_family(cfg.model.family)
        self.model = family.build_denoiser(cfg.model, self.latent_channels, self.text_dim)
        self._fit_text_statistics(self.model)
        if self.cached:
            self._release_encoders()
        # the device, except the frozen weights of parallel.blocks_to_swap blocks (memory/block_swap.py)
        self.swapper = place_on_device(self.model, self.device, cfg.parallel)
        self.model.train()
        self._check_sequence_split(self.model)
        self.par: Parallelized | None = None
        self.model = self.parallelize(self.model)  # what to call (a DDP wrapper, or the module itself)
        self.module = self.par.module if self.par is not None else self.model  # original parameter names
        self.ema = EMA(self.module, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.optimizer, self.scheduler = build_optimizer(self.module.parameters(), cfg.optim, cfg.train.steps)
        self.objective = build_objective(cfg)
        self.sampler = build_sampler(cfg, self.dataset, self.data_rank, self.data_world, policy=self.policy)
        self.substituted_samples = 0  # samples that failed to decode and were replaced (this process)
        self.step = 0
        self.skipped_steps = 0
        self.batches_consumed = 0
        self._pending: PendingSave | None = None  # an async checkpoint still being written
        self._ckpt_group = None  # gloo group of the async checkpoint writer

    # ------------------------------------------------------------------ construction helpers

    def _autocast_dtype(self) -> torch.dtype | None:
        mp = self.cfg.train.mixed_precision
        if mp == "no" or (mp == "auto" and self.device.type != "cuda"):
            return None
        if mp in ("auto", "bf16"):
            return torch.bfloat16
        raise FrameloomError(f"train.mixed_precision must be auto, bf16 or no, not {mp!r}")

    def _build_dataset(self):
        from frameloom.cache.dataset import CachedClipDataset

        manifest = pipeline.manifest_path(self.cfg)
        if self.cfg.data.use_cache not in ("auto", "never"):
            raise FrameloomError(f"data.use_cache must be auto or never, not {self.cfg.data.use_cache!r}")
        rules = pipeline.caption_rules(self.cfg)
        reasons = pipeline.uncacheable(self.cfg)
        if self.cfg.data.use_cache == "auto" and reasons:
            if self.rank == 0:
                logging.getLogger("frameloom.train").warning(
                    "not reading the latent cache: %s; decoding and encoding on the fly", "; ".join(reasons)
                )
        elif self.cfg.data.use_cache == "auto":
            cached = CachedClipDataset(
                manifest,
                self.spec,
                self.codec.identity,
                self.text_encoder.identity,
                pipeline.open_store(self.cfg),
                buckets=self.policy,  # one entry per (row, bucket) the policy can assign
                caption_rules=rules,
            )
            if not cached.missing():
                return cached, True
        return pipeline.ClipDataset(manifest, self.spec, seed=self.cfg.seed, caption_rules=rules), False

    @torch.no_grad()
    def _empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The empty prompt's tokens (L, D), mask (L,) and extra tensors {name: (...)} (caption dropout)."""
        emb, mask = self.text_encoder.encode([""])
        extras = {k: v[0].float().cpu() for k, v in self.text_encoder.encode_extras([""]).items()}
        length = int(mask[0].sum())
        return emb[0, :length].float().cpu(), mask[0, :length].cpu(), extras

    @torch.no_grad()
    def _fit_text_statistics(self, model: torch.nn.Module, max_captions: int = 2048) -> None:
        """Give a denoiser that standardizes its pooled text (VideoDiT's `pooled_text`) the mean/std of the
        training captions' pooled embeddings: up to `max_captions` rows, evenly spaced over the manifest.
        A resumed run then loads the saved values with the weights."""
        if not getattr(model, "wants_text_statistics", False):
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
        """Ulysses splits the video tokens and heads over sp ranks: both must divide (checked before training)."""
        sp = self.plan.sp
        if sp == 1 or not hasattr(model, "patch") or not hasattr(model, "num_heads"):
            return
        t, h, w = self.latent_grid
        pt, ph, pw = model.patch
        check_sequence_split((t // pt) * (h // ph) * (w // pw), model.num_heads, sp)

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Sequence parallel -> activation checkpointing -> compile -> DDP/FSDP2, from outside the model
        (frameloom.parallel.parallelize); returns what the loop calls. Sets `self.par`."""
        self.par = apply_parallelism(model, self.cfg.parallel, self.env, batch_size=self.cfg.train.batch_size)
        return self.par.forward

    # ------------------------------------------------------------------ data

    def _collate(self, items: list[dict]) -> dict:
        if self.cached:
            from frameloom.cache.dataset import collate_text

            return collate_text(items)
        return {
            "video": torch.stack([it["video"] for it in items]),  # one bucket per batch: one shape
            "text": [it["text"] for it in items],
            "index": torch.tensor([it["index"] for it in items]),
            "substituted": sum(it.get("substituted", 0) for it in items),
        }

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self._collate,
            num_workers=self.cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    @torch.no_grad()
    def _encode(self, batch: dict) -> tuple[torch.Tensor, Conditioning]:
        """-> latents (B, C, t, h, w) and the text conditioning (tokens (B, L, D), mask (B, L), extras
        {name: (B, ...)}), on the device."""
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
        latent = self.codec.encode(batch["video"].to(self.device))
        emb, mask = self.text_encoder.encode(batch["text"])
        extras = {
            k: v.to(self.device).float() for k, v in self.text_encoder.encode_extras(batch["text"]).items()
        }
        return latent.float(), Conditioning(emb.float(), mask.to(self.device), extras)

    def _drop_extras(self, extras: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replace the extra text tensors of the rows where `drop` is True by the empty prompt's."""
        if not extras or not drop.any():
            return extras
        keep = ~drop.to(next(iter(extras.values())).device)
        return {
            k: torch.where(keep.view(-1, *[1] * (v.dim() - 1)), v, self.empty_extras[k].to(v))
            for k, v in extras.items()
        }

    def _drop_captions(self, emb: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor):
        """Replace the captions where `drop` is True by the empty prompt (for classifier-free guidance)."""
        if not drop.any():
            return emb, mask
        length = max(emb.shape[1], self.empty_emb.shape[0])
        if emb.shape[1] < length:
            emb = torch.nn.functional.pad(emb, (0, 0, 0, length - emb.shape[1]))
            mask = torch.nn.functional.pad(mask, (0, length - mask.shape[1]))
        emb, mask = emb.clone(), mask.clone()
        n = self.empty_emb.shape[0]
        idx = drop.nonzero().flatten().to(emb.device)
        emb[idx] = 0
        mask[idx] = False
        emb[idx, :n] = self.empty_emb.to(emb)
        mask[idx, :n] = True
        return emb, mask

    # ------------------------------------------------------------------ one step

    def _micro_step(self, batch: dict, micro: int) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the (unscaled) loss."""
        latent, cond = self._encode(batch)  # (B, C, t, h, w); tokens (B, L, D), mask (B, L), extras
        # The micro-batch's place in the step's global batch: one process with accumulation 2 and two
        # processes without draw the same numbers for the same samples. A CPU generator: same draws anywhere.
        ctx = StepContext(
            step=self.step,
            micro=micro,
            data_rank=self.data_rank,
            data_world=self.data_world,
            sync_rank=self.plan.sync_rank(self.rank),
            sync_size=self.plan.video_sync_group,
        )
        g = step_generator(self.cfg.seed, self.step, ctx.slot)
        inputs = self.objective.draw(latent, g, ctx)  # times, noise -> x_t (B, C, t, h, w), target
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

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip, check and apply the accumulated gradients; returns (grad norm, applied)."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)  # over all shards under FSDP (a DTensor)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        ok = math.isfinite(norm)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, ok

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """The non-tensor state (model, optimizer, EMA and RNGs are added by the checkpoint writer)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            # At the steps the loop consumed (not the sampler's own count, which DataLoader prefetching runs
            # ahead of); the state says at which world size, so another number of processes resumes there.
            "sampler": self.sampler.state_dict_at(self.batches_consumed),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
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
        if self.rank == 0:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def save(self) -> Path:
        fmt = self.checkpoint_format()
        async_save = self.cfg.parallel.async_checkpoint and fmt == SHARDED
        self._finish_pending()  # at most one checkpoint in flight
        if async_save and self._ckpt_group is None and dist_env.is_distributed():
            import torch.distributed as dist

            self._ckpt_group = dist.new_group(backend="gloo")  # the writer thread's own collectives
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
        if self.rank == 0:
            ckpt.cleanup_partial(self.run_dir)
        dist_env.barrier()
        path = ckpt.resolve_checkpoint(self.run_dir, self.cfg.checkpoint.resume)
        if path is None:
            return None
        state = load_training_checkpoint(
            path,
            module=self.module,
            optimizer=self.optimizer,
            ema=self.ema.state_dict() if self.ema else None,
        )
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
        self.skipped_steps = int(state["skipped_steps"])
        self.substituted_samples = int(state.get("substituted_samples", 0))  # absent before it was saved
        return path

    # ------------------------------------------------------------------ the loop

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
        batches = iter(self._loader())
        with _Preemption() as preemption:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                micro_losses = []
                for m in range(cfg.train.grad_accum):
                    batch = next(batches)
                    self.batches_consumed += 1
                    self.substituted_samples += int(batch.get("substituted", 0))
                    micro_losses.append(self._micro_step(batch, m))
                loss = float(torch.stack(micro_losses).mean())
                loss = dist_env.all_reduce_mean(loss, self.device)  # every rank agrees (and skips) together
                if math.isfinite(loss):
                    grad_norm, applied = self._optimizer_step()
                else:  # never train on a non-finite loss: drop the step's gradients and count it
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    grad_norm, applied = float("nan"), False
                self.step += 1
                if applied:
                    if self.ema is not None:
                        self.ema.update(self.module, self.step)
                else:
                    self.skipped_steps += 1
                dt = time.perf_counter() - t0
                samples = cfg.train.batch_size * cfg.train.grad_accum * self.data_world
                record = {
                    "step": self.step,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "samples_per_s": samples / dt,
                    "skipped_steps": self.skipped_steps,
                    "substituted_samples": self.substituted_samples,
                }
                logger.log(record)
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{1 / dt:.2f}")
                bar.update(1)
                if cfg.validation.every and self.step % cfg.validation.every == 0 and cfg.validation.prompts:
                    self.validate()
                done = self.step >= cfg.train.steps
                self._finish_pending(wait=False)  # an async checkpoint written meanwhile is completed
                stop = dist_env.any_rank(preemption.requested, self.device)  # SIGTERM reaches ranks apart
                if done or stop or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    last_ckpt = self.save()
                if stop and not done:
                    preempted = True
                    bar.write(f"SIGTERM: saved {last_ckpt}; resume with checkpoint.resume=latest")
                    break
        self._finish_pending()  # the last checkpoint is complete before fit returns
        bar.close()
        logger.close()
        return TrainResult(
            run_dir=self.run_dir,
            step=self.step,
            last_loss=losses[-1] if losses else None,
            skipped_steps=self.skipped_steps,
            seconds=time.perf_counter() - start,
            preempted=preempted,
            checkpoint=last_ckpt,
            losses=losses,
        )

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """Sample the validation prompts with the EMA weights into samples/step-N/."""
        from frameloom.sampling.generate import generate_to_files

        model = self.model
        use_ema = self.ema is not None and self.cfg.sample.use_ema
        if self.world_size > 1:  # a plain copy (gathered, unwrapped) on rank 0; the others wait
            model = self.plain_model(ema=use_ema)
        elif use_ema:
            model = self.ema_model()
        paths: list[Path] = []
        if model is not None:
            was_training = model.training
            model.eval()
            out_dir = self.run_dir / "samples" / ckpt.step_name(self.step)
            family = get_family(self.cfg.model.family)
            text_encoder, codec = self._encoders()
            if family.validate is not None:  # the family's diffusers pipeline around the in-training weights
                paths = family.validate(model, text_encoder, codec, self.cfg, out_dir)
            else:
                prompts = self.cfg.validation.prompts
                paths = generate_to_files(model, text_encoder, codec, self.cfg, prompts, out_dir=out_dir)
            del text_encoder, codec
            if self.cached:  # back out of memory until the next validation
                self._release_encoders()
            model.train(was_training)
            if self.cfg.logging.tensorboard:  # the mp4s also as animated images (train/video_log.py)
                from frameloom.train.video_log import log_videos

                log_videos(self.run_dir, paths, self.step, self.cfg.sample.fps)
        dist_env.barrier()
        return paths

    def plain_model(self, ema: bool) -> torch.nn.Module | None:
        """Rank 0: a fresh single-device denoiser with the whole (gathered) weights, EMA ones if `ema`;
        None on the other ranks. Collective under FSDP (every rank must call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.module, options=full)  # whole tensors on rank 0 (collective)
        if ema:
            for k, v in self.ema.shadow.items():
                weights[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu()
        if self.rank != 0:
            return None
        family = get_family(self.cfg.model.family)
        model = family.build_denoiser(self.cfg.model, self.latent_channels, self.text_dim)
        model.load_state_dict(weights)
        return model.to(self.device)

    def ema_model(self) -> torch.nn.Module:
        """A copy of the denoiser carrying the EMA weights."""
        import copy

        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        return model


def train(cfg: Config) -> TrainResult:
    """`frameloom train`: build the run from `cfg` and train it."""
    return Trainer(cfg).fit()
