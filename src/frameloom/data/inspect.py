"""`frameloom inspect`: what a manifest holds and, with a config, how its rows fall into buckets.

Counts and histograms of duration, frame rate, resolution (short side) and aspect ratio (h / w), and with a
config the bucket table of its policy for one epoch: samples and whole batches per bucket, and how many rows
are left out and why (the policy's reasons, plus "remainder": rows that do not fill a last batch). Printed
as text and drawn into a PNG (matplotlib's Agg canvas, no display needed). Works from the manifest's columns
only (no decoding), so it is fast on millions of rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from frameloom.data.buckets import REASONS, Columns, build_policy, columns_from_table
from frameloom.data.manifest import read_manifest

# Histogram bin edges (left-closed) and their labels.
DURATION_EDGES = [0, 1, 2, 4, 8, 16, 32, 64, 128, np.inf]
FPS_EDGES = [0.5, 15, 23.5, 24.5, 25.5, 29.5, 30.5, 49.5, 50.5, 59.5, 60.5, np.inf]
SIDE_EDGES = [0, 240, 360, 480, 720, 1080, 1440, 2160, np.inf]
ASPECT_EDGES = [0, 0.5, 0.6, 0.7, 0.8, 0.95, 1.05, 1.3, 1.6, 2.0, np.inf]


@dataclass
class Histogram:
    title: str
    labels: list[str]
    counts: list[int]
    missing: int = 0  # rows without a value (e.g. fps unknown)


@dataclass
class BucketRow:
    name: str
    frames: int
    height: int
    width: int
    batch_size: int
    samples: int
    batches: int


@dataclass
class InspectReport:
    manifest: Path
    rows: int
    videos: int
    images: int
    hours: float
    histograms: list[Histogram]
    policy: str | None = None
    epoch: int = 0
    buckets: list[BucketRow] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    png: Path | None = None

    def text(self) -> str:
        lines = [
            f"manifest: {self.manifest}",
            f"rows: {self.rows} ({self.videos} videos, {self.images} images), {self.hours:.2f} h of video",
        ]
        for h in self.histograms:
            lines.append("")
            lines.append(h.title + (f" ({h.missing} without a value)" if h.missing else ""))
            top = max(h.counts) if h.counts and max(h.counts) else 1
            width = max(len(label) for label in h.labels)
            for label, count in zip(h.labels, h.counts):
                bar = "#" * round(30 * count / top)
                lines.append(f"  {label:>{width}}  {count:>9}  {bar}")
        if self.policy is not None:
            lines.append("")
            kept = sum(b.samples for b in self.buckets)
            batches = sum(b.batches for b in self.buckets)
            lines.append(
                f"bucket policy {self.policy} (epoch {self.epoch}): {len(self.buckets)} bucket(s) in use"
            )
            name_w = max([len("bucket")] + [len(b.name) for b in self.buckets])
            lines.append(
                f"  {'bucket':<{name_w}}  {'frames':>6}  {'height':>6}  {'width':>6}  {'batch':>5}  "
                f"{'samples':>9}  {'batches':>8}"
            )
            for b in self.buckets:
                lines.append(
                    f"  {b.name:<{name_w}}  {b.frames:>6}  {b.height:>6}  {b.width:>6}  {b.batch_size:>5}  "
                    f"{b.samples:>9}  {b.batches:>8}"
                )
            dropped = sum(self.dropped.values())
            lines.append(f"  in buckets: {kept} sample(s), {batches} whole batch(es)")
            why = ", ".join(f"{k} {v}" for k, v in self.dropped.items()) or "none"
            lines.append(f"  left out: {dropped} ({why})")
        if self.png is not None:
            lines.append("")
            lines.append(f"figure: {self.png}")
        return "\n".join(lines)


def _labels(edges: list[float], unit: str = "", fmt: str = "{:g}") -> list[str]:
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        out.append(
            f">= {fmt.format(lo)}{unit}" if np.isinf(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}{unit}"
        )
    return out


def _histogram(title: str, values: np.ndarray, edges: list[float], unit: str = "") -> Histogram:
    finite = np.isfinite(values)
    counts, _ = np.histogram(values[finite], bins=np.asarray(edges, np.float64))
    return Histogram(title, _labels(edges, unit), [int(c) for c in counts], int((~finite).sum()))


def histograms(cols: Columns) -> list[Histogram]:
    """Duration (s, videos), fps (videos), short side (px) and aspect ratio h / w of every row."""
    video = ~cols.is_image
    fps = np.where(np.isfinite(cols.fps) & (cols.fps > 0), cols.fps, np.nan)
    duration = cols.frames / fps
    short = np.minimum(cols.height, cols.width).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(cols.width > 0, cols.height / cols.width, np.nan)
    return [
        _histogram("duration of videos (s)", duration[video], DURATION_EDGES, " s"),
        _histogram("frame rate of videos (fps)", fps[video], FPS_EDGES),
        _histogram("short side (px)", np.where(short > 0, short, np.nan), SIDE_EDGES, " px"),
        _histogram("aspect ratio (height / width)", aspect, ASPECT_EDGES),
    ]


def bucket_table(cfg: Any, cols: Columns, epoch: int = 0) -> tuple[str, list[BucketRow], dict[str, int]]:
    """(policy name, rows per bucket in use, left-out counts by reason) for one epoch of ``cfg``'s policy."""
    policy = build_policy(cfg, cols)
    if policy is None:  # `none`: every row at one shape
        d = cfg.data
        n = len(cols)
        batch = cfg.train.batch_size
        row = BucketRow(
            f"{d.num_frames}x{d.height}x{d.width}", d.num_frames, d.height, d.width, batch, n, n // batch
        )
        return "none", [row], ({"remainder": n % batch} if n % batch else {})
    assignment = policy.assign(epoch)
    table = policy.table
    counts = np.bincount(assignment.bucket[assignment.bucket >= 0], minlength=len(table))
    rows, remainder = [], 0
    for k in np.flatnonzero(counts):
        t, h, w = table.shape(int(k))
        batch = int(table.batch_size[k])
        rows.append(BucketRow(table.names[k], t, h, w, batch, int(counts[k]), int(counts[k]) // batch))
        remainder += int(counts[k]) % batch
    dropped = assignment.reason_counts()
    if remainder:
        dropped["remainder"] = remainder
    return policy.name, rows, dropped


def draw_figure(report: InspectReport, path: Path) -> Path:
    """Histograms (and the bucket table's samples per bucket, largest 25) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    extra = 1 if report.policy is not None else 0
    fig = Figure(figsize=(13, 8 + 4 * extra))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2 + extra, 2)
    for i, h in enumerate(report.histograms):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        ax.bar(range(len(h.counts)), h.counts, color="tab:blue")
        ax.set_xticks(range(len(h.labels)), h.labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(h.title, fontsize=10)
        ax.set_ylabel("rows")
    if extra:
        ax = fig.add_subplot(grid[2, 0])
        top = sorted(report.buckets, key=lambda b: b.samples, reverse=True)[:25]
        ax.barh([b.name for b in top][::-1], [b.samples for b in top][::-1], color="tab:green")
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(f"samples per bucket ({report.policy}, epoch {report.epoch})", fontsize=10)
        ax = fig.add_subplot(grid[2, 1])
        kept = sum(b.samples for b in report.buckets)
        names = ["in buckets", *report.dropped]
        ax.bar(
            names, [kept, *report.dropped.values()], color=["tab:green"] + ["tab:red"] * len(report.dropped)
        )
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.set_title("rows kept and left out", fontsize=10)
    fig.suptitle(f"{report.manifest.name}: {report.rows} rows")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def default_png(manifest: str | os.PathLike) -> Path:
    """``<manifest folder>/<manifest stem>.inspect.png``."""
    manifest = Path(manifest)
    return manifest.with_name(manifest.stem + ".inspect.png")


def _check_paths(table: Any, manifest: Path, cfg: Any | None) -> None:
    """Refuse a manifest whose paths leave its folder, as ``train`` and ``cache`` do (``manifest.check_paths``;
    the rules of ``cfg``'s ``data.extra_roots``/``data.strict_roots`` when given)."""
    from frameloom.data.manifest import check_paths
    from frameloom.data.paths import PathRules

    rules = PathRules.make(cfg.data.extra_roots, cfg.data.strict_roots) if cfg is not None else PathRules()
    check_paths(table, manifest, rules)


def inspect_manifest(
    manifest: str | os.PathLike,
    cfg: Any | None = None,
    *,
    out: str | os.PathLike | None = None,
    epoch: int = 0,
) -> InspectReport:
    """Build the report (and write its PNG to ``out``, default ``default_png(manifest)``)."""
    manifest = Path(manifest)
    table = read_manifest(manifest)  # every column validated: a bad cell is one line, as train would say
    _check_paths(table, manifest, cfg)
    cols = columns_from_table(table)
    video = ~cols.is_image
    fps = np.where(np.isfinite(cols.fps) & (cols.fps > 0), cols.fps, np.nan)
    seconds = np.nansum((cols.frames / fps)[video]) if video.any() else 0.0
    report = InspectReport(
        manifest=manifest,
        rows=len(cols),
        videos=int(video.sum()),
        images=int(cols.is_image.sum()),
        hours=float(seconds) / 3600,
        histograms=histograms(cols),
    )
    if cfg is not None:
        report.policy, report.buckets, report.dropped = bucket_table(cfg, cols, epoch)
        report.epoch = epoch
    report.png = draw_figure(report, Path(out) if out is not None else default_png(manifest))
    return report


__all__ = ["InspectReport", "inspect_manifest", "bucket_table", "histograms", "default_png", "REASONS"]
