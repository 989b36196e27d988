"""`frameloom quickstart`: the whole path on an embedded default, scored.

1. write a captioned synthetic clip set (training combinations of color x shape x direction only);
2. `prepare` it (probe every file into the manifest);
3. `cache` latents and text embeddings;
4. `train` the tiny DiT of configs/quickstart.yaml;
5. sample the held-out prompts (combinations never seen in training) and score each video with the
   analytic checker: the moving object's dominant color and its direction of motion.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from frameloom.errors import FrameloomError

QUICKSTART_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
NUM_CLIPS = 1024
HELD_OUT = 32
SAMPLE_SEEDS = (0,)


def run_quickstart(
    out: str | Path = "runs/quickstart", *, overrides: Sequence[str] = (), num_clips: int = NUM_CLIPS
) -> int:
    from frameloom.config import load_config
    from frameloom.data import synthetic
    from frameloom.data.prepare import prepare
    from frameloom.pipeline import load_codec, load_text_encoder, resolve_device, run_cache
    from frameloom.sampling.generate import generate_to_files, load_for_sampling
    from frameloom.train.trainer import train

    if not QUICKSTART_CONFIG.exists():
        raise FrameloomError(f"quickstart config missing: {QUICKSTART_CONFIG}")
    out = Path(out)
    start = time.perf_counter()
    cfg = load_config(QUICKSTART_CONFIG, [f"run_dir={out / 'run'}", *overrides])

    # 1-2. Data: synthetic clips of the training combinations, then the normal prepare path.
    train_combos, held_out = synthetic.split_combos(held_out=HELD_OUT, seed=cfg.seed)
    data_dir = out / "data"
    print(f"[1/5] writing {num_clips} synthetic clips to {data_dir}")
    synthetic.write_synthetic_set(
        data_dir,
        num_clips=num_clips,
        seed=cfg.seed,
        height=cfg.data.height,
        width=cfg.data.width,
        num_frames=cfg.data.num_frames,
        fps=cfg.sample.fps,
        combos=train_combos,
        workers=2,
    )
    print("[2/5] prepare")
    summary = prepare(data_dir, data_dir / "prepared.parquet", fmt="folder", workers=2)
    print("      " + summary.line())
    cfg.data.manifest = str(data_dir / "prepared.parquet")

    # 3. Cache.
    print("[3/5] cache")
    print("      " + run_cache(cfg).line())

    # 4. Train.
    print("[4/5] train")
    result = train(cfg)
    print("      " + result.line())

    # 5. Sample held-out prompts and score them.
    print(f"[5/5] sampling {len(held_out)} held-out prompts")
    device = resolve_device(cfg.train.device)
    prompts = [synthetic.caption(*c) for c in held_out]
    codec, text_encoder = load_codec(cfg, device), load_text_encoder(cfg, device)
    model = load_for_sampling(cfg, "latest", device, codec=codec, text_encoder=text_encoder)
    paths = generate_to_files(
        model,
        text_encoder,
        codec,
        cfg,
        prompts,
        out_dir=out / "samples",
        seeds=SAMPLE_SEEDS,
    )
    from frameloom.data.video import ClipSpec, decode_clip  # read back what a user would watch

    spec = ClipSpec(num_frames=cfg.data.num_frames)
    videos = [
        decode_clip({"path": str(p), "num_frames": cfg.data.num_frames, "fps": cfg.sample.fps}, spec)
        for p in paths
    ]
    attrs = [c for c in held_out for _ in SAMPLE_SEEDS]
    scores = synthetic.score_prompts(videos, attrs)
    (out / "scores.json").write_text(json.dumps(scores, indent=1))
    minutes = (time.perf_counter() - start) / 60
    print(
        f"color accuracy {scores['color_accuracy']:.1%}, direction accuracy {scores['direction_accuracy']:.1%} "
        f"on {scores['n']} held-out prompts (chance 1/{len(synthetic.COLORS)} and 1/4); {minutes:.1f} min"
    )
    print(f"videos: {out / 'samples'}   scores: {out / 'scores.json'}   run: {cfg.run_dir}")
    return 0
