"""Text-to-video generation with a trained denoiser, and the `frameloom sample` command.

Each (prompt, seed) pair gets its own noise from `torch.Generator().manual_seed(seed)` drawn on the CPU, so a
video depends only on its prompt, seed and settings: not on which other prompts share its batch, nor on the
device.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from frameloom import pipeline
from frameloom.checkpoint import io as ckpt
from frameloom.checkpoint.trainable import load_weights
from frameloom.config import Config, apply_overrides, load_config
from frameloom.errors import FrameloomError
from frameloom.sampling.flow_euler import euler_sample
from frameloom.sampling.image_io import fid_uint8, write_npz, write_png
from frameloom.sampling.video_io import write_mp4


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    text_encoder,
    codec,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    num_frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    negative_prompt: str = "",
    shift: float = 1.0,
    batch_size: int = 16,
) -> torch.Tensor:
    """Videos (N, 3, T, H, W) in [-1, 1] for N = len(prompts) (prompt i uses seeds[i])."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    t, h, w = codec.latent_size(num_frames, height, width)
    neg_emb, neg_mask = text_encoder.encode([negative_prompt])
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        # 1. Per-sample noise from its own seed (on CPU, so results match across devices).
        noise = torch.stack(
            [
                torch.randn((codec.latent_channels, t, h, w), generator=torch.Generator().manual_seed(int(s)))
                for s in seeds[start : start + batch_size]
            ]
        ).to(device, dtype)  # (B, C, t, h, w)
        # 2. Text conditions.
        emb, mask = text_encoder.encode(chunk)

        def model_fn(x, tt, text, text_mask):
            return model(x, tt.expand(x.shape[0]), text.to(dtype), text_mask)

        # 3. Integrate the flow from noise to data, then decode to pixels.
        latent = euler_sample(
            model_fn,
            noise,
            steps,
            cond=(emb.to(device, dtype), mask.to(device)),
            uncond=(neg_emb.to(device, dtype), neg_mask.to(device)),
            guidance=guidance,
            shift=shift,
        )
        out.append(codec.decode(latent.float()).clamp(-1, 1).cpu())
    return torch.cat(out)


def slug(text: str, limit: int = 48) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "empty"


def sample_videos(
    model: torch.nn.Module, text_encoder, codec, cfg: Config, prompts: Sequence[str], seeds: Sequence[int]
) -> torch.Tensor:
    """Videos (N, 3, T, H, W) in [-1, 1], prompt i with seed i, by the run's sampler: the family's own
    (e.g. CogVideoX: v-prediction DDIM), the DDPM samplers for a DDPM-trained native DiT, else the flow Euler
    sampler under the run's autocast (bf16 on CUDA by default)."""
    from frameloom.models.registry import get_family

    family_sample = get_family(cfg.model.family).sample
    if family_sample is not None:
        return family_sample(model, text_encoder, codec, cfg, list(prompts), list(seeds))
    if cfg.objective.name == "ddpm":  # sample.scheduler
        from frameloom.sampling.ddpm_generate import ddpm_videos

        return ddpm_videos(model, text_encoder, codec, cfg, list(prompts), list(seeds))
    device = next(model.parameters()).device
    dtype = pipeline.autocast_dtype(cfg.train.mixed_precision, device)
    precision = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with precision:
        return generate(
            model,
            text_encoder,
            codec,
            list(prompts),
            seeds=list(seeds),
            num_frames=cfg.data.num_frames,
            height=cfg.data.height,
            width=cfg.data.width,
            steps=cfg.sample.steps,
            guidance=cfg.sample.guidance,
            negative_prompt=cfg.sample.negative_prompt,
            shift=cfg.sample.shift if cfg.sample.shift is not None else 1.0,  # null: none for the DiT
        )


def generate_to_files(
    model: torch.nn.Module,
    text_encoder,
    codec,
    cfg: Config,
    prompts: Sequence[str],
    *,
    out_dir: str | Path,
    seeds: Sequence[int] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[Path]:
    """Generate one mp4 per (prompt, seed) with the config's `sample` settings; returns the file paths.

    With `shard=(rank, world)` this process makes only pairs `rank::world` (a video depends only on its
    prompt, seed and settings, so the split changes nothing); the returned list names every pair's file."""
    seeds = list(seeds) if seeds else [cfg.sample.seed]
    every = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    out_dir = Path(out_dir)
    suffix = ".png" if cfg.data.num_frames == 1 else ".mp4"  # image models write PNGs
    names = [out_dir / f"{i:03d}-{slug(prompt)}-seed{seed}{suffix}" for i, prompt, seed in every]
    rank, world = shard
    pairs = every[rank::world]
    if not pairs:
        return names
    videos = generate_batch(
        model, text_encoder, codec, cfg, [p for _, p, _ in pairs], [s for _, _, s in pairs]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    from frameloom.models.registry import get_family, sample_fps

    solver = sampler_description(get_family(cfg.model.family), model, cfg)
    for path, video in zip(names[rank::world], videos):
        if suffix == ".png":
            write_png(video, path)
        else:
            write_mp4(video, path, fps=sample_fps(cfg), metadata={"comment": f"frameloom sampler: {solver}"})
    return names


def generate_batch(model, text_encoder, codec, cfg: Config, prompts: Sequence[str], seeds: Sequence[int]):
    """Videos (N, 3, T, H, W) in [-1, 1], one per (prompt, seed): the family's own sampler when it has one
    (e.g. CogVideoX's v-prediction DDIM, dit_class's learned-variance DDPM), else the flow Euler sampler."""
    from frameloom.models.registry import get_family

    solver = sampler_description(get_family(cfg.model.family), model, cfg)
    logging.getLogger("frameloom.sample").info("sampling with %s", solver)
    return sample_videos(model, text_encoder, codec, cfg, prompts, seeds)


def generate_fid_npz(
    model,
    text_encoder,
    codec,
    cfg: Config,
    prompts: Sequence[str],
    count: int,
    *,
    out_dir: str | Path,
    shard: tuple[int, int] = (0, 1),
    chunk: int = 256,
) -> Path:
    """``count`` samples (sample i: prompt ``prompts[i % len]``, seed ``sample.seed + i``) as the FID batch
    ``out_dir/samples_{count}.npz`` (``arr_0`` uint8 (N, H, W, 3); sampling/image_io.py). Under torchrun each
    process makes samples ``rank::world`` into a part file; rank 0 joins them in sample order."""
    from tqdm.auto import tqdm

    from frameloom.parallel.env import barrier

    if count < 1 or not prompts:
        raise FrameloomError("--fid-npz needs a positive count and at least one class or prompt")
    rank, world = shard
    out_dir = Path(out_dir)
    mine = list(range(rank, count, world))
    parts = []
    for start in tqdm(range(0, len(mine), chunk), desc="fid samples", disable=rank != 0, unit="chunk"):
        idx = mine[start : start + chunk]
        videos = generate_batch(
            model, text_encoder, codec, cfg, [prompts[i % len(prompts)] for i in idx],
            [cfg.sample.seed + i for i in idx],
        )  # fmt: skip
        parts.append(fid_uint8(videos))
    part = out_dir / f".fid_part_{rank}.npz"
    write_npz(np.concatenate(parts) if parts else np.zeros((0, 1, 1, 3), np.uint8), part)
    barrier()
    final = out_dir / f"samples_{count}.npz"
    if rank == 0:
        shares = [np.load(out_dir / f".fid_part_{r}.npz")["arr_0"] for r in range(world)]
        joined = np.empty((count, *shares[0].shape[1:]), np.uint8)
        for r, share in enumerate(shares):
            joined[r::world] = share
        write_npz(joined, final)
        for r in range(world):
            (out_dir / f".fid_part_{r}.npz").unlink(missing_ok=True)
    barrier()
    return final


def sampler_description(family, model: torch.nn.Module, cfg: Config) -> str:
    """The solver, steps, shift and guidance ``generate_to_files`` samples with (the family's own words, or
    frameloom's flow Euler): logged and written into each mp4's ``comment`` tag."""
    if family.describe_sampler is not None:
        return family.describe_sampler(model, cfg)
    shift = cfg.sample.shift if cfg.sample.shift is not None else 1.0
    return f"Euler, {cfg.sample.steps} steps, shift {shift:g}, guidance {cfg.sample.guidance:g}"


def load_for_sampling(
    cfg: Config, checkpoint: str | None, device: torch.device, *, codec, text_encoder
) -> torch.nn.Module:
    """The denoiser of a run with its checkpoint's EMA weights (or raw weights if use_ema is off or absent).

    `codec` and `text_encoder` are the already-loaded encoders (their sizes shape the denoiser)."""
    from frameloom.models.registry import get_family

    path = ckpt.resolve_checkpoint(cfg.run_dir, checkpoint) if checkpoint else None
    if checkpoint and path is None:
        if checkpoint != "latest" or not cfg.model.pretrained:
            raise FrameloomError(f"no complete checkpoint in {Path(cfg.run_dir) / 'checkpoints'}")
        # a config whose run has not trained yet: sample the pretrained weights it names (a released model)
        logging.getLogger("frameloom.sample").warning(
            "no checkpoint in %s: sampling the pretrained weights of model.pretrained=%s",
            Path(cfg.run_dir) / "checkpoints",
            cfg.model.pretrained,
        )
    model = get_family(cfg.model.family).build_denoiser(cfg.model, codec.latent_channels, text_encoder.dim)
    if path is not None:
        loaded = ckpt.load_checkpoint(path)
        weights = dict(loaded["model"])
        if cfg.sample.use_ema and loaded["ema"] is not None:
            weights.update(loaded["ema"])
        load_weights(model, weights, str(path))  # a LoRA checkpoint holds the adapter: the base is pretrained
    return model.to(device).eval()


def sample_command(
    source: str,
    *,
    prompts: Sequence[str],
    out: str,
    checkpoint: str = "latest",
    steps: int | None = None,
    guidance: float | None = None,
    seeds: Sequence[int] | None = None,
    negative_prompt: str | None = None,
    overrides: Sequence[str] = (),
    fid_npz: int | None = None,
) -> list[Path]:
    """`frameloom sample RUN_DIR_OR_CONFIG --prompt ...`: write mp4s into `out`.

    Under torchrun each process generates its share of the (prompt, seed) pairs (`generate_to_files`'s
    `shard`); every process returns the full list once all files are written."""
    src = Path(source)
    if src.is_dir():
        resolved = src / "config.resolved.yaml"
        if not resolved.exists():
            raise FrameloomError(f"{src} is not a run directory (no config.resolved.yaml)")
        cfg = load_config(resolved)
        cfg = apply_overrides(cfg, [f"run_dir={src}"])
    else:
        cfg = load_config(src)
    sample_overrides = list(overrides)
    if steps is not None:
        sample_overrides.append(f"sample.steps={steps}")
    if guidance is not None:
        sample_overrides.append(f"sample.guidance={guidance}")
    cfg = apply_overrides(cfg, sample_overrides)
    if negative_prompt is not None:
        cfg.sample.negative_prompt = negative_prompt
    from frameloom.parallel.env import barrier, init_distributed, main_first

    env = init_distributed(pipeline.resolve_device(cfg.train.device))
    device = env.device
    codec = pipeline.load_codec(cfg, device)
    text_encoder = main_first(lambda: pipeline.load_text_encoder(cfg, device))  # tiny-byt5 built once
    model = load_for_sampling(cfg, checkpoint, device, codec=codec, text_encoder=text_encoder)
    if fid_npz is not None:  # the FID sample batch; without prompts, classes 0..K-1 in turn (balanced)
        if not prompts:
            classes = getattr(text_encoder, "num_classes", None)
            if classes is None:
                raise FrameloomError("--fid-npz without --class or --prompt needs a class-conditional model")
            prompts = [str(c) for c in range(classes)]
        shard = (env.rank, env.world_size)
        return [generate_fid_npz(model, text_encoder, codec, cfg, prompts, fid_npz, out_dir=out, shard=shard)]
    paths = generate_to_files(
        model, text_encoder, codec, cfg, prompts, out_dir=out, seeds=seeds, shard=(env.rank, env.world_size)
    )
    barrier()  # every rank's files are written
    return paths
