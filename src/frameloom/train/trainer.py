"""The training loop: one optimizer step = `grad_accum` micro-batches of flow matching on the denoiser.

Everything a resumed run needs (model, EMA, optimizer, scheduler, sampler position, RNG states, step,
counters) is one state, saved atomically (checkpoint/io.py). Randomness of a micro-step (timesteps, noise,
caption dropout) comes from a generator seeded by (seed, step, micro-step, rank), so a resumed run draws
exactly what the uninterrupted run would have drawn.

The parallel layer (issue #5) plugs in at `Trainer.parallelize`; nothing else in the loop assumes one process.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from frameloom import pipeline
from frameloom.checkpoint import io as ckpt
from frameloom.config import Config, dump_yaml
from frameloom.data.sampler import ResumableBatchSampler
from frameloom.errors import FrameloomError
from frameloom.models.registry import get_family
from frameloom.objectives import build_objective, caption_dropout_mask
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


class Trainer:
    """Builds the run from a config and trains it. `Trainer(cfg).fit()` or `train(cfg)`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.device = pipeline.resolve_device(cfg.train.device)
        self.rank, self.world_size = 0, 1
        self.autocast = self._autocast_dtype()
        if cfg.train.steps < 1 or cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
            raise FrameloomError("train.steps, train.batch_size and train.grad_accum must be >= 1")

        # 1. Frozen encoders and the data (cached latents when complete, else on-the-fly encoding).
        torch.manual_seed(cfg.seed)
        self.spec = pipeline.clip_spec(cfg)
        self.codec = pipeline.load_codec(cfg, self.device)
        self.text_encoder = pipeline.load_text_encoder(cfg, self.device)
        self.dataset, self.cached = self._build_dataset()
        self.empty_emb, self.empty_mask = self._empty_prompt()

        # 2. The denoiser, its EMA, optimizer and schedule.
        family = get_family(cfg.model.family)
        self.model = family.build_denoiser(cfg.model, self.codec.latent_channels, self.text_encoder.dim)
        self.model.to(self.device).train()
        self.model = self.parallelize(self.model)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.optimizer, self.scheduler = build_optimizer(self.model.parameters(), cfg.optim, cfg.train.steps)
        self.objective = build_objective(cfg)
        self.sampler = ResumableBatchSampler(
            len(self.dataset), cfg.train.batch_size, seed=cfg.seed, rank=self.rank, world_size=self.world_size
        )
        self.step = 0
        self.skipped_steps = 0
        self.batches_consumed = 0

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
        if self.cfg.data.use_cache == "auto":
            cached = CachedClipDataset(
                manifest,
                self.spec,
                self.codec.identity,
                self.text_encoder.identity,
                pipeline.open_store(self.cfg),
            )
            if not cached.missing():
                return cached, True
        return pipeline.ClipDataset(manifest, self.spec), False

    @torch.no_grad()
    def _empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = self.text_encoder.encode([""])
        length = int(mask[0].sum())
        return emb[0, :length].float().cpu(), mask[0, :length].cpu()

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        """Hook for the parallel layer (DDP/FSDP2/SP/checkpointing are applied from outside the model)."""
        return model

    # ------------------------------------------------------------------ data

    def _collate(self, items: list[dict]) -> dict:
        if self.cached:
            from frameloom.cache.dataset import collate_text

            return collate_text(items)
        return {
            "video": torch.stack([it["video"] for it in items]),
            "text": [it["text"] for it in items],
            "index": torch.tensor([it["index"] for it in items]),
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
    def _encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> latents (B, C, t, h, w), text embeddings (B, L, D), text mask (B, L), on the device."""
        if self.cached:
            return (
                batch["latent"].to(self.device, non_blocking=True).float(),
                batch["text_emb"].to(self.device, non_blocking=True).float(),
                batch["text_mask"].to(self.device, non_blocking=True),
            )
        latent = self.codec.encode(batch["video"].to(self.device))
        emb, mask = self.text_encoder.encode(batch["text"])
        return latent.float(), emb.float(), mask.to(self.device)

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
        latent, emb, mask = self._encode(batch)  # (B, C, t, h, w), (B, L, D), (B, L)
        g = step_generator(self.cfg.seed, self.step, micro, self.rank)  # a CPU generator: same draws anywhere
        inputs = self.objective.draw(latent, g)  # times, noise -> x_t (B, C, t, h, w), target
        drop = caption_dropout_mask(latent.shape[0], self.cfg.objective.caption_dropout, g)
        emb, mask = self._drop_captions(emb, mask, drop)
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            pred = self.model(inputs.x_t, inputs.t, emb, mask)
        loss = self.objective.loss(pred, inputs)
        if torch.isfinite(loss):
            (loss / self.cfg.train.grad_accum).backward()
        return loss.detach()

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip, check and apply the accumulated gradients; returns (grad norm, applied)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        ok = math.isfinite(norm)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, ok

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            # Batches the loop consumed (not the sampler's own count, which DataLoader prefetching runs ahead of).
            "sampler": {"consumed": self.batches_consumed, "seed": self.cfg.seed},
            "rng": ckpt.capture_rng(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
        }

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model.state_dict(),
            state=self.state(),
            ema=self.ema.state_dict() if self.ema else None,
        )
        ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def resume(self) -> Path | None:
        ckpt.cleanup_partial(self.run_dir)
        path = ckpt.resolve_checkpoint(self.run_dir, self.cfg.checkpoint.resume)
        if path is None:
            return None
        loaded = ckpt.load_checkpoint(path)
        self.model.load_state_dict(loaded["model"])
        if self.ema is not None and loaded["ema"] is not None:
            self.ema.load_state_dict(loaded["ema"])
        state = loaded["state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The saved lr belongs to the old run's schedule; recompute it from this config's schedule, so that a
        # run resumed with a longer train.steps follows its new schedule (identical when nothing changed).
        for group, base_lr, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas
        ):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        self.sampler.load_state_dict(state["sampler"])
        self.batches_consumed = self.sampler.consumed
        ckpt.restore_rng(state["rng"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        return path

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, self.run_dir / "config.resolved.yaml")
        resumed = self.resume()
        logger = MetricsLogger(
            self.run_dir,
            resume_step=self.step,
            tensorboard=cfg.logging.tensorboard,
            tb_every=cfg.train.log_every,
        )
        bar = tqdm(
            total=cfg.train.steps,
            initial=self.step,
            disable=not cfg.train.progress,
            desc="train",
            unit="step",
        )
        if resumed is not None:
            bar.write(f"resumed from {resumed} at step {self.step}")
        losses: list[float] = []
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
                    micro_losses.append(self._micro_step(batch, m))
                loss = float(torch.stack(micro_losses).mean())
                if math.isfinite(loss):
                    grad_norm, applied = self._optimizer_step()
                else:  # never train on a non-finite loss: drop the step's gradients and count it
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    grad_norm, applied = float("nan"), False
                self.step += 1
                if applied:
                    if self.ema is not None:
                        self.ema.update(self.model, self.step)
                else:
                    self.skipped_steps += 1
                dt = time.perf_counter() - t0
                samples = cfg.train.batch_size * cfg.train.grad_accum * self.world_size
                record = {
                    "step": self.step,
                    "loss": loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "samples_per_s": samples / dt,
                    "skipped_steps": self.skipped_steps,
                }
                logger.log(record)
                losses.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{1 / dt:.2f}")
                bar.update(1)
                if cfg.validation.every and self.step % cfg.validation.every == 0 and cfg.validation.prompts:
                    self.validate()
                done = self.step >= cfg.train.steps
                if (
                    done
                    or preemption.requested
                    or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0)
                ):
                    last_ckpt = self.save()
                if preemption.requested and not done:
                    preempted = True
                    bar.write(f"SIGTERM: saved {last_ckpt}; resume with checkpoint.resume=latest")
                    break
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
        if self.ema is not None and self.cfg.sample.use_ema:
            model = self.ema_model()
        was_training = model.training
        model.eval()
        paths = generate_to_files(
            model,
            self.text_encoder,
            self.codec,
            self.cfg,
            self.cfg.validation.prompts,
            out_dir=self.run_dir / "samples" / ckpt.step_name(self.step),
        )
        model.train(was_training)
        return paths

    def ema_model(self) -> torch.nn.Module:
        """A copy of the denoiser carrying the EMA weights."""
        import copy

        model = copy.deepcopy(self.model)
        self.ema.copy_to(model)
        return model


def train(cfg: Config) -> TrainResult:
    """`frameloom train`: build the run from `cfg` and train it."""
    return Trainer(cfg).fit()
