"""The `frameloom` command line: argument parsing and dispatch only (DESIGN.md, "Command line").

Each command's work lives in its own module, imported lazily so `--help` stays instant. Every user error is
a `FrameloomError`, printed as one line with exit status 2; never a bare traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from frameloom.errors import FrameloomError

OVERRIDES_HELP = (
    "config overrides, as key.sub=value or --key.sub value (e.g. train.steps=100 --optim.lr 3e-4); "
    "unknown keys are an error naming the closest valid key"
)


def _cmd_quickstart(args: argparse.Namespace, _: list[str]) -> int:
    from frameloom.quickstart import run_quickstart

    return run_quickstart(args.out, overrides=args.overrides)


def _cmd_prepare(args: argparse.Namespace, _: list[str]) -> int:
    from pathlib import Path

    from frameloom.data.prepare import prepare

    roots = list(args.allow_root or [])
    strict = bool(args.strict_roots)
    if args.config:
        from frameloom.config import load_config

        # data.extra_roots given relative in a config file are taken from the file's folder.
        data = load_config(args.config).data
        roots += [str(Path(args.config).parent / r) for r in data.extra_roots]
        strict = strict or bool(data.strict_roots)
    summary = prepare(
        args.source,
        args.out,
        fmt=args.format,
        workers=args.workers,
        progress=not args.quiet,
        allow_pickle=args.allow_pickle,
        extra_roots=roots,
        trust_metadata=args.trust_metadata,
        strict_roots=strict,
    )
    print(f"{summary.fmt}: {summary.line()}")
    return 0


def _cmd_inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from frameloom.data.inspect import inspect_manifest

    overrides = [*args.overrides, *extra]  # argparse may leave some after the options unparsed
    cfg = None
    if args.config is not None or overrides:
        from frameloom.config import load_config

        cfg = load_config(args.config, overrides)
    print(inspect_manifest(args.manifest, cfg, out=args.out, epoch=args.epoch).text())
    return 0


def _cmd_convert(args: argparse.Namespace, _: list[str]) -> int:
    from frameloom.data.dialects import convert_manifest

    result = convert_manifest(args.manifest, args.to, args.out, memory_efficient=args.memory_efficient)
    print(result.line())
    return 0


def _cmd_cache(args: argparse.Namespace, overrides: list[str]) -> int:
    from frameloom.cache.builder import merge_reports
    from frameloom.config import load_config
    from frameloom.parallel.env import all_gather_objects, destroy_distributed, init_distributed
    from frameloom.pipeline import resolve_device, run_cache

    cfg = load_config(args.config, overrides)
    # under torchrun each process encodes rows rank::world; gloo carries the one gather of the reports
    env = init_distributed(resolve_device(cfg.train.device), backend="gloo")
    try:
        report = run_cache(cfg, progress=env.is_main, shard=(env.rank, env.world_size))
        report = merge_reports(all_gather_objects(report))
    finally:
        destroy_distributed()
    if env.is_main:
        print(report.line())
        if args.pyramid_jsonl:  # Pyramid Flow's own latent/text_fea files and jsonl, from what was cached
            from frameloom.models.pyramid_flow.files import write_jsonl

            print(write_jsonl(cfg, args.pyramid_jsonl, progress=True))
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    import os

    from frameloom.config import load_config
    from frameloom.parallel.env import destroy_distributed
    from frameloom.train.trainer import train

    try:
        result = train(load_config(args.config, overrides))  # joins torchrun's process group, if any
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.line())
    return 0


def _cmd_sample(args: argparse.Namespace, overrides: list[str]) -> int:
    import os
    from pathlib import Path

    from frameloom.parallel.env import destroy_distributed
    from frameloom.sampling.generate import sample_command

    if args.prompt is not None and args.class_labels is not None:
        raise FrameloomError("give either --prompt TEXT... or --class N..., not both")
    if args.prompt is None and args.class_labels is None and args.fid_npz is None:
        raise FrameloomError("give either --prompt TEXT... or --class N...")
    if args.fid_npz is not None and args.fid_npz < 1:
        raise FrameloomError(f"--fid-npz must be a positive sample count, got {args.fid_npz}")
    # a class index is the "caption" of a class-conditional model (its label encoder reads the number)
    prompts = args.prompt if args.prompt is not None else [str(c) for c in args.class_labels or []]
    if args.image is not None:
        if not Path(args.image).is_file():
            raise FrameloomError(f"--image not found: {args.image}")
        overrides = [*overrides, f"sample.image={Path(args.image).resolve()}"]
    try:  # under torchrun each process generates its share of the (prompt, seed) pairs
        paths = sample_command(
            args.source,
            prompts=prompts,
            out=args.out,
            checkpoint=args.checkpoint,
            steps=args.steps,
            guidance=args.guidance,
            seeds=args.seed,
            negative_prompt=args.negative_prompt,
            overrides=overrides,
            fid_npz=args.fid_npz,
        )
    finally:
        destroy_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        for p in paths:
            print(p)
    return 0


def _cmd_export(args: argparse.Namespace, _: list[str]) -> int:
    from frameloom.export import export_run

    paths = export_run(
        args.run_dir,
        fmt=args.format,
        out=args.out,
        checkpoint=args.checkpoint,
        comfyui=args.comfyui,
        kohya=args.kohya,
        dtype=args.dtype,
    )
    for p in paths:
        print(p)
    return 0


def _cmd_verify(args: argparse.Namespace, _: list[str]) -> int:
    from frameloom.checkpoint.integrity import verify_run

    results = verify_run(args.run_dir)
    for result in results:
        print(result.line())
    damaged = sum(not r.ok for r in results)
    print(f"{len(results)} checkpoint(s): {len(results) - damaged} ok, {damaged} damaged")
    return 1 if damaged else 0


def _cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    import os

    from frameloom.config import load_config
    from frameloom.memory.plan import plan_memory

    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise FrameloomError("--gpu-memory must be a positive number of GiB")
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise FrameloomError("--world-size must be >= 1")
    gpu = int(args.gpu_memory * 1024**3) if args.gpu_memory is not None else None
    plan = plan_memory(
        load_config(args.config, overrides), gpu_memory=gpu, world_size=world, device_type=args.device
    )
    print(plan.to_json() if args.json else plan.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="frameloom",
        description="Train and fine-tune text-to-video diffusion transformers on your own videos.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "quickstart",
        help="make a synthetic video set, prepare, cache, train a tiny DiT, sample and score it",
        description="The embedded default: synthetic captioned clips -> prepare -> cache -> train a tiny "
        "text-to-video DiT (CPU or GPU) -> sample held-out prompts -> print color and direction accuracy.",
    )
    p.add_argument("--out", default="runs/quickstart", help="working folder (default: runs/quickstart)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_quickstart)

    p = sub.add_parser(
        "prepare",
        help="probe a folder or seed dataset file into the canonical manifest",
        description="Reads a folder of videos/images with captions (sidecar .txt, captions.csv or "
        "captions.jsonl) or a seed system's dataset files (docs/datasets.md), checks that every path stays "
        "inside its root, probes every file, and writes the manifest plus rejected.csv with one reason per "
        "rejected entry. Probed values replace the metadata a dataset file gives (see --trust-metadata).",
    )
    p.add_argument(
        "source",
        help="a folder of videos; an Open-Sora .csv/.parquet or shard folder; an Open-Sora-Plan data.txt "
        "(or one annotation .json); a CogVideoX data root; a Pyramid Flow .jsonl",
    )
    p.add_argument("--out", required=True, help="manifest to write (.parquet or .csv)")
    p.add_argument(
        "--format",
        default="auto",
        choices=[
            "auto",
            "folder",
            "opensora",
            "opensora-plan",
            "cogvideox",
            "pyramid",
            "imagenet",
            "fastdit",
        ],
        help="source dialect (default: auto-detect from the layout; imagenet = class folders or a "
        "path/label table, fastdit = fast-DiT's .npy features + labels: only by name)",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel probe processes (default: 1)")
    p.add_argument(
        "--allow-root",
        action="append",
        metavar="DIR",
        help="a folder outside the source's root that entries may point into (repeatable); relative paths "
        "leading out of their root, and absolute paths outside the root of a format that defines one "
        "(folder, Open-Sora-Plan DATA_ROOT, CogVideoX root), are rejected as outside_root",
    )
    p.add_argument(
        "--strict-roots",
        action="store_true",
        help="absolute paths must lie under the source's root (or an --allow-root) in every format, also "
        "in Open-Sora tables and Pyramid Flow jsonl, whose absolute paths are accepted by default",
    )
    p.add_argument("--config", help="config whose data.extra_roots (and data.strict_roots) apply as well")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read Open-Sora-Plan pickle annotations; loading a pickle can run arbitrary code, so only for "
        "files you trust",
    )
    p.add_argument(
        "--trust-metadata",
        action="store_true",
        help="do not probe entries whose dataset file gives num_frames, height, width and fps (as the seeds "
        "do; fast for large, already-measured sets; values that cannot be right are rejected as "
        "bad_metadata); default: probe every file, the file is the truth",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser(
        "inspect",
        help="histograms and bucket table of a manifest",
        description="Counts and histograms of duration, fps, resolution and aspect ratio; with a config (or "
        "overrides such as data.bucket=opensora), the bucket table of its policy for one epoch: samples and "
        "batches per bucket and rows left out with their reasons. Printed, and drawn into a PNG.",
    )
    p.add_argument("manifest", help="manifest file (.parquet or .csv)")
    p.add_argument("--config", help="YAML config whose bucket policy (data.bucket) to apply")
    p.add_argument("--out", help="PNG to write (default: MANIFEST_STEM.inspect.png beside the manifest)")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose bucket decisions to show (default: 0)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_inspect, takes_overrides=True)

    p = sub.add_parser(
        "convert",
        help="write a manifest in a seed system's dialect",
        description="Writes the manifest's rows in a dataset format (docs/datasets.md); paths are written "
        "relative to the output's root when the media lie under it, else absolute.",
    )
    p.add_argument("manifest", help="manifest file (.parquet or .csv)")
    p.add_argument(
        "--to",
        required=True,
        choices=["folder", "opensora", "opensora-plan", "cogvideox", "pyramid", "imagenet"],
        help="target dialect",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output: opensora a .csv/.parquet file; opensora-plan a data.txt (its annotation .json goes "
        "beside it); cogvideox and folder a folder; pyramid a .jsonl",
    )
    p.add_argument(
        "--memory-efficient",
        action="store_true",
        help="opensora: also write Open-Sora's memory-efficient shard folder X/ beside X.parquet "
        "(read by Open-Sora with --dataset.memory_efficient True)",
    )
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "cache",
        help="encode latents and text embeddings into the content-keyed store",
        description="Encodes every manifest row's clip and caption once; re-running reuses what is there "
        "and encodes only new or changed entries (resumable after a kill).",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument(
        "--pyramid-jsonl",
        default=None,
        metavar="PATH",
        help="model.family pyramid_flow: also write Pyramid Flow's latent/text_fea files and their jsonl at PATH",
    )
    p.set_defaults(func=_cmd_cache, takes_overrides=True)

    p = sub.add_parser(
        "train",
        help="train (torchrun -m frameloom train ... for many processes)",
        description="Trains the configured model. Writes run_dir/config.resolved.yaml, metrics.jsonl, "
        "tensorboard/, checkpoints/step-NNNNNNNN/ and samples/. checkpoint.resume=latest continues a run.",
    )
    p.add_argument("config", help="YAML config")
    p.set_defaults(func=_cmd_train, takes_overrides=True)

    p = sub.add_parser(
        "plan",
        help="memory estimate per process for the config's model, buckets and parallel layout",
        description="Builds the model from its configs on the meta device (no weights are read) and traces "
        "one training step per bucket: weights, gradients, optimizer and EMA per process for the parallel "
        "layout (FSDP/DDP, CPU offload, block swapping), activations per bucket, the total, whether it fits "
        "the GPU and the largest batch that does. See src/frameloom/memory/plan.py for what is counted.",
    )
    p.add_argument("config", help="YAML config")
    p.add_argument(
        "--gpu-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="GPU memory per process in GiB (default: this machine's GPU, if any)",
    )
    p.add_argument(
        "--world-size", type=int, default=None, help="processes of the run (default: WORLD_SIZE or 1)"
    )
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="where the run trains: cuda (default; train.mixed_precision auto means bf16) or cpu",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_plan, takes_overrides=True)

    p = sub.add_parser(
        "sample",
        help="generate mp4s from a run or config",
        description="Generates one H.264 mp4 per prompt and seed (a PNG for image models: data.num_frames 1), "
        "from the EMA weights by default; --fid-npz N writes an FID sample batch instead.",
    )
    p.add_argument("source", help="a run directory or a YAML config")
    p.add_argument("--prompt", nargs="+", default=None, help="one or more prompts")
    p.add_argument(
        "--class",
        dest="class_labels",
        type=int,
        nargs="+",
        default=None,
        help="class-conditional models (model.family dit_class): one or more class indices instead of prompts",
    )
    p.add_argument(
        "--image",
        default=None,
        help="image-to-video: the first frame (PNG/JPEG), for families with image conditioning "
        "(sets sample.image)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", default="latest", help="checkpoint folder or 'latest' (default)")
    p.add_argument(
        "--fid-npz",
        type=int,
        default=None,
        metavar="N",
        help="write N samples as OUT/samples_N.npz (arr_0 uint8 NHWC, what FID tools read) instead of files; "
        "sample i uses class/prompt i mod K (default: every class in turn) and seed sample.seed + i",
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config sample.steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: sample.guidance)")
    p.add_argument(
        "--seed", type=int, nargs="+", default=None, help="one or more seeds (default: sample.seed)"
    )
    p.add_argument(
        "--negative-prompt", default=None, help="negative prompt (default: sample.negative_prompt)"
    )
    p.set_defaults(func=_cmd_sample, takes_overrides=True)

    p = sub.add_parser(
        "export",
        help="write weights other tools load",
        description="Writes a run's trained weights (EMA when present and sample.use_ema) and verifies them by "
        "loading them back: lora = pytorch_lora_weights.safetensors for the family pipeline's "
        "load_lora_weights; diffusers = a complete diffusers directory (a LoRA merged in); safetensors = one "
        "consolidated model.safetensors; native = the seed system's own layout (Open-Sora-Plan). See "
        "docs/families.md.",
    )
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--checkpoint", default="latest", help="checkpoint folder or 'latest' (default)")
    p.add_argument(
        "--format",
        required=True,
        choices=["diffusers", "lora", "safetensors", "native"],
        help="lora (diffusers LoRA file), diffusers (pipeline directory), safetensors (one weights file) or "
        "native (the seed system's released layout: Open-Sora-Plan's model folder, Open-Sora 2.0's "
        "Open_Sora_v2.safetensors, Pyramid Flow's diffusion_transformer folder, dit_class: DiT's .pt)",
    )
    p.add_argument(
        "--comfyui",
        action="store_true",
        help="with --format lora: also write lora_comfyui.safetensors with the module names of ComfyUI's own "
        "model (diffusion_model.<name>.lora_down/lora_up/alpha)",
    )
    p.add_argument(
        "--kohya",
        action="store_true",
        help="with --format lora: also write lora_kohya.safetensors (lora_unet_<name with _> keys, as "
        "musubi-tuner and sd-scripts write them; ComfyUI loads it too)",
    )
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=["bf16", "fp32"],
        help="precision of the LoRA files (default: bf16; fp32 keeps the trained values exactly)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "verify",
        help="check every checkpoint's files against their checksums",
        description="Recomputes the checksum of every file of every checkpoints/step-* folder of a run and "
        "compares it with the one recorded in its meta.json; prints one line per checkpoint naming each "
        "missing, truncated, altered or unlisted file. Exit status 0 when all are intact, 1 when any is "
        "damaged, 2 when RUN_DIR has no checkpoints.",
    )
    p.add_argument("run_dir", help="run directory")
    p.set_defaults(func=_cmd_verify)
    return parser


def _version() -> str:
    from frameloom import __version__

    return f"frameloom {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args, extra) or 0)
    except FrameloomError as exc:
        print(f"frameloom {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frameloom {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
