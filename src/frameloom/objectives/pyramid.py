"""Pyramidal flow matching (Jin et al., "Pyramidal Flow Matching for Efficient Video Generative Modeling",
2024; jy0205/Pyramid-Flow): small pure functions for the stage schedule, the pyramids, the renoising jump and
the temporal-pyramid (autoregressive) layout, and the two objectives built on them.

Conventions (SEED_FACTS.md, "Pyramid Flow"): a stage is one resolution, stage 0 the coarsest (1/4 size) and
stage K-1 the full latent. Inside stage k a point is ``x = r * start_k + (1 - r) * end_k`` with the *local*
ratio r running from 1 (start) to 0 (end); the model predicts the velocity ``start_k - end_k`` and receives a
timestep from its stage's slice of the 1000..1 grid. Where frameloom deliberately differs from upstream (the
order of random draws, the AR turn counter starting at 0) the docstring says so; docs/pyramid_flow.md lists
every difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F

from frameloom.errors import FrameloomError
from frameloom.objectives.base import Conditioning, StepContext, TrainingInputs

__all__ = [
    "PyramidOptions",
    "PyramidSchedule",
    "PyramidFlow",
    "PyramidFlowAR",
    "FullResolutionFlow",
    "ar_history",
    "ar_turn",
    "block_noise",
    "check_ar_frames",
    "corrected_start_sigma",
    "column_stages",
    "downsample2",
    "jump_coefficients",
    "latent_pyramid",
    "noise_pyramid",
    "pyramid_schedule",
    "sample_stage_length",
    "stage_assignment",
    "stage_ratios",
    "stage_timesteps",
    "upsample2",
]


# --------------------------------------------------------------------------------------------------------
# the stage schedule (PyramidFlowMatchEulerDiscreteScheduler.init_sigmas_for_each_stage)


def corrected_start_sigma(original: float, gamma: float) -> float:
    """Start sigma of a stage after the jump from the coarser one (Pyramid Flow eq. 14; SEED_FACTS.md):
    ``s = 1 - original; c = s / (sqrt(1 + 1/gamma) (1 - s) + s); start = 1 - c``.

    The upsampled previous endpoint plus renoising carries less signal than the original path at that sigma;
    the corrected start is where the stage's path actually begins."""
    s = 1.0 - original
    c = s / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - s) + s)
    return 1.0 - c


def jump_coefficients(original_start: float, gamma: float) -> tuple[float, float]:
    """(a, b) of the sampling jump into a stage whose original start sigma is ``original_start``
    (Pyramid Flow eq. 15; upstream ``generate_one_unit``): ``x = a * up(x) + b * block_noise`` with
    ``s0 = 1 - original_start``, ``a = 1 / (sqrt(1 + 1/gamma) (1 - s0) + s0)``, ``b = a (1 - s0) / sqrt(gamma)``."""
    s0 = 1.0 - original_start
    a = 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - s0) + s0)
    return a, a * (1.0 - s0) / math.sqrt(gamma)


@dataclass(frozen=True)
class PyramidSchedule:
    """Per-stage sigmas and timestep slices. All tuples have one entry per stage (coarsest first)."""

    start_sigmas: tuple[float, ...]
    """Start sigma of each stage (stage > 0: corrected, ``corrected_start_sigma``)."""
    end_sigmas: tuple[float, ...]
    """End sigma of each stage (the last stage ends at 0)."""
    original_start_sigmas: tuple[float, ...]
    """Start sigma before the correction (the jump coefficients use it)."""
    timestep_ranges: tuple[tuple[float, float], ...]
    """(first, last) model timestep of each stage's slice of the 1000..1 grid."""
    gamma: float
    num_train_timesteps: int

    @property
    def stages(self) -> int:
        return len(self.start_sigmas)


def base_sigmas(num_train_timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """The global grid: sigmas ``n/N`` for n = N..1 (descending), shifted as SD3 ``s t / (1 + (s - 1) t)``;
    float32 ``(N,)``. Upstream ``init_sigmas``."""
    t = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32)
    sigmas = t / num_train_timesteps
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def pyramid_schedule(
    stages: int = 3,
    stage_range: Sequence[float] = (0.0, 1 / 3, 2 / 3, 1.0),
    gamma: float = 1 / 3,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
) -> PyramidSchedule:
    """Stage sigmas and timestep slices of Pyramid Flow's scheduler (SEED_FACTS.md): stage k spans
    ``stage_range[k]..stage_range[k+1]`` of the global grid; its start sigma is corrected for k > 0; each stage
    owns a slice of the timestep grid proportional to its sigma span. Defaults give start sigmas
    1.0 / 0.80024 / 0.50075, end sigmas 0.667 / 0.334 / 0.0 and timesteps 1000->744, 744->386, 386->1."""
    if len(stage_range) != stages + 1:
        raise FrameloomError(f"pyramid stage_range needs {stages + 1} boundaries, got {list(stage_range)}")
    n = num_train_timesteps
    sigmas = base_sigmas(n, shift)
    timesteps = sigmas * n
    starts, ends, originals, spans = [], [], [], []
    for k in range(stages):
        i0 = max(int(stage_range[k] * n), 0)
        i1 = min(int(stage_range[k + 1] * n), n)
        start = float(sigmas[i0])
        end = float(sigmas[i1]) if i1 < n else 0.0
        originals.append(start)
        if k > 0:
            start = corrected_start_sigma(start, gamma)
        starts.append(start)
        ends.append(end)
        spans.append(start - end)
    total = sum(spans)
    ranges = []
    for k in range(stages):
        r0 = 0.0 if k == 0 else sum(spans[:k]) / total
        r1 = 1.0 if k == stages - 1 else sum(spans[: k + 1]) / total
        ranges.append((float(timesteps[int(r0 * n)]), float(timesteps[min(int(r1 * n), n - 1)])))
    return PyramidSchedule(tuple(starts), tuple(ends), tuple(originals), tuple(ranges), gamma, n)


def stage_timesteps(schedule: PyramidSchedule, stage: int, num: int | None = None) -> torch.Tensor:
    """The model timesteps of one stage, float64 ``(num,)``: training (``num=None``) uses the N-point grid
    ``linspace(first, last, N + 1)[:-1]``; sampling with ``num`` steps uses ``linspace(first', last', num)``
    over that grid's ends (upstream ``set_timesteps``)."""
    first, last = schedule.timestep_ranges[stage]
    grid = torch.linspace(first, last, schedule.num_train_timesteps + 1, dtype=torch.float64)[:-1]
    if num is None:
        return grid
    return torch.linspace(float(grid[0]), float(grid[-1]), num, dtype=torch.float64)


def stage_ratios(schedule: PyramidSchedule, num: int | None = None) -> torch.Tensor:
    """Local ratios r (1 = stage start, 0 = stage end), float64: training grid ``linspace(1, 0, N + 1)[:-1]``
    (``(N,)``), or for sampling with ``num`` steps ``linspace(1, 1/N, num)`` followed by 0 (``(num + 1,)``)."""
    grid = torch.linspace(1.0, 0.0, schedule.num_train_timesteps + 1, dtype=torch.float64)[:-1]
    if num is None:
        return grid
    ratios = torch.linspace(float(grid[0]), float(grid[-1]), num, dtype=torch.float64)
    return torch.cat([ratios, ratios.new_zeros(1)])


# --------------------------------------------------------------------------------------------------------
# pyramids and the renoising jump


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame of ``(B, C, T, H, W)``."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (B*T, C, h', w')
    return y.reshape(b, t, c, *y.shape[-2:]).permute(0, 2, 1, 3, 4)


def downsample2(x: torch.Tensor) -> torch.Tensor:
    """Bilinear 2x downsampling of every frame (align_corners=False: the mean of each 2x2 block)."""
    return _per_frame(
        lambda f: F.interpolate(f, size=(f.shape[-2] // 2, f.shape[-1] // 2), mode="bilinear"), x
    )


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling of every frame (the jump between stages)."""
    return _per_frame(lambda f: F.interpolate(f, size=(f.shape[-2] * 2, f.shape[-1] * 2), mode="nearest"), x)


def latent_pyramid(x: torch.Tensor, stages: int) -> list[torch.Tensor]:
    """Clean pyramid, coarsest first: ``[down^(K-1)(x), ..., down(x), x]`` (bilinear 2x per stage)."""
    out = [x]
    for _ in range(stages - 1):
        out.append(downsample2(out[-1]))
    return out[::-1]


def noise_pyramid(noise: torch.Tensor, stages: int) -> list[torch.Tensor]:
    """Noise pyramid, coarsest first: each level is ``2 * bilinear_down2`` of the finer one, which keeps unit
    variance (the mean of 4 independent unit normals has variance 1/4)."""
    out = [noise]
    for _ in range(stages - 1):
        out.append(downsample2(out[-1]) * 2)
    return out[::-1]


def block_noise(
    shape: Sequence[int], gamma: float, generator: torch.Generator | None = None, dtype=torch.float32
) -> torch.Tensor:
    """Gaussian noise correlated inside each 2x2 spatial block with covariance ``(1 + gamma) I - gamma 11^T``
    (Pyramid Flow sec. 3.2; upstream ``sample_block_noise``), shape ``(B, C, T, H, W)`` with even H, W.

    With ``z`` i.i.d. and ``m`` the mean of a block's 4 values, ``sqrt(1 + gamma) (z - m) + sqrt(1 - 3 gamma) m``
    has exactly that covariance (the matrix is ``(1 + gamma)`` on the zero-mean subspace and ``1 - 3 gamma`` along
    the all-ones direction), so no Cholesky of the singular gamma = 1/3 matrix is needed."""
    b, c, t, h, w = shape
    if h % 2 or w % 2:
        raise FrameloomError(f"block noise needs an even latent height and width, got {h}x{w}")
    device = generator.device if generator is not None else "cpu"
    z = torch.randn((b, c, t, h // 2, 2, w // 2, 2), generator=generator, device=device, dtype=torch.float32)
    m = z.mean(dim=(-3, -1), keepdim=True)
    noise = math.sqrt(1 + gamma) * (z - m) + math.sqrt(max(1 - 3 * gamma, 0.0)) * m
    return noise.reshape(b, c, t, h, w).to(dtype)


# --------------------------------------------------------------------------------------------------------
# stage mix and the temporal-pyramid layout


def column_stages(ratios: Sequence[int]) -> list[int]:
    """The stage of each column of a batch: ``[1, 2, 1] -> [0, 1, 1, 2]``."""
    return [k for k, r in enumerate(ratios) for _ in range(int(r))]


def stage_assignment(batch_size: int, ratios: Sequence[int] = (1, 2, 1)) -> list[int]:
    """The stage of every sample of a batch, by position (upstream ``index::column_size``): sample i is in
    column ``i % sum(ratios)``. A batch of 4 with the 1:2:1 mix gets stages 0, 1, 1, 2."""
    cols = column_stages(ratios)
    if batch_size % len(cols):
        raise FrameloomError(
            f"train.batch_size={batch_size} must be a multiple of {len(cols)} (pyramid stage ratios "
            f"{list(ratios)}: each batch holds the stages in that proportion)"
        )
    return [cols[i % len(cols)] for i in range(batch_size)]


def ar_turn(call_index: int, max_units: int, group: int) -> int:
    """Which turn of the AR position rotation a micro-step trains: ``call_index % (max_units // group)``.

    ``call_index`` counts micro-steps (step * grad_accum + micro). Upstream counts calls from 1 in a
    per-process attribute (``accumulate_steps``); frameloom's count is a pure function of the step, so a
    resumed or re-sharded run trains the same positions."""
    turns = max_units // group
    if turns < 1:
        raise FrameloomError(f"parallel.video_sync_group={group} is larger than the {max_units} latent units")
    return call_index % turns


def sample_stage_length(
    max_units_in_training: int, sync_rank: int, group: int, turn: int, max_units: int | None = None
) -> list[int]:
    """Units per stage ``[low, mid, high]`` for one rank (upstream ``sample_stage_length``):
    ``high = (sync_rank + 1) + turn * group`` (the AR position this rank trains), ``mid = low =
    1 + max_units_in_training - high`` (so every rank of the group processes about the same number of tokens);
    each clamped to ``max_units`` (the clip's own unit count) when given."""
    high = max((sync_rank % group + 1) + turn * group, 1)
    mid = max(1 + max_units_in_training - high, 1)
    out = [mid, mid, high]
    if max_units is not None:
        out = [min(u, max_units) for u in out]
    return out


def ar_history(past: list[torch.Tensor], stage: int, frame_per_unit: int) -> list[torch.Tensor]:
    """The history clips of a unit trained (or generated) at ``stage``, oldest first (upstream
    ``add_pyramid_noise_with_temporal_pyramid`` and ``generate``): the unit just before it at the stage's own
    resolution, each older unit one stage coarser, and everything older at stage 0 (one clip).
    ``past[k]`` is clean pyramid level k of all the units before it, ``(B, C, F, h_k, w_k)`` (the first unit is
    one frame, the others ``frame_per_unit``); no past frames give no history."""
    f, frames = frame_per_unit, past[0].shape[2]
    if frames == 0:
        return []
    units = 1 + (frames - 1) // f
    history = [past[stage][:, :, max(frames - f, 0) :]]  # the previous unit, newest first while building
    count, level = 1, stage
    while count < units:
        level = max(level - 1, 0)
        if level == 0:
            break
        count += 1
        history.append(past[level][:, :, frames - count * f : frames - (count - 1) * f])
    if level == 0 and count < units:
        history.append(past[0][:, :, : frames - count * f])  # every older unit at stage 0
    return history[::-1]


def check_ar_frames(num_latent_frames: int, frame_per_unit: int, group: int) -> int:
    """The AR rules of a clip length, as config errors; returns the unit count ``1 + (T - 1) // f``.
    Upstream requires ``NUM_FRAMES % video_sync_group == 0``: every rank of a group must have a position."""
    if frame_per_unit < 1:
        raise FrameloomError(f"objective.pyramid.frame_per_unit must be >= 1, got {frame_per_unit}")
    if num_latent_frames < 1 or (num_latent_frames - 1) % frame_per_unit:
        raise FrameloomError(
            f"{num_latent_frames} latent frames do not split into 1 + n units of "
            f"objective.pyramid.frame_per_unit={frame_per_unit} frames"
        )
    units = 1 + (num_latent_frames - 1) // frame_per_unit
    if units < group:
        raise FrameloomError(f"parallel.video_sync_group={group} is larger than the {units} latent units")
    if group > 1 and units % group:
        raise FrameloomError(
            f"parallel.video_sync_group={group} does not divide the {units} latent units per clip "
            f"({num_latent_frames} latent frames; Pyramid Flow needs NUM_FRAMES % VIDEO_SYNC_GROUP == 0)"
        )
    return units


# --------------------------------------------------------------------------------------------------------
# options


@dataclass
class PyramidOptions:
    """``objective.pyramid``: Pyramid Flow's training knobs (defaults = the released recipe)."""

    stage_ratios: list[int] = field(default_factory=lambda: [1, 2, 1])
    """Stage mix by batch position (coarsest first); the batch size must be a multiple of their sum."""
    stage_range: list[float] = field(default_factory=lambda: [0.0, 1 / 3, 2 / 3, 1.0])
    """Boundaries of the stages on the global sigma grid."""
    gamma: float = 1 / 3
    """Block-noise correlation (and the start-sigma correction)."""
    shift: float = 1.0
    """Timestep shift of the global grid (upstream --schedule_shift)."""
    frame_per_unit: int = 1
    """AR: latent frames per unit (the first unit is always the first frame)."""
    corrupt_ratio: float = 1 / 3
    """AR: history units are corrupted with sigma ~ U(0, corrupt_ratio)."""
    max_latent_frames: int | None = None
    """AR: the clip length in latent frames the position rotation is laid out for (upstream --max_frames);
    None: from data.num_frames and the VAE's 8x temporal compression."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PyramidOptions:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise FrameloomError(
                f"unknown objective.pyramid key(s) {unknown}; valid: {', '.join(sorted(names))}"
            )
        opts = cls(**values)
        if len(opts.stage_ratios) != len(opts.stage_range) - 1 or min(opts.stage_ratios) < 1:
            raise FrameloomError(
                "objective.pyramid.stage_ratios needs one positive count per stage "
                f"(stage_range has {len(opts.stage_range) - 1} stages), got {opts.stage_ratios}"
            )
        if not 0 < opts.gamma <= 1 / 3 + 1e-9:
            raise FrameloomError(f"objective.pyramid.gamma must be in (0, 1/3], got {opts.gamma}")
        if not 0 <= opts.corrupt_ratio < 1:
            raise FrameloomError(
                f"objective.pyramid.corrupt_ratio must be in [0, 1), got {opts.corrupt_ratio}"
            )
        return opts

    def schedule(self) -> PyramidSchedule:
        return pyramid_schedule(len(self.stage_ratios), self.stage_range, self.gamma, 1000, self.shift)


# --------------------------------------------------------------------------------------------------------
# the objectives


def _draw_indices(n: int, num_train: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform grid indices ``floor(u * N)`` for u ~ U[0, 1) (upstream ``weighting_scheme='random'``), on the
    generator's device (no host round trip)."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return (u * num_train).long().clamp(0, num_train - 1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).reshape(-1, *[1] * (like.dim() - 1))


def _stage_endpoints(
    schedule: PyramidSchedule, stage: int, clean: list[torch.Tensor], noise: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) of a stage's path for the given samples' clean and noise pyramids (SEED_FACTS.md):
    stage 0 starts at pure noise, stage k > 0 at ``s * noise_k + (1 - s) * up(clean_{k-1})``; the last stage
    ends at the clean latent, the others at ``e * noise_k + (1 - e) * clean_k``."""
    s, e = schedule.start_sigmas[stage], schedule.end_sigmas[stage]
    if stage == 0:
        start = noise[0]
    else:
        start = s * noise[stage] + (1 - s) * upsample2(clean[stage - 1])
    end = clean[stage] if stage == schedule.stages - 1 else e * noise[stage] + (1 - e) * clean[stage]
    return start, end


def pyramid_mse(preds: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Upstream ``calculate_loss``: the mean over samples of each sample's mean squared error (in fp32)."""
    per_sample = [((p.float() - t.float()) ** 2).flatten(1).mean(1) for p, t in zip(preds, targets)]
    return torch.cat(per_sample).mean()


class _PyramidBase:
    """What both objectives share: options, schedule, stage grouping and the per-stage model calls."""

    #: the trainer's check: this objective gives each rank of a video_sync_group its own AR position
    uses_video_sync_group = False

    def __init__(self, options: PyramidOptions | None = None):
        self.options = options or PyramidOptions()
        self.schedule = self.options.schedule()
        self.timesteps = [stage_timesteps(self.schedule, k) for k in range(self.schedule.stages)]
        self.ratios = stage_ratios(self.schedule)
        self._tables: dict = {}

    def _groups(self, batch: int) -> list[torch.Tensor]:
        stages = stage_assignment(batch, self.options.stage_ratios)
        return [
            torch.tensor([i for i, s in enumerate(stages) if s == k]) for k in range(self.schedule.stages)
        ]

    def _times(self, n: int, stage: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(model timesteps, local ratios) ``(n,)`` float32 of n uniform draws on the stage's grid."""
        idx = _draw_indices(n, self.schedule.num_train_timesteps, generator)
        key = (stage, idx.device)
        if key not in self._tables:  # the grids on the generator's device, once
            self._tables[key] = (
                self.timesteps[stage].float().to(idx.device),
                self.ratios.float().to(idx.device),
            )
        times, ratios = self._tables[key]
        return times[idx], ratios[idx]

    def predict(
        self, model: torch.nn.Module, inputs: TrainingInputs, cond: Conditioning
    ) -> list[torch.Tensor]:
        """One model call per stage (its samples share one resolution and sequence length): the stage's noisy
        latents, timesteps, text and extras, and (AR) its history clips."""
        preds = []
        for k, idx in enumerate(inputs.extras["groups"]):
            if len(idx) == 0:
                preds.append(None)
                continue
            dev = cond.emb.device
            sel = idx.to(dev)
            kwargs = {name: v[sel] for name, v in cond.extras.items()}
            history = inputs.extras.get("history")
            if history is not None and history[k]:
                kwargs["history"] = history[k]
            preds.append(model(inputs.x_t[k], inputs.t[k], cond.emb[sel], cond.mask[sel], **kwargs))
        return preds

    def loss(self, pred: list[torch.Tensor], inputs: TrainingInputs) -> torch.Tensor:
        keep = [(p, t) for p, t in zip(pred, inputs.target) if p is not None]
        return pyramid_mse([p for p, _ in keep], [t for _, t in keep])


class PyramidFlow(_PyramidBase):
    """``objective.name: pyramid_flow``: spatial-pyramid flow matching over the whole clip (upstream
    ``add_pyramid_noise``, the ``train_pyramid_flow_without_ar.sh`` recipe). Each sample is trained at the
    stage its batch position gives (1:2:1), from one full-size noise and its pyramid."""

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        b = x0.shape[0]
        k_stages = self.schedule.stages
        groups = self._groups(b)
        _, _, _, h, w = x0.shape
        if h % 2 ** (k_stages - 1) or w % 2 ** (k_stages - 1):
            raise FrameloomError(
                f"pyramid flow needs latent height and width divisible by {2 ** (k_stages - 1)}, got {h}x{w}"
            )
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
        clean, noisy = latent_pyramid(x0, k_stages), noise_pyramid(noise, k_stages)
        xs, ts, targets = [], [], []
        for k, idx in enumerate(groups):
            sel = idx.to(x0.device)
            start, end = _stage_endpoints(self.schedule, k, [c[sel] for c in clean], [n[sel] for n in noisy])
            t, r = self._times(len(idx), k, generator)
            r = _bcast(r, start)
            xs.append(r * start + (1 - r) * end)  # (b_k, C, T, h_k, w_k)
            ts.append(t.to(x0.device))
            targets.append(start - end)
        return TrainingInputs(x0=x0, noise=noise, x_t=xs, t=ts, target=targets, extras={"groups": groups})


class PyramidFlowAR(_PyramidBase):
    """``objective.name: pyramid_flow_ar``: the temporal pyramid (upstream
    ``add_pyramid_noise_with_temporal_pyramid``, the ``train_pyramid_flow.sh`` recipe). For each stage only the
    last unit of a clip prefix is noised and scored; the units before it are the history pyramid (previous
    unit at the stage's resolution, older ones coarser), lightly corrupted. The prefix length of each stage
    comes from ``sample_stage_length``: the ranks of a ``video_sync_group`` (same video) train different AR
    positions, rotating every micro-step."""

    uses_video_sync_group = True

    def __init__(self, options: PyramidOptions | None = None, *, max_units: int, grad_accum: int = 1):
        super().__init__(options)
        self.max_units = int(max_units)
        self.grad_accum = int(grad_accum)

    def units_per_stage(self, ctx: StepContext, clip_units: int) -> list[int]:
        """[low, mid, high] units this rank trains at this micro-step (a pure function of step and rank)."""
        call = ctx.step * self.grad_accum + ctx.micro
        turn = ar_turn(call, self.max_units, ctx.sync_size)
        return sample_stage_length(self.max_units, ctx.sync_rank, ctx.sync_size, turn, clip_units)

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        ctx = ctx or StepContext()
        f = self.options.frame_per_unit
        b, _, t_lat, h, w = x0.shape
        k_stages = self.schedule.stages
        if h % 2 ** (k_stages - 1) or w % 2 ** (k_stages - 1):
            raise FrameloomError(
                f"pyramid flow needs latent height and width divisible by {2 ** (k_stages - 1)}, got {h}x{w}"
            )
        if (t_lat - 1) % f:
            raise FrameloomError(f"{t_lat} latent frames do not split into units of {f} frames")
        clip_units = 1 + (t_lat - 1) // f
        units = self.units_per_stage(ctx, clip_units)
        groups = self._groups(b)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
        clean, noisy = latent_pyramid(x0, k_stages), noise_pyramid(noise, k_stages)
        xs, ts, targets, histories = [], [], [], []
        for k, idx in enumerate(groups):
            sel = idx.to(x0.device)
            n_units = min(units[k], clip_units)
            frames = 1 + (n_units - 1) * f  # the clip prefix this stage trains on
            c_k = [c[sel][:, :, :frames] for c in clean]
            start, end = _stage_endpoints(self.schedule, k, c_k, [n[sel][:, :, :frames] for n in noisy])
            t, r = self._times(len(idx), k, generator)
            r = _bcast(r, start)
            # only the last unit is noised and scored
            xs.append((r * start + (1 - r) * end)[:, :, -f:])  # (b_k, C, f, h_k, w_k)
            targets.append((start - end)[:, :, -f:])
            ts.append(t.to(x0.device))
            # the history, corrupted with one sigma per sample: s * noise + (1 - s) * clean
            sigma = (
                torch.rand(len(idx), generator=generator, device=generator.device)
                * self.options.corrupt_ratio
            )
            hist = []
            past = [c[:, :, : frames - f] for c in c_k] if n_units > 1 else []  # the units before the last
            for clip in ar_history(past, k, f) if past else []:
                z = torch.randn(clip.shape, generator=generator, device=generator.device).to(clip)
                s = _bcast(sigma, clip)
                hist.append(s * z + (1 - s) * clip)
            histories.append(hist)
        extras = {"groups": groups, "history": histories, "units": units}
        return TrainingInputs(x0=x0, noise=noise, x_t=xs, t=ts, target=targets, extras=extras)


class FullResolutionFlow(_PyramidBase):
    """``objective.name: flow`` for this family: plain rectified flow at full resolution with Pyramid Flow's
    timestep scale (t in [0, 1] fed as ``1000 t``), every frame noised. The baseline of
    ``benchmarks/pyramid_vs_flow.py``: same model, same data, no pyramid."""

    def draw(
        self, x0: torch.Tensor, generator: torch.Generator, ctx: StepContext | None = None
    ) -> TrainingInputs:
        b = x0.shape[0]
        r = torch.rand(b, generator=generator, device=generator.device).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device, x0.dtype)
        x_t = _bcast(r, x0) * noise + (1 - _bcast(r, x0)) * x0
        groups = [torch.arange(b)]
        t = r * self.schedule.num_train_timesteps
        return TrainingInputs(
            x0=x0, noise=noise, x_t=[x_t], t=[t], target=[noise - x0], extras={"groups": groups}
        )
