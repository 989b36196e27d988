"""Pyramid flow vs plain flow matching at equal model and data; prints one JSON object.

1. ``tokens``: video tokens one training micro-batch of 4 processes at the released sizes (384p / 768p, 16 or
   8 latent frames, 2x2 patches): plain flow (every sample at full resolution), ``pyramid_flow`` (1:2:1 stage
   mix) and ``pyramid_flow_ar`` (temporal pyramid; mean and max over the 8 ranks of a video_sync_group and
   the turns). Pure arithmetic.
2. ``step_time``: measured seconds per optimizer step of the three objectives on this machine with the same
   tiny miniflux transformer and the same batch of latents (median of ``--timing-steps``).
3. ``adherence``: the quickstart's task (synthetic "a red square moving left" clips, 16 x 16 pixels, 8 frames,
   32 held-out color x shape x direction prompts scored by the analytic checker) learnt by the same tiny
   transformer with plain flow matching and with pyramid flow at equal training compute. The "latent" is the
   video folded 2x2 into channels (12 x 8 x 8 per frame, an exact, shared stand-in for a VAE). Compute is counted as tokens
   processed (text + video, the linear layers' cost): flow trains ``--flow-steps`` steps, pyramid flow as
   many steps as fit in the same token budget. The pooled conditioning is the standardized mean of the tiny
   T5's tokens (the released model's CLIP pooled vector has no tiny stand-in).

Run: ``python benchmarks/pyramid_vs_flow.py [--quick]`` (2 idle CPU cores: about 15 minutes; ``--quick``: a
smoke run of about a minute whose figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from frameloom.data import synthetic
from frameloom.models.pyramid_flow.flux import PyramidFluxTransformer
from frameloom.models.text import T5TextEncoder, build_tiny_t5, pool_text
from frameloom.objectives.base import Conditioning, StepContext
from frameloom.objectives.pyramid import (
    FullResolutionFlow,
    PyramidFlow,
    PyramidFlowAR,
    PyramidOptions,
    pyramid_schedule,
    sample_stage_length,
    stage_assignment,
)
from frameloom.sampling.pyramid import generate_full, guided_velocity

# ------------------------------------------------------------------------------------------- 1. token counts


def video_tokens(frames: int, h: int, w: int) -> int:
    return frames * (h // 2) * (w // 2)


def tokens_per_batch(kind: str, latent: tuple[int, int, int], batch: int = 4, group: int = 8) -> dict:
    """Video tokens of one micro-batch (the AR case: mean and max over ranks x turns)."""
    t, h, w = latent
    if kind == "flow":
        return {"tokens": batch * video_tokens(t, h, w)}
    stages = stage_assignment(batch)
    sizes = [(h // 4, w // 4), (h // 2, w // 2), (h, w)]
    if kind == "pyramid_flow":
        return {"tokens": sum(video_tokens(t, *sizes[s]) for s in stages)}
    counts = []
    for turn in range(t // group):
        for rank in range(group):
            units = sample_stage_length(t, rank, group, turn, t)
            total = 0
            for s in stages:
                n = units[s]
                # the trained unit and the previous one at the stage's size, then one coarser per unit, rest at 0
                levels = [s] + ([s] if n > 1 else [])
                level = s
                while len(levels) < n and level > 0:
                    level -= 1
                    if level == 0:
                        break
                    levels.append(level)
                levels += [0] * (n - len(levels))
                total += sum(video_tokens(1, *sizes[k]) for k in levels)
            counts.append(total)
    return {"tokens_mean": statistics.mean(counts), "tokens_max": max(counts), "tokens_min": min(counts)}


def token_table() -> dict:
    out = {}
    for name, latent in {
        "384p_16f": (16, 48, 80),
        "768p_8f": (8, 96, 160),
        "768p_16f": (16, 96, 160),
    }.items():
        flow = tokens_per_batch("flow", latent)["tokens"]
        pyr = tokens_per_batch("pyramid_flow", latent)["tokens"]
        ar = tokens_per_batch("pyramid_flow_ar", latent)
        out[name] = {
            "flow": flow,
            "pyramid_flow": pyr,
            "pyramid_flow_ar": ar,
            "ratio_flow_over_pyramid": round(flow / pyr, 3),
            "ratio_flow_over_ar_mean": round(flow / ar["tokens_mean"], 3),
        }
    return out


# ------------------------------------------------------------------------------------------- 2. step time


WIDTH = {"heads": 2}  # heads of 32 channels; --width sets it


def tiny_model(in_channels: int, text_dim: int, causal: bool, seed: int = 0) -> PyramidFluxTransformer:
    torch.manual_seed(seed)
    return PyramidFluxTransformer(
        in_channels=in_channels * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=WIDTH["heads"],
        joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim,
        axes_dims_rope=[8, 12, 12],
        temporal_causal=causal,
    )


def train_step(model, opt, objective, x0, cond, step: int, seed: int) -> tuple[float, int]:
    """One optimizer step; returns (loss, video + text tokens processed)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    inputs = objective.draw(x0, g, StepContext(step=step))
    pred = objective.predict(model, inputs, cond)
    loss = objective.loss(pred, inputs)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    tokens = 0
    for k, x in enumerate(inputs.x_t):
        if x is None or not len(x):
            continue
        hist = inputs.extras.get("history", [[]] * len(inputs.x_t))[k] if "history" in inputs.extras else []
        per = sum(video_tokens(c.shape[2], c.shape[3], c.shape[4]) for c in [*hist, x])
        tokens += x.shape[0] * (per + cond.emb.shape[1])
    return float(loss.detach()), tokens


def step_times(steps: int) -> dict:
    """Same sizes as the adherence runs: 12-channel 8 x 8 latents, 8 frames, a batch of 8. The three objectives
    take turns step by step (so a busy machine slows them alike); medians of process CPU time and wall time."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 12, 8, 8, 8, generator=g)
    cond = Conditioning(
        torch.randn(8, 16, 32, generator=g),
        torch.ones(8, 16, dtype=torch.bool),
        {"pooled": torch.randn(8, 32, generator=g)},
    )
    runs = {}
    for name, objective, causal in (
        ("flow", FullResolutionFlow(), False),
        ("pyramid_flow", PyramidFlow(), False),
        ("pyramid_flow_ar", PyramidFlowAR(PyramidOptions(), max_units=8), True),
    ):
        model = tiny_model(12, 32, causal)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), objective, [], [], [])
    for i in range(steps + 2):
        for model, opt, objective, cpu, wall, toks in runs.values():
            c0, t0 = time.process_time(), time.perf_counter()
            _, tok = train_step(model, opt, objective, x0, cond, i, 0)
            if i >= 2:  # warm-up steps excluded
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - t0)
                toks.append(tok)
    return {
        name: {
            "cpu_seconds_per_step": round(statistics.median(cpu), 4),
            "wall_seconds_per_step": round(statistics.median(wall), 4),
            "tokens_per_step": statistics.mean(toks),
        }
        for name, (_, _, _, cpu, wall, toks) in runs.items()
    }


# ------------------------------------------------------------------------------------------- 3. adherence


def fold(video: torch.Tensor) -> torch.Tensor:
    """``(N, 3, T, 16, 16) -> (N, 12, T, 8, 8)``: every 2x2 pixel block into channels (exactly invertible)."""
    n, c, t, h, w = video.shape
    x = video.reshape(n, c, t, h // 2, 2, w // 2, 2).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(n, c * 4, t, h // 2, w // 2)


def unfold(latent: torch.Tensor) -> torch.Tensor:
    n, c4, t, h, w = latent.shape
    x = latent.reshape(n, c4 // 4, 2, 2, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(n, c4 // 4, t, h * 2, w * 2)


def make_data(num_clips: int, seed: int = 0):
    train_combos, held_out = synthetic.split_combos(held_out=32, seed=seed)
    rng = np.random.default_rng(seed)
    clips, texts = [], []
    for i in range(num_clips):
        combo = train_combos[i % len(train_combos)]
        video = synthetic.render_clip(*combo, height=16, width=16, num_frames=8, rng=rng)  # (T, H, W, 3)
        clips.append(torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1)
        texts.append(synthetic.caption(*combo))
    return fold(torch.stack(clips)), texts, held_out


class PooledText:
    """Tiny T5 tokens + a standardized mean-token pooled vector (statistics from the training captions)."""

    def __init__(self, encoder: T5TextEncoder, captions: list[str]):
        self.encoder = encoder
        emb, mask = encoder.encode(sorted(set(captions)))
        pooled = pool_text(emb, mask)
        self.mean, self.std = pooled.mean(0), pooled.std(0) + 1e-6

    def __call__(self, texts: list[str]):
        emb, mask = self.encoder.encode(texts)
        return emb, mask, (pool_text(emb, mask) - self.mean) / self.std


def pad_to(emb: torch.Tensor, mask: torch.Tensor, length: int):
    extra = length - emb.shape[1]
    return torch.nn.functional.pad(emb, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


def train_run(kind: str, data, text, budget: int | None, steps: int | None, batch: int, seed: int) -> dict:
    videos, captions = data
    model = tiny_model(videos.shape[1], text.encoder.dim, causal=False, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    objective = FullResolutionFlow() if kind == "flow" else PyramidFlow()
    emb_all, mask_all, pooled_all = text(captions)
    empty_emb, empty_mask, empty_pooled = text([""])
    rng = np.random.default_rng(seed)
    used, step, losses, start, cpu = 0, 0, [], time.perf_counter(), time.process_time()
    while (steps is not None and step < steps) or (budget is not None and used < budget):
        idx = torch.from_numpy(rng.choice(len(videos), batch, replace=False))
        emb, mask, pooled = emb_all[idx].clone(), mask_all[idx].clone(), pooled_all[idx].clone()
        drop = torch.from_numpy(rng.random(batch) < 0.1)  # caption dropout to the empty prompt
        e, m = pad_to(empty_emb, empty_mask, emb.shape[1])
        emb[drop], mask[drop], pooled[drop] = e[0], m[0], empty_pooled[0]
        for g in opt.param_groups:  # linear warm-up over 50 steps
            g["lr"] = 1e-3 * min(1.0, (step + 1) / 50)
        loss, tokens = train_step(
            model, opt, objective, videos[idx], Conditioning(emb, mask, {"pooled": pooled}), step, seed
        )
        used += tokens
        losses.append(loss)
        step += 1
    return {
        "model": model,
        "steps": step,
        "tokens": used,
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "final_loss": statistics.mean(losses[-20:]),
    }


@torch.no_grad()
def score_run(kind: str, model, text, held_out, guidance: float, steps: int) -> dict:
    prompts = [synthetic.caption(*c) for c in held_out]
    emb, mask, pooled = text(prompts)
    nemb, nmask, npooled = text([""] * len(prompts))
    length = max(emb.shape[1], nemb.shape[1])
    emb, mask = pad_to(emb, mask, length)
    nemb, nmask = pad_to(nemb, nmask, length)
    velocity = guided_velocity(model.eval(), (emb, mask, pooled), (nemb, nmask, npooled), guidance)
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    shape = (len(prompts), 12, 8, 8, 8)
    if kind == "flow":
        schedule, per_stage = pyramid_schedule(1, (0.0, 1.0)), [steps]
    else:
        schedule, per_stage = pyramid_schedule(), [steps] * 3
    t0 = time.perf_counter()
    latents = generate_full(velocity, shape, schedule, per_stage, gens, torch.device("cpu"))
    videos = unfold(latents).clamp(-1, 1)
    seconds = time.perf_counter() - t0
    scores = synthetic.score_prompts(list(videos), held_out)
    return {
        "color_accuracy": scores["color_accuracy"],
        "direction_accuracy": scores["direction_accuracy"],
        "n": scores["n"],
        "sampling_steps": per_stage,
        "sampling_seconds": round(seconds, 2),
    }


def adherence(clips: int, flow_steps: int, batch: int, seed: int, sample_steps: int) -> dict:
    videos, captions, held_out = make_data(clips, seed)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = T5TextEncoder.from_pretrained(build_tiny_t5(Path(tmp) / "t5", seed=0), max_length=32)
        text = PooledText(encoder, captions)
        flow = train_run("flow", (videos, captions), text, None, flow_steps, batch, seed)
        pyr = train_run("pyramid_flow", (videos, captions), text, flow["tokens"], None, batch, seed)
        out = {}
        for name, run in (("flow", flow), ("pyramid_flow", pyr)):
            out[name] = {
                k: (round(v, 4) if isinstance(v, float) else v) for k, v in run.items() if k != "model"
            }
            out[name].update(score_run(name, run["model"], text, held_out, 4.0, sample_steps))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, figures not meaningful)")
    p.add_argument(
        "--flow-steps", type=int, default=600, help="plain flow matching steps (sets the token budget)"
    )
    p.add_argument("--clips", type=int, default=1024, help="training clips (quickstart: 1024)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--sample-steps", type=int, default=20, help="Euler steps (per stage for pyramid flow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=64, help="transformer width (heads of 32 channels)")
    args = p.parse_args(argv)
    WIDTH["heads"] = max(1, args.width // 32)
    if args.quick:
        args.flow_steps, args.clips, args.timing_steps, args.sample_steps, args.batch = 6, 64, 2, 2, 8
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {
        "benchmark": "pyramid_vs_flow",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "args": vars(args),
        "tokens_per_micro_batch_of_4": token_table(),
    }
    # Each part also goes to stderr as soon as it is measured: a run stopped before the end keeps its figures.
    print(json.dumps({"partial": result}), file=sys.stderr, flush=True)
    result["step_time"] = step_times(args.timing_steps)
    print(json.dumps({"partial": {"step_time": result["step_time"]}}), file=sys.stderr, flush=True)
    result["adherence_equal_compute"] = adherence(
        args.clips, args.flow_steps, args.batch, args.seed, args.sample_steps
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
