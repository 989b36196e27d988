"""Validation samples during training, made by every rank on the live model.

1. The prompts are shared out over the data-parallel ranks (`share`: prompts `dp_rank::dp_size`); the ranks
   of one sequence-parallel group take the same prompts (their forwards exchange tokens) and only the first
   writes. Every rank gets the same number of prompts, padded with a repeat whose video is dropped, because
   under FSDP every forward is a collective that all ranks must make.
2. The model is the one being trained: the trainer swaps the EMA weights in place (`EMA.swapped_in`), so
   nothing is gathered and no second model is built, and LoRA runs sample with their live adapters. Under
   FSDP the root's own parameters are gathered for the duration (`unshard`), because a family's diffusers
   pipeline calls the transformer inside the root module, not the root's forward.
3. File names are the global prompt index's (`NNN-<slug>-seedS.mp4`), as one process writes them.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from frameloom.config.schema import Config


def share(n: int, dp_rank: int, dp_size: int) -> list[int | None]:
    """This data rank's prompt indices `dp_rank::dp_size`, padded with None to `ceil(n / dp_size)` entries."""
    mine: list[int | None] = list(range(dp_rank, n, dp_size))
    return mine + [None] * (-(-n // dp_size) - len(mine))


def video_name(index: int, prompt: str, seed: int) -> str:
    from frameloom.sampling.generate import slug

    return f"{index:03d}-{slug(prompt)}-seed{seed}.mp4"


@contextlib.contextmanager
def gathered_root(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP2, the root module's own (non-block) parameters whole for the duration of the block; every
    FSDP unit resharded afterwards (a unit that keeps its weights after forward, such as the last block,
    would otherwise stay gathered, and the trained weights must be restored into the shards)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def _share_config(cfg: Config, picks: list[int]) -> Config:
    """`cfg` with the validation prompts (and I2V images, cycled as the family cycles them) of `picks`."""
    sub = copy.deepcopy(cfg)
    prompts = list(cfg.validation.prompts)
    sub.validation.prompts = [prompts[i] for i in picks]
    images = list(cfg.model.config.get("validation_images") or [])
    if images:
        sub.model.config["validation_images"] = [images[i % len(images)] for i in picks]
    return sub


@torch.no_grad()
def validate_shared(
    model: torch.nn.Module,
    family: Any,
    text_encoder: Any,
    codec: Any,
    cfg: Config,
    out_dir: Path,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    writer: bool = True,
) -> list[Path]:
    """Sample this rank's share of `cfg.validation.prompts` with `model` into `out_dir` (module docstring);
    returns every prompt's file path (the other ranks write theirs)."""
    from frameloom.models.registry import sample_fps
    from frameloom.sampling.generate import sample_videos, sampler_description
    from frameloom.sampling.video_io import write_mp4

    prompts, seed = list(cfg.validation.prompts), int(cfg.sample.seed)
    names = [out_dir / video_name(i, p, seed) for i, p in enumerate(prompts)]
    picks = share(len(prompts), dp_rank, dp_size)
    if not picks:
        return names
    # Padding repeats this rank's first prompt (prompt 0 on a rank with none of its own): every rank runs the
    # same number of sampler steps, which FSDP's collectives need.
    first = next((i for i in picks if i is not None), 0)
    run = [first if i is None else i for i in picks]
    out_dir.mkdir(parents=True, exist_ok=True)
    with gathered_root(model):
        if family.validate is not None:  # the family's diffusers pipeline around the in-training weights
            scratch = out_dir / f".rank-{dp_rank}"
            made = family.validate(model, text_encoder, codec, _share_config(cfg, run), scratch)
            for i, path in zip(picks, made):
                if i is not None and writer:
                    Path(path).replace(names[i])
            shutil.rmtree(scratch, ignore_errors=True)
        else:  # the run's own sampler (family's, DDPM or flow Euler), under the run's autocast
            videos = sample_videos(
                model, text_encoder, codec, cfg, [prompts[i] for i in run], [seed] * len(run)
            )
            tag = {"comment": f"frameloom sampler: {sampler_description(family, model, cfg)}"}
            for i, video in zip(picks, videos):
                if i is not None and writer:
                    write_mp4(video, names[i], fps=sample_fps(cfg), metadata=tag)
    return names
