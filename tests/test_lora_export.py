"""`frameloom export` on CogVideoX runs: the LoRA file loads into the diffusers pipeline with every key in
place, changes its output, and the pipeline then generates what frameloom's own sampler generates; the
ComfyUI and kohya key forms against the names of ComfyUI's own CogVideoX and LTX-Video models; bf16 files by
default; full fine-tunes as a diffusers directory and as one safetensors file.

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
from frameloom.export import COMFYUI_FILE, KOHYA_FILE, LORA_FILE, export_run, load_run_denoiser
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
    paths = export_run(runs["lora"], fmt="lora", out=tmp_path / "lora", comfyui=True, dtype="fp32")
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


# The Linear/Conv weights of ComfyUI's own models, as their model files name them (module attribute paths):
# comfy/ldm/cogvideo/model.py (ComfyUI @955ce480): CogVideoXTransformer3DModel.__init__ builds
# patch_embed.{proj, text_proj}, time_embedding_linear_{1,2}, ofs_embedding_linear_{1,2} (1.5 I2V), blocks
# (nn.ModuleList of CogVideoXBlock), norm_final, norm_out.linear, proj_out; CogVideoXBlock.__init__ builds
# norm1.linear, q, k, v, norm_q, norm_k, attn_out, norm2.linear, ff_proj, ff_out.
COMFY_COGVIDEOX_TOP = [
    "patch_embed.proj",
    "patch_embed.text_proj",
    "time_embedding_linear_1",
    "time_embedding_linear_2",
    "norm_out.linear",
    "proj_out",
]
COMFY_COGVIDEOX_OFS = ["ofs_embedding_linear_1", "ofs_embedding_linear_2"]
COMFY_COGVIDEOX_BLOCK = ["norm1.linear", "q", "k", "v", "attn_out", "norm2.linear", "ff_proj", "ff_out"]
# comfy/ldm/lightricks/model.py (ComfyUI @005d2d3a): LTXVModel.__init__ builds patchify_proj, adaln_single
# (AdaLayerNormSingle: emb.timestep_embedder.linear_{1,2}, linear), caption_projection.linear_{1,2},
# transformer_blocks (BasicTransformerBlock: attn1/attn2 CrossAttention with to_q, to_k, to_v, to_out.0;
# ff.net.0.proj, ff.net.2), proj_out.
COMFY_LTX_TOP = [
    "patchify_proj",
    "adaln_single.emb.timestep_embedder.linear_1",
    "adaln_single.emb.timestep_embedder.linear_2",
    "adaln_single.linear",
    "caption_projection.linear_1",
    "caption_projection.linear_2",
    "proj_out",
]
COMFY_LTX_BLOCK = [
    *(f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj",
    "ff.net.2",
]


def comfy_unloaded_keys(lora: dict, comfy_modules: list[str]) -> list[str]:
    """The keys of a LoRA file ComfyUI would report as "lora key not loaded" for a model whose weights are
    ``diffusion_model.<m>.weight`` for ``m`` in ``comfy_modules``: comfy/lora.py's ``model_lora_keys_unet``
    maps ``diffusion_model.<m>`` (generic format) and ``lora_unet_<m with . -> _>`` (kohya) to each weight,
    and ``load_lora`` takes ``<key>.lora_up.weight``, ``<key>.lora_down.weight`` and ``<key>.alpha``."""
    key_map = {}
    for m in comfy_modules:
        key_map[f"diffusion_model.{m}"] = m
        key_map["lora_unet_" + m.replace(".", "_")] = m
    loaded = set()
    for key in key_map:
        parts = [f"{key}.lora_up.weight", f"{key}.lora_down.weight", f"{key}.alpha"]
        if parts[0] in lora:
            loaded.update(p for p in parts if p in lora)
    return sorted(set(lora) - loaded)


def _every_linear_lora(transformer) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA on every Linear/Conv2d module of ``transformer`` (PEFT keys)."""
    from frameloom.config.schema import LoraConfig
    from frameloom.models.lora import apply_lora

    names = [n for n, m in transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    apply_lora(transformer, LoraConfig(rank=2, target_modules=names))
    return get_lora_state_dict(transformer)


@pytest.mark.parametrize("version,i2v", [("1.0", False), ("1.5", True)])
def test_cogvideox_comfyui_names_are_comfyuis_model(version, i2v, tmp_path):
    """A LoRA on every linear layer maps onto exactly ComfyUI's CogVideoX weight names (not diffusers'), and
    ComfyUI's key matching loads every key of the ComfyUI and kohya forms."""
    from diffusers import CogVideoXTransformer3DModel

    from frameloom.models.cogvideox.family import comfyui_module
    from frameloom.models.lora import to_kohya_keys

    pre = build_tiny_cogvideox(tmp_path / "pre", version=version, i2v=i2v)
    state = _every_linear_lora(CogVideoXTransformer3DModel.from_pretrained(pre, subfolder="transformer"))
    comfy = to_comfyui_keys(state, 2.0, comfyui_module)
    expected = COMFY_COGVIDEOX_TOP + (COMFY_COGVIDEOX_OFS if i2v else [])
    expected += [f"blocks.{i}.{m}" for i in range(2) for m in COMFY_COGVIDEOX_BLOCK]
    assert {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in comfy if "lora_down" in k} == set(
        expected
    )
    assert (
        comfy["diffusion_model.blocks.1.attn_out.lora_down.weight"]
        is state["transformer_blocks.1.attn1.to_out.0.lora_A.weight"]
    )
    assert comfy_unloaded_keys(comfy, expected) == []
    kohya = to_kohya_keys(state, 2.0, comfyui_module)
    assert "lora_unet_blocks_0_ff_proj.lora_up.weight" in kohya
    assert comfy_unloaded_keys(kohya, expected) == []
    # The diffusers names frameloom used to write load nowhere in ComfyUI's model.
    assert comfy_unloaded_keys(to_comfyui_keys(state, 2.0), expected) != []


def test_ltx_comfyui_names_outside_the_blocks(tmp_path):
    """LTX-Video: block layers keep diffusers' names in ComfyUI, but the input projection is patchify_proj
    and the timestep embedding adaln_single."""
    from diffusers import LTXVideoTransformer3DModel

    from families import build_tiny_ltx
    from frameloom.models.ltx_video.family import comfyui_module

    pre = build_tiny_ltx(tmp_path / "ltx")
    state = _every_linear_lora(LTXVideoTransformer3DModel.from_pretrained(pre, subfolder="transformer"))
    comfy = to_comfyui_keys(state, 4.0, comfyui_module)
    expected = COMFY_LTX_TOP + [f"transformer_blocks.{i}.{m}" for i in range(2) for m in COMFY_LTX_BLOCK]
    assert {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in comfy if "lora_up" in k} == set(
        expected
    )
    assert comfy_unloaded_keys(comfy, expected) == []
    assert comfyui_module("time_embed.emb.timestep_embedder.linear_1") == (
        "adaln_single.emb.timestep_embedder.linear_1"
    )
    with pytest.raises(FrameloomError, match="no ComfyUI name for the ltx_video module"):
        comfyui_module("transformer_blocks.0.attn1.norm_q")


def test_exported_files_bf16_by_default_comfyui_and_kohya(setup, tmp_path):
    from frameloom.models.lora import to_kohya_keys

    root, pre, runs = setup
    paths = export_run(runs["lora"], fmt="lora", out=tmp_path / "lora", comfyui=True, kohya=True)
    assert [p.name for p in paths] == [LORA_FILE, COMFYUI_FILE, KOHYA_FILE]
    _, model, _ = load_run_denoiser(runs["lora"])
    trained = get_lora_state_dict(model.transformer)
    diffusers_keys = load_file(str(tmp_path / "lora" / LORA_FILE))
    comfy, kohya = (load_file(str(tmp_path / "lora" / f)) for f in (COMFYUI_FILE, KOHYA_FILE))
    # 2 layers x 4 target modules x (lora_down, lora_up, alpha)
    assert len(comfy) == len(kohya) == 2 * 4 * 3 and len(diffusers_keys) == 2 * 4 * 2
    m = "transformer_blocks.1.attn1.to_out.0"
    for file_key, value in (
        (f"transformer.{m}.lora_A.weight", diffusers_keys),
        ("diffusion_model.blocks.1.attn_out.lora_down.weight", comfy),
        ("lora_unet_blocks_1_attn_out.lora_down.weight", kohya),
    ):
        assert value[file_key].dtype == torch.bfloat16
        assert torch.equal(value[file_key], trained[f"{m}.lora_A.weight"].to(torch.bfloat16)), file_key
    assert comfy["diffusion_model.blocks.1.attn_out.alpha"].item() == 2.0
    assert kohya["lora_unet_blocks_1_attn_out.alpha"].dtype == torch.float32
    from frameloom.models.cogvideox.family import comfyui_module

    assert set(kohya) == set(to_kohya_keys(trained, 2.0, comfyui_module))
    fp32 = export_run(runs["lora"], fmt="lora", out=tmp_path / "fp32", dtype="fp32")[0]
    assert torch.equal(load_file(str(fp32))[f"transformer.{m}.lora_A.weight"], trained[f"{m}.lora_A.weight"])


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
    export_run(runs["lora"], fmt="lora", out=tmp_path / "lora", dtype="fp32")
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
    with pytest.raises(FrameloomError, match="--comfyui and --kohya apply to --format lora only"):
        export_run(runs["full"], fmt="diffusers", out=tmp_path / "z", comfyui=True)
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--comfyui" in capsys.readouterr().out
