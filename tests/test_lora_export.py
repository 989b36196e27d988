"""`frameloom export` on CogVideoX runs: the LoRA file loads into the diffusers pipeline with every key in
place, changes its output, and the pipeline then generates what frameloom's own sampler generates; the
ComfyUI key mapping; full fine-tunes as a diffusers directory and as one safetensors file.

Tolerance of the parity check: both sides run the same float32 maths on CPU in a different order (frameloom's
DDIM in closed form vs the scheduler's), so videos agree to 1e-5 in [0, 1] pixel units (measured: 3.6e-7);
the trained LoRA changes the tiny model's video by more than 1e-3 (measured: 2.5e-3).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from families import build_tiny_cogvideox, family_config
from frameloom.checkpoint import io as ckpt
from frameloom.cli import main
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.errors import FrameloomError
from frameloom.export import COMFYUI_FILE, LORA_FILE, export_run, load_run_denoiser
from frameloom.models.cogvideox.sampling import sample_videos
from frameloom.models.lora import get_lora_state_dict, to_comfyui_keys
from frameloom.pipeline import load_codec, load_text_encoder
from frameloom.train.trainer import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    synthetic.write_synthetic_set(
        root / "data", num_clips=4, seed=0, height=16, width=16, num_frames=5, progress=False
    )
    manifest = root / "data" / "manifest.parquet"
    pre = build_tiny_cogvideox(root / "cog15", version="1.5")
    runs = {}
    for name, extra in {
        "lora": ("model.lora.rank=4", "model.lora.alpha=2", "optim.lr=1e-2", "model.id_token=TOK"),
        "full": ("model.lora.rank=0", "train.ema_decay=0.9"),
    }.items():
        cfg = load_config(None, family_config("cogvideox", pre, manifest, root / name, *extra))
        train(cfg)
        runs[name] = root / name
    return root, pre, runs


def _pipeline_video(pipe, prompt: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    frames = pipe(
        prompt,
        num_frames=5,
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=g,
        output_type="pt",
        max_sequence_length=16,
    ).frames
    return frames[0]  # (T, 3, H, W) in [0, 1]


def test_lora_export_loads_in_pipeline_and_matches_frameloom_sampling(setup, tmp_path):
    from diffusers import CogVideoXPipeline

    root, pre, runs = setup
    paths = export_run(runs["lora"], fmt="lora", out=tmp_path / "lora", comfyui=True)
    assert [p.name for p in paths] == [LORA_FILE, COMFYUI_FILE]
    cfg, model, _ = load_run_denoiser(runs["lora"])
    trained = get_lora_state_dict(model.transformer)

    pipe = CogVideoXPipeline.from_pretrained(pre)
    pipe.set_progress_bar_config(disable=True)
    prompt = "TOK a red ball"  # the run's id_token, spelled out for the pipeline
    base = _pipeline_video(pipe, prompt)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_FILE, adapter_name="ft")
    # Every key landed: the pipeline's adapter holds exactly the trained LoRA weights, no more, no less.
    from peft.utils import get_peft_model_state_dict

    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="ft")
    assert set(loaded) == set(trained)
    for key in trained:
        assert torch.equal(loaded[key], trained[key]), key
    # The adapter's scale is alpha / rank = 2 / 4, recovered from the file's metadata.
    assert pipe.transformer.transformer_blocks[0].attn1.to_q.scaling["ft"] == pytest.approx(0.5)
    tuned = _pipeline_video(pipe, prompt)
    assert (tuned - base).abs().max() > 1e-3  # the LoRA changes the output

    # frameloom's own sampler with the run's weights, same seed/steps/guidance, same prompt (id_token added
    # by frameloom's text encoder).
    codec, text_encoder = load_codec(cfg, "cpu"), load_text_encoder(cfg, "cpu")
    ours = sample_videos(model, text_encoder, codec, cfg, ["a red ball"], [0])  # (1, 3, T, H, W) in [-1, 1]
    ours = ((ours[0] + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3)  # (T, 3, H, W) in [0, 1]
    torch.testing.assert_close(ours, tuned, atol=1e-5, rtol=0)


def test_comfyui_key_mapping(setup, tmp_path):
    root, pre, runs = setup
    export_run(runs["lora"], fmt="lora", out=tmp_path / "lora", comfyui=True)
    comfy = load_file(str(tmp_path / "lora" / COMFYUI_FILE))
    diffusers_keys = load_file(str(tmp_path / "lora" / LORA_FILE))
    # 2 layers x 4 target modules x (lora_down, lora_up, alpha)
    assert len(comfy) == 2 * 4 * 3 and len(diffusers_keys) == 2 * 4 * 2
    m = "transformer_blocks.1.attn1.to_out.0"
    assert torch.equal(
        comfy[f"diffusion_model.{m}.lora_down.weight"], diffusers_keys[f"transformer.{m}.lora_A.weight"]
    )
    assert torch.equal(
        comfy[f"diffusion_model.{m}.lora_up.weight"], diffusers_keys[f"transformer.{m}.lora_B.weight"]
    )
    assert comfy[f"diffusion_model.{m}.alpha"].item() == 2.0
    # a family module map renames the module path (Wan's ComfyUI names differ from diffusers')
    renamed = to_comfyui_keys({"a.b.lora_A.weight": torch.zeros(1)}, 8, lambda name: name.replace("a.", "x."))
    assert set(renamed) == {"diffusion_model.x.b.lora_down.weight", "diffusion_model.x.b.alpha"}


def test_full_fine_tune_exports_as_diffusers_and_safetensors(setup, tmp_path):
    from diffusers import CogVideoXPipeline

    root, pre, runs = setup
    export_run(runs["full"], fmt="diffusers", out=tmp_path / "dir")
    pipe = CogVideoXPipeline.from_pretrained(tmp_path / "dir")
    # The exported transformer carries the checkpoint's EMA weights (sample.use_ema is on by default).
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(runs["full"]))
    ema = loaded["ema"]
    assert ema is not None
    state = pipe.transformer.state_dict()
    for key, value in ema.items():
        assert torch.equal(
            state[key.removeprefix("transformer.")], value.to(state[key.removeprefix("transformer.")].dtype)
        ), key
    (path,) = export_run(runs["full"], fmt="safetensors", out=tmp_path / "st")
    single = load_file(str(path))
    assert set(single) == set(state) and all(torch.equal(single[k], state[k]) for k in state)


def test_lora_run_exported_as_diffusers_has_the_lora_merged(setup, tmp_path):
    from diffusers import CogVideoXPipeline

    root, pre, runs = setup
    export_run(runs["lora"], fmt="lora", out=tmp_path / "lora")
    export_run(runs["lora"], fmt="diffusers", out=tmp_path / "merged")
    with_adapter = CogVideoXPipeline.from_pretrained(pre)
    with_adapter.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_FILE)
    merged = CogVideoXPipeline.from_pretrained(tmp_path / "merged")
    for pipe in (with_adapter, merged):
        pipe.set_progress_bar_config(disable=True)
    a, b = _pipeline_video(with_adapter, "TOK a cat"), _pipeline_video(merged, "TOK a cat")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_export_cli_and_errors(setup, tmp_path, capsys):
    root, pre, runs = setup
    assert (
        main(["export", str(runs["lora"]), "--format", "lora", "--comfyui", "--out", str(tmp_path / "l")])
        == 0
    )
    assert (tmp_path / "l" / COMFYUI_FILE).is_file()
    assert main(["export", str(runs["full"]), "--format", "lora", "--out", str(tmp_path / "x")]) == 2
    assert "needs a LoRA run" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "safetensors", "--out", str(tmp_path / "y")]) == 2
    with pytest.raises(FrameloomError, match="--comfyui applies to --format lora only"):
        export_run(runs["full"], fmt="diffusers", out=tmp_path / "z", comfyui=True)
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--comfyui" in capsys.readouterr().out
