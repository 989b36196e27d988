"""The trainer's conditioning interface for the seed families: extra text tensors (a pooled vector) through
the cache and on the fly, their caption dropout (with the tokens or independently), and the objective hooks
(`StepContext`, `TrainingInputs.model_kwargs`, `predict`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frameloom.config import load_config
from frameloom.data import synthetic
from frameloom.models import registry
from frameloom.models.dit.family import build_denoiser as build_dit
from frameloom.models.dit.family import load_denoiser as load_dit
from frameloom.models.dit.model import VideoDiT
from frameloom.models.text import T5TextEncoder, derive_identity, pool_text
from frameloom.objectives import FlowMatching, StepContext, TrainingInputs
from frameloom.pipeline import run_cache, text_encoder_dir
from frameloom.train.trainer import Trainer
from tiny import TINY


class PooledEncoder(T5TextEncoder):
    """The tiny T5 plus a per-caption `pooled` vector: 3 x the masked mean of its tokens, plus 1."""

    def __init__(self, inner: T5TextEncoder):
        self.__dict__.update(inner.__dict__)
        self.identity = derive_identity(inner.identity, pooled="x3+1")

    def encode_extras(self, texts):
        emb, mask = self.encode(texts)
        return {"pooled": pool_text(emb.float(), mask) * 3 + 1}  # (B, D)


class RecordingDiT(VideoDiT):
    """The tiny DiT; records the `pooled` and `hint` keyword arguments it receives."""

    def forward(self, x, t, text, mask, pooled=None, hint=None):
        self.seen.append({"pooled": pooled.detach().clone(), "hint": hint, "text": text.detach().clone()})
        return super().forward(x, t, text, mask) + 0 * pooled.sum()


def _family(seen: list[RecordingDiT]) -> registry.Family:
    def build(cfg, channels, text_dim):
        model = build_dit(cfg, channels, text_dim)
        model.__class__ = RecordingDiT  # the same module, with a recording forward
        model.seen = []
        seen.append(model)
        return model

    def text_encoder(cfg, device):
        return PooledEncoder(T5TextEncoder.from_pretrained(text_encoder_dir(cfg), max_length=16))

    return registry.Family("pooled_test", build, load_dit, load_text_encoder=text_encoder)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthetic.write_synthetic_set(root, num_clips=8, seed=0, height=8, width=8, num_frames=4, progress=False)
    return root / "manifest.parquet"


@pytest.fixture
def family(monkeypatch) -> list[RecordingDiT]:
    seen: list[RecordingDiT] = []
    monkeypatch.setitem(registry.FAMILIES, "pooled_test", lambda: _family(seen))
    return seen


def _config(dataset: Path, run_dir: Path, *extra: str):
    return load_config(
        None,
        [*TINY, f"data.manifest={dataset}", f"run_dir={run_dir}", "model.family=pooled_test", *extra],
    )


def _pooled_of(trainer: Trainer, texts: list[str]) -> torch.Tensor:
    return trainer.text_encoder.encode_extras(texts)["pooled"]


def test_pooled_extras_reach_the_model_cached_and_on_the_fly(dataset, tmp_path, family):
    extra = ("train.steps=2", "checkpoint.every=0", "objective.caption_dropout=0", "train.ema_decay=0")
    fly = Trainer(_config(dataset, tmp_path / "fly", "data.use_cache=never", *extra))
    assert not fly.cached
    texts = fly.dataset.table.column("text").to_pylist()
    expected = _pooled_of(fly, texts)  # (N, D): what each row's caption must bring
    fly_losses = fly.fit().losses
    run_cache(_config(dataset, tmp_path / "cached", *extra), progress=False)
    cached = Trainer(_config(dataset, tmp_path / "cached", *extra))
    assert cached.cached
    cached_losses = cached.fit().losses
    assert fly_losses == pytest.approx(cached_losses, rel=1e-5)
    for model in family:
        assert len(model.seen) == 2  # one call per step (batch 4, no accumulation)
    for a, b in zip(family[0].seen, family[1].seen):  # on the fly == cache
        torch.testing.assert_close(a["pooled"], b["pooled"], rtol=1e-5, atol=1e-6)
    # each row's pooled vector is its own caption's (rows of a batch are some rows of the manifest)
    rows = {tuple(torch.round(p, decimals=4).tolist()) for p in expected}
    for call in family[0].seen:
        assert call["pooled"].shape == (4, expected.shape[1])
        assert all(tuple(torch.round(p, decimals=4).tolist()) in rows for p in call["pooled"])


def test_extras_drop_with_the_tokens_or_independently(dataset, tmp_path, family):
    # caption_dropout 1: tokens and pooled vector are the empty prompt's
    together = Trainer(
        _config(
            dataset, tmp_path / "a", "train.steps=1", "objective.caption_dropout=1", "data.use_cache=never"
        )
    )
    empty = _pooled_of(together, [""])[0]
    together.fit()
    call = family[0].seen[0]
    torch.testing.assert_close(call["pooled"], empty.expand(4, -1))
    # extras_dropout 1, caption_dropout 0: only the pooled vector is dropped; the tokens are the captions'
    apart = Trainer(
        _config(
            dataset,
            tmp_path / "b",
            "train.steps=1",
            "objective.caption_dropout=0",
            "objective.extras_dropout=1",
            "data.use_cache=never",
        )
    )
    apart.fit()
    call = family[1].seen[0]
    torch.testing.assert_close(call["pooled"], empty.expand(4, -1))
    assert not torch.equal(
        call["text"][:, : together.empty_emb.shape[0]], together.empty_emb.expand(4, -1, -1)
    )
    # extras_dropout 0 with caption_dropout 1: the tokens are dropped, the pooled vectors are kept
    keep = Trainer(
        _config(
            dataset,
            tmp_path / "c",
            "train.steps=1",
            "objective.caption_dropout=1",
            "objective.extras_dropout=0",
            "data.use_cache=never",
        )
    )
    keep.fit()
    assert not torch.equal(family[2].seen[0]["pooled"], empty.expand(4, -1))


class HintedFlow(FlowMatching):
    """Flow matching that records its StepContext and passes a model keyword argument."""

    contexts: list[StepContext] = []

    def draw(self, x0, generator, ctx=None) -> TrainingInputs:
        inputs = super().draw(x0, generator, ctx)
        HintedFlow.contexts.append(ctx)
        inputs.model_kwargs["hint"] = ctx.step * 10 + ctx.micro
        return inputs


def test_objective_hooks_receive_the_step_context(dataset, tmp_path, family, monkeypatch):
    HintedFlow.contexts = []
    monkeypatch.setattr(
        "frameloom.train.trainer.build_objective", lambda cfg: HintedFlow(timestep_sampling="uniform")
    )
    trainer = Trainer(
        _config(dataset, tmp_path / "h", "train.steps=2", "train.grad_accum=2", "data.use_cache=never")
    )
    trainer.fit()
    assert [(c.step, c.micro, c.slot, c.data_world, c.sync_size) for c in HintedFlow.contexts] == [
        (0, 0, 0, 1, 1),
        (0, 1, 1, 1, 1),
        (1, 0, 0, 1, 1),
        (1, 1, 1, 1, 1),
    ]
    assert [call["hint"] for call in family[0].seen] == [0, 1, 10, 11]


def test_predict_hook_replaces_the_single_call(dataset, tmp_path, family, monkeypatch):
    calls = []

    class TwoCalls(FlowMatching):
        def predict(self, model, inputs, cond):  # e.g. one call per pyramid stage
            calls.append(inputs.x_t.shape[0])
            half = inputs.x_t.shape[0] // 2
            a = model(
                inputs.x_t[:half],
                inputs.t[:half],
                cond.emb[:half],
                cond.mask[:half],
                pooled=cond.extras["pooled"][:half],
            )
            b = model(
                inputs.x_t[half:],
                inputs.t[half:],
                cond.emb[half:],
                cond.mask[half:],
                pooled=cond.extras["pooled"][half:],
            )
            return torch.cat([a, b])

    monkeypatch.setattr(
        "frameloom.train.trainer.build_objective", lambda cfg: TwoCalls(timestep_sampling="uniform")
    )
    Trainer(_config(dataset, tmp_path / "p", "train.steps=1", "data.use_cache=never")).fit()
    assert calls == [4]
    assert [c["pooled"].shape[0] for c in family[0].seen] == [2, 2]
