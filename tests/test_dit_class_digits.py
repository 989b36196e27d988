"""The digits run of benchmarks/dit_digits.py at a few steps: every stage (prepare --format imagenet, cache,
train, sample --fid-npz, the independent classifier) runs and reports. The figure itself (>= 80% of samples
classified as their class) comes from the full benchmark, which takes minutes: see docs/dit_class.md."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "dit_digits.py"


@pytest.mark.slow
def test_digits_pipeline_runs_and_scores(tmp_path):
    spec = importlib.util.spec_from_file_location("dit_digits", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["dit_digits"] = bench
    spec.loader.exec_module(bench)
    result = bench.main(
        [
            "--out",
            str(tmp_path),
            "--steps",
            "20",
            "--samples",
            "20",
            "--sample-steps",
            "5",
            "train.batch_size=16",
        ]
    )
    assert result["train_steps"] == 20 and result["samples"] == 20
    assert result["train_cpu_s"] > 0 and result["torch_threads"] >= 1  # CPU time reported beside wall time
    assert result["classifier_real_test_accuracy"] >= 0.9  # the judge reads real digits
    assert 0.0 <= result["sample_class_accuracy"] <= 1.0 and len(result["per_class_accuracy"]) == 10
    assert len(list((tmp_path / "images").iterdir())) == 10  # ImageNet layout: one folder per class
