"""The `frameloom` command line: argument parsing and dispatch only (DESIGN.md, "Command line").

Each command's work lives in its own module, imported lazily so `--help` stays instant. Every user error is
a `FrameloomError`, printed as one line with exit status 2; never a bare traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from frameloom.errors import FrameloomError, NotImplementedYet

OVERRIDES_HELP = (
    "config overrides, as key.sub=value or --key.sub value (e.g. train.steps=100 --optim.lr 3e-4); "
    "unknown keys are an error naming the closest valid key"
)


def _cmd_quickstart(args: argparse.Namespace, _: list[str]) -> int:
    from frameloom.quickstart import run_quickstart

    return run_quickstart(args.out, overrides=args.overrides)


def _cmd_prepare(args: argparse.Namespace, _: list[str]) -> int:
    from frameloom.data.prepare import prepare

    summary = prepare(args.source, args.out, fmt=args.format, workers=args.workers, progress=not args.quiet)
    print(summary.line())
    return 0


def _cmd_inspect(args: argparse.Namespace, _: list[str]) -> int:
    raise NotImplementedYet(
        "frameloom inspect is not implemented yet (it arrives with the dialects issue, #4)"
    )


def _cmd_convert(args: argparse.Namespace, _: list[str]) -> int:
    raise NotImplementedYet(
        "frameloom convert is not implemented yet (it arrives with the dialects issue, #4)"
    )


def _cmd_cache(args: argparse.Namespace, overrides: list[str]) -> int:
    from frameloom.config import load_config
    from frameloom.pipeline import run_cache

    report = run_cache(load_config(args.config, overrides))
    print(report.line())
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from frameloom.config import load_config
    from frameloom.train.trainer import train

    result = train(load_config(args.config, overrides))
    print(result.line())
    return 0


def _cmd_sample(args: argparse.Namespace, overrides: list[str]) -> int:
    from frameloom.sampling.generate import sample_command

    paths = sample_command(
        args.source,
        prompts=args.prompt,
        out=args.out,
        checkpoint=args.checkpoint,
        steps=args.steps,
        guidance=args.guidance,
        seeds=args.seed,
        negative_prompt=args.negative_prompt,
        overrides=overrides,
    )
    for p in paths:
        print(p)
    return 0


def _cmd_export(args: argparse.Namespace, _: list[str]) -> int:
    raise NotImplementedYet(
        "frameloom export is not implemented yet (it arrives with the scale-out and model-family issues, #5/#6)"
    )


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
        "captions.jsonl), probes every file, and writes the manifest plus rejected.csv with one reason per "
        "rejected file.",
    )
    p.add_argument("source", help="a folder of videos, or a seed dataset file")
    p.add_argument("--out", required=True, help="manifest to write (.parquet or .csv)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "folder", "opensora", "opensora-plan", "cogvideox", "pyramid"],
        help="source dialect (default: auto-detect)",
    )
    p.add_argument("--workers", type=int, default=1, help="parallel probe processes (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("inspect", help="histograms and bucket table of a manifest", description="(issue #4)")
    p.add_argument("manifest", help="manifest file")
    p.add_argument("--config", help="config whose bucket policy to apply")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "convert", help="write a manifest in a seed system's dialect", description="(issue #4)"
    )
    p.add_argument("manifest", help="manifest file")
    p.add_argument("--to", required=True, help="target dialect")
    p.add_argument("--out", required=True, help="output path")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "cache",
        help="encode latents and text embeddings into the content-keyed store",
        description="Encodes every manifest row's clip and caption once; re-running reuses what is there "
        "and encodes only new or changed entries (resumable after a kill).",
    )
    p.add_argument("config", help="YAML config")
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
        "sample",
        help="generate mp4s from a run or config",
        description="Generates one H.264 mp4 per prompt and seed, from the EMA weights by default.",
    )
    p.add_argument("source", help="a run directory or a YAML config")
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", default="latest", help="checkpoint folder or 'latest' (default)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config sample.steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: sample.guidance)")
    p.add_argument(
        "--seed", type=int, nargs="+", default=None, help="one or more seeds (default: sample.seed)"
    )
    p.add_argument(
        "--negative-prompt", default=None, help="negative prompt (default: sample.negative_prompt)"
    )
    p.set_defaults(func=_cmd_sample, takes_overrides=True)

    p = sub.add_parser("export", help="write weights other tools load", description="(issues #5/#6)")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--checkpoint", default="latest", help="checkpoint folder or 'latest'")
    p.add_argument("--format", required=True, choices=["diffusers", "lora", "safetensors"])
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export)
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
