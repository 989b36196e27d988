"""The Open-Sora-Plan preset end to end, shrunk by overrides: an Open-Sora-Plan ``data.txt`` dataset is prepared,
cached (tiny WF-VAE, tiny mT5), trained for a few steps from a "released" DiT folder (tiny, random), sampled to an
mp4 with EulerAncestral, and exported in the released layout, which loads back (frameloom and, outside the
repository, upstream's ``OpenSoraT2V_v1_3.from_pretrained``: docs/opensora_plan.md)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import torch

from frameloom.cli import main
from frameloom.data import synthetic
from frameloom.data.prepare import prepare
from frameloom.models.opensora_plan.family import load_denoiser
from frameloom.models.opensora_plan.released import DIT_CLASS, released_dit_shapes, write_folder
from frameloom.models.text import BYT5_VOCAB_SIZE, T5TextEncoder
from test_opensora_plan_wfvae import write_tiny_vae

PRESET = Path(__file__).resolve().parents[1] / "configs" / "opensora_plan_v1_3_93x480p.yaml"
DIT = dict(
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=8,
    out_channels=8,
    num_layers=4,
    cross_attention_dim=24,
    caption_channels=32,
    patch_size=2,
    patch_size_t=1,
    sparse1d=True,
    sparse_n=4,
)


def write_tiny_mt5(folder: Path) -> Path:
    """A random 2-layer MT5 encoder (d_model 32) with a ByT5 byte tokenizer (no vocabulary file)."""
    from transformers import ByT5Tokenizer, MT5Config, MT5EncoderModel

    config = MT5Config(vocab_size=BYT5_VOCAB_SIZE, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                       relative_attention_num_buckets=8, dropout_rate=0.0, is_encoder_decoder=False)  # fmt: skip
    torch.manual_seed(0)
    MT5EncoderModel(config).save_pretrained(folder)
    ByT5Tokenizer(extra_ids=BYT5_VOCAB_SIZE - 259).save_pretrained(folder)
    return folder


def write_opensora_plan_dataset(root: Path) -> Path:
    """8 synthetic clips (40 frames at 16 fps, 32 x 32) described by an Open-Sora-Plan data.txt + JSON."""
    synthetic.write_synthetic_set(
        root, num_clips=8, seed=0, height=32, width=32, num_frames=40, fps=16, progress=False
    )
    rows = [line.split(",", 1) for line in (root / "captions.csv").read_text().splitlines()[1:]]
    records = [
        {
            "path": path,
            "cap": [text.split(",")[0]],
            "resolution": {"height": 32, "width": 32},
            "num_frames": 40,
            "fps": 16,
        }
        for path, text in rows
    ]
    (root / "anno.json").write_text(json.dumps(records))
    (root / "data.txt").write_text(f"{root},{root / 'anno.json'}\n")
    return root / "data.txt"


def test_mt5_loads_by_model_type(tmp_path):
    """model_type "mt5" -> MT5EncoderModel (Open-Sora-Plan's mT5-XXL), with the usual masked encoding."""
    encoder = T5TextEncoder.from_pretrained(write_tiny_mt5(tmp_path / "mt5"), max_length=512)
    assert type(encoder.model).__name__ == "MT5EncoderModel" and encoder.dim == 32
    emb, mask = encoder.encode(["a cat", "a much longer caption"])
    assert emb.shape[:2] == mask.shape and mask.sum(1).tolist() == [6, 22]  # bytes + EOS
    assert emb[0, 6:].abs().max() == 0


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("osp_e2e")
    g = torch.Generator().manual_seed(0)
    dit = write_folder(root / "any93x640x640", DIT_CLASS, DIT,
                       {k: torch.randn(s, generator=g) * 0.1 for k, s in released_dit_shapes(DIT).items()})  # fmt: skip
    summary = prepare(write_opensora_plan_dataset(root / "data"), root / "manifest.parquet", progress=False)
    assert summary.fmt == "opensora-plan" and summary.kept == 8
    overrides = [
        f"model.pretrained={dit}",
        f"model.codec={write_tiny_vae(root / 'vae')}",
        f"model.text_encoder={write_tiny_mt5(root / 'mt5')}",
        "model.text_max_length=16",
        "model.encoder_dtype=float32",
        f"data.manifest={root / 'manifest.parquet'}",
        f"run_dir={root / 'run'}",
        "data.num_frames=29",  # the shortest valid Open-Sora-Plan length
        "data.height=32",
        "data.width=32",
        "data.max_height=32",
        "data.max_width=32",
        "data.megabatch=1",
        "data.num_workers=0",
        "parallel.sp_size=1",
        "parallel.data_parallel=ddp",
        "train.steps=3",
        "train.batch_size=2",
        "train.mixed_precision='no'",
        "train.progress=false",
        "logging.tensorboard=false",
        "optim.lr=1e-3",
        "checkpoint.every=3",
        "sample.steps=3",
    ]
    return {"root": root, "overrides": overrides}


@pytest.mark.slow
def test_preset_trains_samples_and_exports(setup):
    root, overrides = setup["root"], setup["overrides"]
    assert main(["cache", str(PRESET), *overrides]) == 0
    assert main(["train", str(PRESET), *overrides]) == 0
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(
        torch.isfinite(torch.tensor(m["loss"])) for m in metrics
    )
    # the text encoder of the run was mT5
    assert type(T5TextEncoder.from_pretrained(root / "mt5").model).__name__ == "MT5EncoderModel"
    # sample: EulerAncestral, guidance 7.5, 29 frames of 32 x 32
    assert main(["sample", str(root / "run"), "--prompt", "a red square moving left", "--seed", "3",
                 "--out", str(root / "samples")]) == 0  # fmt: skip
    (mp4,) = sorted((root / "samples").glob("*.mp4"))
    with av.open(str(mp4)) as f:
        stream = f.streams.video[0]
        frames = sum(1 for _ in f.decode(stream))
        assert (frames, stream.height, stream.width) == (29, 32, 32)
    # export in the released layout; it loads strictly and holds the EMA weights
    assert main(["export", str(root / "run"), "--format", "native", "--out", str(root / "export")]) == 0
    config = json.loads((root / "export" / "config.json").read_text())
    assert config["_class_name"] == DIT_CLASS and config["sparse_n"] == 4 and config["caption_channels"] == 32
    from frameloom.checkpoint import io as ckpt

    ema = ckpt.load_checkpoint(ckpt.latest_checkpoint(root / "run"))["ema"]
    exported = load_denoiser(root / "export").state_dict()
    assert set(exported) == set(released_dit_shapes(DIT))
    for k, v in ema.items():
        assert torch.equal(exported[k], v), k
    # and it continues as model.pretrained
    assert main(["train", str(PRESET), *overrides, f"model.pretrained={root / 'export'}", f"run_dir={root / 'run2'}",
                 "train.steps=1"]) == 0  # fmt: skip
