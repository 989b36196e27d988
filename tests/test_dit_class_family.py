"""The dit_class family through frameloom's commands: ImageNet-layout data, cache, train (class dropout =
caption dropout to the null class), sample (PNGs, --fid-npz), export (native .pt and diffusers), and the SD-VAE
latents fast-DiT extracts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frameloom.cli import main as cli
from frameloom.config import load_config
from frameloom.data.dialects import read_dialect, write_dialect
from frameloom.data.manifest import read_manifest
from frameloom.data.prepare import prepare
from frameloom.errors import FrameloomError
from frameloom.pipeline import load_codec, run_cache
from frameloom.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.height=8",
    "data.width=8",
    "model.config={input_size: 8, patch_size: 2, hidden_size: 32, depth: 2, num_heads: 2, num_classes: 3, "
    "guidance_channels: all}",
    "train.batch_size=4",
    "train.steps=3",
    "train.progress=false",
    "logging.tensorboard=false",
    "optim.warmup_steps=0",
    "checkpoint.every=3",
    "sample.steps=3",
    "sample.guidance=2.0",
]


def _images(root: Path) -> Path:
    """3 classes x 3 images of 8x8 (class c: a bright band at rows 2c..2c+1), ImageNet layout."""
    for c, name in enumerate(["cat", "dog", "eel"]):
        for i in range(3):
            a = np.zeros((8, 8, 3), np.uint8)
            a[2 * c : 2 * c + 2] = 200 + 20 * i
            path = root / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(path)
    (root / ".hidden").mkdir()
    return root


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("dit_class")
    prepare(_images(base / "images"), base / "manifest.parquet", fmt="imagenet", progress=False)
    return base / "manifest.parquet"


def test_imagenet_dialect_folder_and_table(manifest, tmp_path):
    rows = read_manifest(manifest).to_pylist()
    assert [r["text"] for r in rows] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3  # sorted folders -> labels
    assert [r["class_name"] for r in rows[::3]] == ["cat", "dog", "eel"]
    assert rows[4]["label"] == 1 and rows[4]["is_image"] and rows[4]["num_frames"] == 1
    # the table form: written by convert --to imagenet, read back to the same labels
    written = write_dialect("imagenet", read_manifest(manifest), tmp_path / "out", base=manifest.parent)
    listing = read_dialect("imagenet", written.files[0])
    assert [e.fields["label"] for e in listing.entries] == [r["label"] for r in rows]
    assert (
        Path(listing.entries[0].root, listing.entries[0].path).resolve()
        == (manifest.parent / rows[0]["path"]).resolve()
    )
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label\na.png,x\nb.png,2\n")
    listing = read_dialect("imagenet", bad)
    assert len(listing.entries) == 1 and listing.rejects[0][1] == "bad_entry"
    with pytest.raises(FrameloomError, match="no class folders"):
        read_dialect("imagenet", tmp_path / "out")


def _cfg(manifest: Path, run_dir: Path, *extra: str):
    return load_config(
        ROOT / "configs" / "dit_digits_cpu.yaml",
        [f"data.manifest={manifest}", f"run_dir={run_dir}", *TINY, *extra],
    )


def test_train_sample_export(manifest, tmp_path):
    cfg = _cfg(manifest, tmp_path / "run")
    run_cache(cfg, progress=False)
    trainer = Trainer(cfg)
    assert trainer.cached
    # class dropout is caption dropout: the empty caption's extra is the null class (index num_classes)
    assert trainer.empty_extras["class_labels"].item() == 3
    result = trainer.fit()
    assert result.step == 3 and np.isfinite(result.last_loss)

    # PNGs for an image model, one per class and seed
    assert (
        cli(
            [
                "sample",
                str(tmp_path / "run"),
                "--class",
                "0",
                "2",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    pngs = sorted((tmp_path / "s").glob("*.png"))
    assert [p.name for p in pngs] == ["000-0-seed1.png", "001-2-seed1.png"]
    assert np.asarray(Image.open(pngs[0])).shape == (8, 8, 3)
    # --fid-npz: arr_0 uint8 NHWC, sample i of class i mod K; sample 1 is --class 2 with seed sample.seed + 1
    assert cli(["sample", str(tmp_path / "run"), "--fid-npz", "4", "--out", str(tmp_path / "fid")]) == 0
    arr = np.load(tmp_path / "fid" / "samples_4.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (4, 8, 8, 3)
    assert (
        cli(["sample", str(tmp_path / "run"), "--class", "1", "--seed", "1", "--out", str(tmp_path / "one")])
        == 0
    )
    one = np.asarray(Image.open(tmp_path / "one" / "000-1-seed1.png")).astype(int)
    assert (
        np.abs(one - arr[1].astype(int)).max() <= 1
    )  # same class and seed; PNG rounds, the npz truncates +0.5
    assert cli(["sample", str(tmp_path / "run"), "--class", "7", "--out", str(tmp_path / "x")]) == 2

    # export: the released .pt layout and diffusers, each loading back into the same model
    assert cli(["export", str(tmp_path / "run"), "--format", "native", "--out", str(tmp_path / "pt")]) == 0
    assert cli(["export", str(tmp_path / "run"), "--format", "diffusers", "--out", str(tmp_path / "hf")]) == 0
    from frameloom.checkpoint import io as ckpt
    from frameloom.models.dit_class.family import load_denoiser

    loaded = ckpt.load_checkpoint(ckpt.resolve_checkpoint(cfg.run_dir, "latest"))
    weights = {**loaded["model"], **loaded["ema"]}  # the EMA weights, as export writes them
    released = torch.load(tmp_path / "pt" / "dit.pt", weights_only=True)
    assert all(torch.equal(released[k], v) for k, v in weights.items() if k in released)
    a, b = load_denoiser(tmp_path / "pt" / "dit.pt", {"num_heads": 2}), load_denoiser(tmp_path / "hf")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 900.0]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(a(x, t, class_labels=y), b(x, t, class_labels=y))
    assert (tmp_path / "hf" / "scheduler" / "scheduler_config.json").is_file()
    # the exported .pt samples as the run does (the same EMA weights, class and seed -> the same PNG)
    config = tmp_path / "pretrained.yaml"
    config.write_text(
        f"run_dir: {tmp_path / 'fresh'}\ndata: {{num_frames: 1, height: 8, width: 8}}\nobjective: {{name: iddpm}}\n"
        f"model: {{family: dit_class, codec: pixel, pretrained: {tmp_path / 'pt' / 'dit.pt'}, "
        "config: {num_heads: 2, num_classes: 3, guidance_channels: all}}\nsample: {steps: 3, guidance: 2.0}\n"
    )
    assert cli(["sample", str(config), "--class", "1", "--seed", "1", "--out", str(tmp_path / "pre")]) == 0
    same = np.asarray(Image.open(tmp_path / "pre" / "000-1-seed1.png"))
    assert np.array_equal(same, np.asarray(Image.open(tmp_path / "one" / "000-1-seed1.png")))
    bad = config.read_text().replace("num_classes: 3", "num_classes: 5")
    config.write_text(bad)
    assert cli(["sample", str(config), "--class", "1", "--out", str(tmp_path / "bad")]) == 2  # contradicts


def test_wrong_objective_and_unknown_option(manifest, tmp_path):
    with pytest.raises(FrameloomError, match="objective.name iddpm"):
        Trainer(_cfg(manifest, tmp_path / "r", "objective.name=flow"))
    with pytest.raises(FrameloomError, match="unknown key"):
        Trainer(_cfg(manifest, tmp_path / "r", "model.config.depht=3"))


def test_sd_vae_latents_are_posterior_samples_times_0_18215(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16, scaling_factor=0.18215)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    cfg = load_config(ROOT / "configs" / "dit_digits_cpu.yaml", [f"model.codec={tmp_path / 'vae'}"])
    codec = load_codec(cfg, "cpu")
    video = torch.rand(2, 3, 1, 16, 16) * 2 - 1
    z = codec.encode(video)  # (2, 4, 1, 8, 8)
    # the noise is per image (content-seeded): batch size changes only float rounding of the convolutions
    assert z.shape == (2, 4, 1, 8, 8) and torch.allclose(codec.encode(video[1:]), z[1:], atol=1e-6)
    from frameloom.models.dit_class.codec import content_seed

    with torch.no_grad():
        dist = vae.encode(video[:, :, 0]).latent_dist
    eps = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(content_seed(video[0])))
    assert torch.allclose(z[0, :, 0], (dist.mean[0] + dist.std[0] * eps) * 0.18215, atol=1e-6)
    mode = load_codec(load_config(ROOT / "configs" / "dit_digits_cpu.yaml", [f"model.codec={tmp_path / 'vae'}",
                                                                             "model.config.vae_sample=false"]), "cpu")  # fmt: skip
    assert torch.allclose(mode.encode(video)[:, :, 0], dist.mode() * 0.18215, atol=1e-6)
    assert mode.identity != codec.identity


def test_fastdit_features_become_a_latent_manifest(tmp_path):
    root = tmp_path / "features"
    (root / "imagenet256_features").mkdir(parents=True)
    (root / "imagenet256_labels").mkdir()
    g = np.random.default_rng(0)
    for i, label in enumerate([207, 3, 999]):  # as extract_features.py writes them: (1, 4, h, w) and (1,)
        np.save(
            root / "imagenet256_features" / f"{i}.npy", g.standard_normal((1, 4, 4, 4)).astype(np.float32)
        )
        np.save(root / "imagenet256_labels" / f"{i}.npy", np.array([label]))
    np.save(root / "imagenet256_features" / "7.npy", np.zeros((1, 4, 4, 4), np.float32))  # no label: rejected
    summary = prepare(root, tmp_path / "m.parquet", fmt="fastdit", progress=False)
    assert summary.kept == 3 and summary.rejected == {"bad_entry": 1}
    rows = read_manifest(tmp_path / "m.parquet").to_pylist()
    assert [(r["text"], r["label"]) for r in rows] == [("207", 207), ("3", 3), ("999", 999)]
    assert rows[0]["latent"].endswith("imagenet256_features/0.npy") and (
        rows[0]["height"],
        rows[0]["width"],
    ) == (32, 32)
    assert rows[0]["num_frames"] == 1 and rows[0]["is_image"]


def test_seed_center_crop_and_flip(tmp_path):
    from frameloom.data.video import ClipSpec, decode_clip, draw_int

    g = np.random.default_rng(1)
    pixels = g.integers(0, 256, (48, 64, 3), dtype=np.uint8)  # H 48, W 64
    Image.fromarray(pixels).save(tmp_path / "a.png")
    row = {"path": "a.png", "num_frames": 1, "fps": 1.0}
    spec = ClipSpec(num_frames=1, height=16, width=16, resize="adm")
    got = decode_clip(row, spec, root=tmp_path).permute(1, 2, 3, 0)[0].numpy()  # (16, 16, 3) uint8
    # ADM by hand: 48 >= 32 -> BOX-halve to 32x24; BICUBIC to short side 16: (round(32 * 16/24), 16) = (21, 16);
    # center crop columns (21 - 16) // 2 = 2 ..
    ref = Image.fromarray(pixels).resize((32, 24), Image.BOX).resize((21, 16), Image.BICUBIC)
    assert np.array_equal(got, np.asarray(ref)[:, 2:18])
    assert (
        decode_clip(row, spec, root=tmp_path, output="float")
        .sub(torch.from_numpy(got).permute(2, 0, 1)[:, None] / 127.5 - 1)
        .abs()
        .max()
        < 1e-6
    )
    assert spec.key() != ClipSpec(num_frames=1, height=16, width=16).key()  # cache entries apart
    # flip: drawn per (seed, sample, epoch); the same draw always gives the same clip
    flip = ClipSpec(num_frames=1, height=16, width=16, resize="adm", hflip=True)
    for epoch in range(4):
        draw = (0, 5, epoch)
        out = decode_clip(row, flip, root=tmp_path, draw=draw).permute(1, 2, 3, 0)[0].numpy()
        assert np.array_equal(out, got[:, ::-1] if draw_int(0, 1, *draw, salt="hflip") else got)
    assert {draw_int(0, 1, 0, 5, e, salt="hflip") for e in range(8)} == {0, 1}


def test_diffusers_export_with_a_vae_is_a_working_dit_pipeline(tmp_path):
    from diffusers import AutoencoderKL, DiTPipeline

    from frameloom.models.dit_class.family import export_released, model_kwargs
    from frameloom.models.dit_class.model import ClassDiT

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16, scaling_factor=0.18215)  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    cfg = load_config(
        ROOT / "configs" / "dit_digits_cpu.yaml",
        [f"model.codec={tmp_path / 'vae'}", "model.config.input_size=8"],
    )
    model = ClassDiT(**model_kwargs(cfg.model, 4))
    export_released(cfg, model.state_dict(), tmp_path / "hf", "diffusers")
    pipe = DiTPipeline.from_pretrained(str(tmp_path / "hf"))
    images = pipe(class_labels=[1], num_inference_steps=2, output_type="np", guidance_scale=1.0).images
    assert images.shape == (1, 16, 16, 3)


def test_resume_is_bit_exact(manifest, tmp_path):
    from safetensors.torch import load_file

    def run(name: str, steps: int, resume: bool = False):
        # a constant schedule: a cosine one depends on train.steps, which the split run changes
        extra = [
            f"train.steps={steps}",
            "checkpoint.every=2",
            "checkpoint.keep_last=0",
            "optim.schedule=constant",
        ]
        if resume:
            extra.append("checkpoint.resume=latest")
        Trainer(_cfg(manifest, tmp_path / name, *extra)).fit()

    run("full", 4)
    run("split", 2)
    run("split", 4, resume=True)
    a = load_file(tmp_path / "full" / "checkpoints" / "step-00000004" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
