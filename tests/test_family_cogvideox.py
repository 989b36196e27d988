"""The CogVideoX family: schedule and loss by hand, frame padding, I2V conditioning, loading, LoRA and full
fine-tuning through the trainer, validation with the diffusers pipeline, the cache with the real encoders,
and `frameloom sample` on a family run. Tiny random models are saved as diffusers directories (families.py).

FSDP2 with 2 processes: tests/test_family_parallel.py (every family).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from families import (
    COGVIDEOX_SCHEDULER,
    TINY_CLIP,
    assert_pipeline_text_matches_prompt_strings,
    build_tiny_cogvideox,
    family_config,
    solid_image,
)
from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.errors import FrameloomError
from frameloom.models.cogvideox import family as cog
from frameloom.models.cogvideox.model import rotary_embeddings
from frameloom.models.cogvideox.objective import image_condition, pad_first_frame
from frameloom.objectives.ddpm import (
    DDPMSchedule,
    add_noise,
    cogvideox_x0_loss,
    ddim_timesteps,
    v_target,
    x0_from_v,
)
from frameloom.pipeline import run_cache
from frameloom.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cogdata")
    synthetic.write_synthetic_set(
        root, num_clips=4, seed=0, height=16, width=16, num_frames=5, progress=False
    )
    return root / "manifest.parquet"


@pytest.fixture(scope="module")
def cog10(tmp_path_factory) -> Path:
    return build_tiny_cogvideox(tmp_path_factory.mktemp("cog10"), version="1.0")


@pytest.fixture(scope="module")
def cog15(tmp_path_factory) -> Path:
    return build_tiny_cogvideox(tmp_path_factory.mktemp("cog15"), version="1.5")


def _cfg(pretrained: Path, manifest: Path, run_dir: Path, *extra: str):
    return load_config(None, family_config("cogvideox", pretrained, manifest, run_dir, *extra))


# ------------------------------------------------------------------------------------------ maths by hand


def test_schedule_by_hand_and_equal_to_diffusers():
    from diffusers import CogVideoXDDIMScheduler

    s = DDPMSchedule.from_config({"_class_name": "CogVideoXDDIMScheduler", **COGVIDEOX_SCHEDULER})
    ab = s.alphas_cumprod
    # t = 0: beta_0 = 0.00085 -> ab = 0.99915; SNR shift 3: ab / (3 - 2 ab) = 0.99915 / 1.0017; the
    # zero-terminal-SNR rescale keeps the first value and sends the last to 0.
    assert ab[0].item() == pytest.approx(0.99915 / 1.0017, rel=1e-12)
    assert ab[-1].item() == pytest.approx(0.0, abs=1e-15)
    # An independent numpy computation of the whole chain (scaled-linear, shift 3, rescale).
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    a = np.cumprod(1 - betas)
    a = a / (3 - 2 * a)
    r = np.sqrt(a)
    r = (r - r[-1]) * r[0] / (r[0] - r[-1])
    np.testing.assert_allclose(ab.numpy(), r**2, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(ab, CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER).alphas_cumprod.double())
    assert s.prediction_type == "v_prediction" and s.final_alpha_cumprod == 1.0
    # trailing spacing: round(arange(1000, 0, -250)) - 1
    assert ddim_timesteps(1000, 4, "trailing") == [999, 749, 499, 249]
    sched = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)
    sched.set_timesteps(7)
    assert ddim_timesteps(1000, 7, "trailing") == sched.timesteps.tolist()


def test_v_prediction_and_weighted_loss_by_hand():
    # ab = 0.64: sqrt(ab) = 0.8, sqrt(1 - ab) = 0.6; x0 = 1, noise = 2
    ab = torch.tensor([0.64])
    x0, noise = torch.ones(1, 1), torch.full((1, 1), 2.0)
    assert add_noise(x0, noise, ab).item() == pytest.approx(0.8 * 1 + 0.6 * 2)  # 2.0
    assert v_target(x0, noise, ab).item() == pytest.approx(0.8 * 2 - 0.6 * 1)  # 1.0
    assert x0_from_v(torch.full((1, 1), 2.0), torch.ones(1, 1), ab).item() == pytest.approx(1.6 - 0.6)
    # (1.5 - 1)^2 / (1 - 0.64) = 0.25 / 0.36
    assert cogvideox_x0_loss(torch.full((1, 1), 1.5), x0, ab).item() == pytest.approx(0.25 / 0.36)
    # two samples: the per-sample weighted means, then the batch mean
    ab2 = torch.tensor([0.64, 0.0])
    loss = cogvideox_x0_loss(
        torch.tensor([[1.5, 1.0], [0.0, 3.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]]), ab2
    )
    assert loss.item() == pytest.approx(((0.25 / 0.36 + 0) / 2 + (1 + 4) / 2) / 2)


def test_training_loss_equals_upstream_formula(cog10, manifest, tmp_path):
    """draw() + the denoiser + loss() equal CogVideoX's trainer maths written with diffusers' scheduler."""
    from diffusers import CogVideoXDDIMScheduler

    cfg = _cfg(cog10, manifest, tmp_path / "run", "model.lora.rank=0")
    objective = cog.build_objective(cfg)
    model = cog.build_denoiser(cfg.model, 4, 32).eval()
    x0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, C, T, H, W)
    emb = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    inputs = objective.draw(x0, torch.Generator().manual_seed(3))
    with torch.no_grad():
        pred = model(inputs.x_t, inputs.t, emb, torch.ones(2, 16, dtype=torch.bool))
        loss = objective.loss(pred, inputs)

        # By hand, as CogVideoX's finetune trainer computes it (timesteps, then noise, from the same generator).
        g = torch.Generator().manual_seed(3)
        t = torch.randint(0, 1000, (2,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sched = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)
        x_t = sched.add_noise(x0, noise, t)
        assert torch.equal(inputs.t, t)
        torch.testing.assert_close(inputs.x_t, x_t)
        v = model.transformer(
            hidden_states=x_t.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=emb,
            timestep=t,
            image_rotary_emb=rotary_embeddings(model.config, 3, 8, 8, "cpu"),
            return_dict=False,
        )[0].permute(0, 2, 1, 3, 4)
        x0_pred = sched.get_velocity(v, x_t, t)  # = sqrt(ab) x_t - sqrt(1 - ab) v
        w = 1 / (1 - sched.alphas_cumprod[t].float())
        expected = (w.view(2, 1) * ((x0_pred - x0) ** 2).reshape(2, -1)).mean(dim=1).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_rotary_tables_are_computed_once_per_grid(cog10, manifest, tmp_path, monkeypatch):
    """The denoiser builds a grid's RoPE tables on first use and reuses them (a per-step constant): the
    transformer sees tables equal to diffusers' and the output is bit-identical to a call with fresh ones."""
    from frameloom.models.cogvideox import model as cog_model

    cfg = _cfg(cog10, manifest, tmp_path / "run", "model.lora.rank=0")
    model = cog.build_denoiser(cfg.model, 4, 32).eval()
    calls = []
    real = cog_model.rotary_embeddings
    monkeypatch.setattr(cog_model, "rotary_embeddings", lambda *a, **k: calls.append(a[1:4]) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, C, T, H, W)
    emb = torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        first = model(x, t, emb, None)
        second = model(x, t, emb, None)
        fresh = model.transformer(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=emb,
            timestep=t,
            image_rotary_emb=real(model.config, 3, 8, 8, "cpu"),
            return_dict=False,
        )[0].permute(0, 2, 1, 3, 4)
    assert calls == [(3, 8, 8)]  # one computation for two steps on the same grid
    assert torch.equal(first, second) and torch.equal(first, fresh)
    cos, sin = model.rotary_for(3, 8, 8, torch.device("cpu"))
    want_cos, want_sin = real(model.config, 3, 8, 8, "cpu")
    assert cos.shape == (3 * 4 * 4, 16) and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    # another grid gets its own tables; beyond ROTARY_CACHE_SIZE grids the oldest is dropped
    model.ROTARY_CACHE_SIZE = 2
    model.rotary_for(2, 8, 8, "cpu")
    model.rotary_for(1, 8, 8, "cpu")
    assert calls == [(3, 8, 8), (2, 8, 8), (1, 8, 8)]
    assert [k[:3] for k in model._rotary] == [(2, 8, 8), (1, 8, 8)]


def test_compiled_denoiser_does_not_recompile_when_the_rotary_cache_fills(cog10, manifest, tmp_path):
    """`parallel.compile: model` compiles the whole denoiser: the rotary cache filling on the first call must
    not fail a guard on the second (a second compile: ~3 s of start-up on the benchmark's tiny model)."""
    cfg = _cfg(cog10, manifest, tmp_path / "run", "model.lora.rank=0")
    model = cog.build_denoiser(cfg.model, 4, 32).eval()
    model.compile(backend="eager")  # dynamo's guards without inductor's kernels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, C, T, H, W)
    emb, t = torch.randn(2, 16, 32, generator=g), torch.tensor([1, 9])
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            outs = [model(x, t, emb, None) for _ in range(3)]
    finally:
        torch._dynamo.reset()
    assert torch.equal(outs[0], outs[2])


def test_cogvideox_15_pads_with_the_first_frame(cog15, manifest, tmp_path):
    x = torch.arange(3.0).view(1, 1, 3, 1, 1).expand(2, 4, 3, 2, 2)  # frames 0, 1, 2
    padded = pad_first_frame(x, 2)
    assert padded[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 1.0, 2.0]
    assert pad_first_frame(padded, 2) is padded and pad_first_frame(x, None) is x
    cfg = _cfg(cog15, manifest, tmp_path / "run")
    inputs = cog.build_objective(cfg).draw(torch.randn(2, 4, 3, 8, 8), torch.Generator().manual_seed(0))
    assert inputs.x_t.shape == (2, 4, 4, 8, 8) and torch.equal(inputs.x0[:, :, 0], inputs.x0[:, :, 1])
    # I2V conditioning over the padded frames, as the pipeline and upstream lay it out: [img, 0, 0, 0]
    img = torch.ones(1, 4, 1, 2, 2)
    assert image_condition(img, 4)[0, 0, :, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_i2v_draw_builds_noisy_image_condition(tmp_path, manifest):
    pre = build_tiny_cogvideox(tmp_path / "i2v", version="1.0", i2v=True)
    cfg = _cfg(pre, manifest, tmp_path / "run", "model.config={noised_image_dropout: 0.0}")
    objective = cog.build_objective(cfg)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    inputs = objective.draw(x0, torch.Generator().manual_seed(7))
    assert inputs.x_t.shape == (2, 8, 3, 8, 8)
    torch.testing.assert_close(inputs.x_t[:, :4], inputs.extras["x_noisy"])
    # Replay the generator: t, noise, then log-sigma ~ N(-3, 0.5), image noise, dropout draws.
    g = torch.Generator().manual_seed(7)
    torch.randint(0, 1000, (2,), generator=g)
    torch.randn(x0.shape, generator=g)
    sigma = torch.exp(torch.randn(2, generator=g) * 0.5 - 3.0)
    image_noise = torch.randn(2, 4, 1, 8, 8, generator=g)
    expected = x0[:, :, :1] + sigma.view(2, 1, 1, 1, 1) * image_noise
    torch.testing.assert_close(inputs.x_t[:, 4:, :1], expected)
    assert torch.count_nonzero(inputs.x_t[:, 4:, 1:]) == 0  # zero padded in time


# ------------------------------------------------------------------------------------------ loading


def test_loading_freezes_encoders_and_applies_lora(cog10, manifest, tmp_path):
    cfg = _cfg(
        cog10, manifest, tmp_path / "run", "model.lora.rank=4", "model.lora.alpha=2", "model.dtype=bfloat16"
    )
    codec = cog.load_codec(cfg, torch.device("cpu"))
    te = cog.load_text_encoder(cfg, torch.device("cpu"))
    assert not codec.vae.training and not any(p.requires_grad for p in codec.vae.parameters())
    assert not te.model.training and not any(p.requires_grad for p in te.model.parameters())
    emb, mask = te.encode(["a", "a much longer caption"])
    assert emb.shape == (2, 16, 32) and bool(mask.all())  # fixed 16 (= max_text_seq_length), unmasked
    model = cog.build_denoiser(cfg.model, codec.latent_channels, te.dim)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())  # LoRA in fp32 ...
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # ... on a bf16 base
    # 2 layers x 4 targets (to_q, to_k, to_v, to_out.0) x (A, B)
    assert len(trainable) == 2 * 4 * 2
    out = model(torch.randn(1, 4, 3, 8, 8), torch.tensor([10]), emb[:1], mask[:1])
    assert out.shape == (1, 4, 3, 8, 8)


def test_id_token_is_prepended_and_keyed(cog10, manifest, tmp_path):
    plain = cog.load_text_encoder(_cfg(cog10, manifest, tmp_path / "a"), torch.device("cpu"))
    tok = cog.load_text_encoder(_cfg(cog10, manifest, tmp_path / "b", "model.id_token=BW_STYLE"), "cpu")
    assert tok.identity != plain.identity  # cached embeddings with/without the token never mix
    torch.testing.assert_close(tok.encode(["a cat"])[0], plain.encode(["BW_STYLE a cat"])[0])
    torch.testing.assert_close(tok.encode([""])[0], plain.encode([""])[0])  # the empty prompt stays empty


def test_validation_prompt_embeddings_are_the_pipelines(cog10, manifest, tmp_path):
    """Validation hands CogVideoXPipeline frameloom's 16-token (max_text_seq_length) unmasked T5 output: the
    video equals the one the pipeline makes from the prompt string."""
    from diffusers import CogVideoXPipeline

    cfg = _cfg(cog10, manifest, tmp_path / "run")
    model = cog.build_denoiser(cfg.model, 0, 0)
    assert_pipeline_text_matches_prompt_strings(
        CogVideoXPipeline.from_pretrained(cog10),
        model,
        cog.load_text_encoder(cfg, torch.device("cpu")),
        "a red ball",
        **TINY_CLIP,
        num_inference_steps=2,
        max_sequence_length=16,
    )


def test_missing_directory_is_one_clear_error(cog10, manifest, tmp_path):
    with pytest.raises(FrameloomError, match="not a directory"):
        cog.build_denoiser(_cfg(tmp_path / "nope", manifest, tmp_path / "r").model, 0, 0)
    broken = tmp_path / "broken"
    shutil.copytree(cog10, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(FrameloomError, match=r"missing vae/, tokenizer/"):
        cog.load_codec(_cfg(broken, manifest, tmp_path / "r"), torch.device("cpu"))
    from frameloom.cli import main

    assert main(["train", "/dev/null", "model.family=cogvideox", f"model.pretrained={broken}",
                 f"data.manifest={manifest}", f"run_dir={tmp_path / 'r'}"]) == 2  # fmt: skip


# ------------------------------------------------------------------------------------------ training


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "version,i2v,rank",
    [("1.0", False, 4), ("1.5", False, 0), pytest.param("1.5", True, 4, marks=pytest.mark.slow)],
)
def test_lora_and_full_steps_train(version, i2v, rank, manifest, tmp_path):
    pre = build_tiny_cogvideox(tmp_path / "pre", version=version, i2v=i2v)
    image = solid_image(tmp_path / "img.png", 16, 128)
    cfg = _cfg(
        pre,
        manifest,
        tmp_path / "run",
        f"model.lora.rank={rank}",
        "train.steps=3",
        "validation.every=3",
        "validation.prompts=[a red ball]",
        f"model.config={{validation_images: [{image}]}}",
    )
    trainer = Trainer(cfg)
    before = _params(trainer.model)
    result = trainer.fit()
    assert result.step == 3 and all(math.isfinite(x) for x in result.losses)
    after = _params(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if rank:
        assert changed and all("lora_B" in k or "lora_A" in k for k in changed)  # the base never moves
    else:
        assert any("transformer_blocks.0.attn1.to_q.weight" in k for k in changed)
    # validation went through the diffusers pipeline around the in-training weights
    assert len(list((tmp_path / "run" / "samples" / "step-00000003").glob("*.mp4"))) == 1


def test_cache_reused_with_same_vae_and_invalidated_when_vae_changes(cog10, manifest, tmp_path):
    cache = tmp_path / "cache"
    cfg = _cfg(cog10, manifest, tmp_path / "run", f"data.cache_dir={cache}")
    first = run_cache(cfg, progress=False)
    assert (first.encoded, first.reused) == (4, 0) and first.text_encoded >= 2  # captions + ""
    again = run_cache(cfg, progress=False)
    assert (again.encoded, again.reused, again.text_encoded) == (0, 4, 0)
    assert Trainer(cfg).cached  # the trainer reads the cache: nothing missing
    # Same configs, other VAE weights: every clip is re-encoded, no caption is.
    other = tmp_path / "other"
    shutil.copytree(cog10, other)
    shutil.rmtree(other / "vae")
    shutil.copytree(build_tiny_cogvideox(tmp_path / "seed1", vae_seed=1) / "vae", other / "vae")
    changed = run_cache(_cfg(other, manifest, tmp_path / "run2", f"data.cache_dir={cache}"), progress=False)
    assert (changed.encoded, changed.reused, changed.text_encoded) == (4, 0, 0)


def test_cached_run_releases_the_encoders_and_reloads_them_for_validation(
    cog10, manifest, tmp_path, monkeypatch
):
    """With a complete cache the trainer needs only the empty-prompt embedding: T5 and the VAE leave memory
    after construction (nothing keeps them alive), validation loads them again and drops them after."""
    import gc
    import weakref

    from frameloom import pipeline

    loaded: list[weakref.ref] = []  # every T5 model and VAE the trainer loads, weakly

    def spy(load, part):
        def wrapper(*args, **kwargs):
            encoder = load(*args, **kwargs)
            loaded.append(weakref.ref(getattr(encoder, part)))
            return encoder

        return wrapper

    monkeypatch.setattr(pipeline, "load_text_encoder", spy(pipeline.load_text_encoder, "model"))
    monkeypatch.setattr(pipeline, "load_codec", spy(pipeline.load_codec, "vae"))
    extra = ("model.lora.rank=4", "validation.every=2", "validation.prompts=[a red ball]")
    cfg = _cfg(cog10, manifest, tmp_path / "run", f"data.cache_dir={tmp_path / 'cache'}", *extra)
    run_cache(cfg, progress=False)
    loaded.clear()

    trainer = Trainer(cfg)
    assert trainer.cached and trainer.text_encoder is None and trainer.codec is None
    gc.collect()
    assert len(loaded) == 2 and all(ref() is None for ref in loaded)  # freed, not just unreferenced here
    assert trainer.empty_emb.shape == (16, 32)  # what training still needs: "" as 16 T5 embeddings
    trainer.fit()  # 2 steps from the cache, then validation at step 2
    assert len(list((tmp_path / "run" / "samples" / "step-00000002").glob("*.mp4"))) == 1
    assert len(loaded) == 4 and trainer.text_encoder is None and trainer.codec is None
    gc.collect()
    assert all(ref() is None for ref in loaded)
    # Without the cache the encoders stay: every batch is encoded on the fly.
    on_the_fly = Trainer(_cfg(cog10, manifest, tmp_path / "run2", "data.use_cache=never"))
    assert not on_the_fly.cached and on_the_fly.text_encoder is not None and on_the_fly.codec is not None


def test_frameloom_sample_on_a_family_run(cog10, manifest, tmp_path):
    from frameloom.sampling.generate import sample_command

    train(_cfg(cog10, manifest, tmp_path / "run", "model.lora.rank=4", "train.steps=1"))
    paths = sample_command(
        str(tmp_path / "run"), prompts=["a red ball"], out=str(tmp_path / "out"), seeds=[0, 1]
    )
    assert [p.name for p in paths] == ["000-a_red_ball-seed0.mp4", "000-a_red_ball-seed1.mp4"]
    assert all(p.stat().st_size > 0 for p in paths)


# ------------------------------------------------------------------------------------------ sampling parity


@pytest.mark.parametrize(
    "version,i2v", [("1.0", False), ("1.0", True), pytest.param("1.5", True, marks=pytest.mark.slow)]
)
def test_frameloom_sample_equals_the_pipeline(version, i2v, manifest, tmp_path):
    """`frameloom sample`'s DDIM gives the pipeline's video (CogVideoXPipeline / CogVideoXImageToVideoPipeline
    with the folder's CogVideoXDDIMScheduler) for the same seed, with a negative prompt and an id token (the
    trigger goes on the prompt only). I2V: the pipeline encodes the image (a VAE sample from the seed's
    generator) before drawing the noise. Measured max |diff| in [0, 1] pixel units on these weights: now
    <= 4.2e-7 for all three; before the fixes 5.4e-3 (1.0 T2V: the id token was on the negative prompt),
    0.64 (1.0 I2V) and 0.51 (1.5 I2V: noise drawn before the image latent)."""
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXPipeline

    pre = build_tiny_cogvideox(tmp_path / "pre", version=version, i2v=i2v)
    extra = ("sample.negative_prompt=blurry, dark", "model.id_token=TOK", "sample.steps=3")
    cfg = _cfg(pre, manifest, tmp_path / "run", *extra)
    model = cog.build_denoiser(cfg.model, 0, 0).eval()
    _redraw(model, seed=1)  # non-trivial weights everywhere (zero-initialised layers would hide differences)
    codec, encoder = cog.load_codec(cfg, "cpu"), cog.load_text_encoder(cfg, "cpu")
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))  # [0, 1]
    images = image * 2 - 1 if i2v else None
    ours = cog.sample_videos(model, encoder, codec, cfg, ["a red ball"], [5], images=images)
    ours = ((ours[0] + 1) / 2).permute(1, 0, 2, 3)  # (T, 3, H, W) in [0, 1]

    pipe_cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    pipe = pipe_cls.from_pretrained(pre, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=image) if i2v else {}
    theirs = pipe(
        prompt="TOK a red ball",
        negative_prompt="blurry, dark",
        **TINY_CLIP,
        num_inference_steps=3,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
        max_sequence_length=16,
        **kwargs,
    ).frames[0]  # (T, 3, H, W) in [0, 1]
    torch.testing.assert_close(ours.clamp(0, 1), theirs, atol=1e-5, rtol=0)


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Every weight of the denoiser from N(0, 0.2) with a fixed seed (the tiny models' output layers start at
    zero: without this, different inputs could still give equal videos)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ------------------------------------------------------------------------------------------ LoRA checkpoints


def test_lora_checkpoints_hold_the_adapter_and_resume_bit_exactly(cog10, manifest, tmp_path):
    """A LoRA run's checkpoint holds the adapter (+ optimizer and state), not the frozen base; resuming from
    it rebuilds the base from model.pretrained and continues exactly as the uninterrupted run (CPU)."""
    import json

    from safetensors import safe_open

    from frameloom.checkpoint import io as ckpt

    extra = ("model.lora.rank=4", "optim.lr=1e-2", "checkpoint.every=2", "checkpoint.keep_last=0")
    straight = train(_cfg(cog10, manifest, tmp_path / "a", *extra, "train.steps=4"))
    step2 = ckpt.checkpoint_dir(tmp_path / "a") / "step-00000002"
    assert json.loads((step2 / "meta.json").read_text())["trainable_only"] is True
    with safe_open(str(step2 / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    # 2 layers x 4 targets x (A, B), nothing of the base (which has 40 tensors)
    assert len(keys) == 16 and all(".lora_A." in k or ".lora_B." in k for k in keys)
    base_bytes = sum(
        p.numel() * 4 for p in cog.build_denoiser(_cfg(cog10, manifest, tmp_path).model, 0, 0).parameters()
    )
    assert (step2 / "model.safetensors").stat().st_size < base_bytes / 5

    first = train(_cfg(cog10, manifest, tmp_path / "b", *extra, "train.steps=2"))
    resumed = train(
        _cfg(cog10, manifest, tmp_path / "b", *extra, "train.steps=4", "checkpoint.resume=latest")
    )
    assert first.losses + resumed.losses == straight.losses
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))["model"]
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))["model"]
    assert set(a) == set(keys) and all(torch.equal(a[k], b[k]) for k in a)
    # frameloom sample and export read it (the base from the pretrained directory)
    from frameloom.sampling.generate import sample_command

    (path,) = sample_command(str(tmp_path / "b"), prompts=["a red ball"], out=str(tmp_path / "out"))
    assert path.stat().st_size > 0


# ------------------------------------------------------------------------------------------ validation ergonomics


def test_validation_at_step_0_and_videos_in_tensorboard(cog10, manifest, tmp_path):
    """validation.at_start samples before training (step 0); every validation mp4 also lands in TensorBoard
    as an animated image at its step."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ("model.lora.rank=4", "validation.every=2", "validation.prompts=[a red ball]")
    run = tmp_path / "run"
    train(_cfg(cog10, manifest, run, *extra, "validation.at_start=true", "logging.tensorboard=true"))
    assert [p.parent.name for p in sorted((run / "samples").glob("*/*.mp4"))] == [
        "step-00000000",
        "step-00000002",
    ]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    events = acc.Images("validation/000-a_red_ball-seed0")
    assert [e.step for e in events] == [0, 2]
    gif = Image.open(io.BytesIO(events[0].encoded_image_string))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (16, 16)


def test_sample_image_flag_conditions_an_i2v_run(tmp_path, manifest):
    """`frameloom sample --image` gives an I2V family its first frame (before: only
    model.config.validation_images, and an error without it)."""
    from frameloom.cli import main

    pre = build_tiny_cogvideox(tmp_path / "i2v", version="1.0", i2v=True)
    train(_cfg(pre, manifest, tmp_path / "run", "model.lora.rank=4", "train.steps=1"))
    image = solid_image(tmp_path / "first.png", 16, 200)
    out = tmp_path / "out"
    args = ["sample", str(tmp_path / "run"), "--prompt", "a cat", "--out", str(out)]
    assert main(args) == 2  # an I2V model needs a first frame
    assert main([*args, "--image", str(image)]) == 0
    assert [p.name for p in out.glob("*.mp4")] == ["000-a_cat-seed0.mp4"]


@pytest.mark.slow
def test_compiled_lora_run_equals_the_eager_one(cog10, manifest, tmp_path):
    """The preset's `parallel.compile: model` (inductor, C++ kernels on the CPU) trains the LoRA to the eager
    run's losses and weights within float32 reassociation error."""
    from frameloom.parallel.memory import compile_unavailable

    if compile_unavailable("cpu"):
        pytest.skip(compile_unavailable("cpu"))
    runs = {}
    for flag in ("false", "model"):
        cfg = _cfg(
            cog10, manifest, tmp_path / flag, "model.lora.rank=4", "train.steps=3", f"parallel.compile={flag}"
        )
        trainer = Trainer(cfg)
        result = trainer.fit()
        assert (trainer.model._compiled_call_impl is not None) == (flag == "model")
        lora = {k: v for k, v in _params(trainer.model).items() if "lora_" in k}
        runs[flag] = (result.losses, lora)
    torch._dynamo.reset()
    (eager_losses, eager), (comp_losses, comp) = runs["false"], runs["model"]
    assert len(comp_losses) == 3 and eager.keys() == comp.keys()
    torch.testing.assert_close(torch.tensor(comp_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-6)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-4, atol=1e-6, msg=k)
