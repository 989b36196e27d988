"""Config loading: inheritance, _delete_, both override syntaxes, every error message, round trip."""

from pathlib import Path

import pytest

from frameloom.config import Config, ConfigError, apply_overrides, dump_yaml, load_config
from frameloom.config.loader import deep_merge, parse_overrides


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_from_empty_file(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", ""))
    assert cfg == Config()


def test_base_inheritance_merges_left_to_right(tmp_path):
    write(tmp_path / "a.yaml", "seed: 1\noptim: {lr: 0.1, betas: [0.8, 0.9]}\ntrain: {steps: 5}\n")
    write(tmp_path / "b.yaml", "seed: 2\noptim: {lr: 0.2}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    cfg = load_config(write(sub / "c.yaml", "_base_: [../a.yaml, ../b.yaml]\ntrain: {batch_size: 3}\n"))
    assert cfg.seed == 2
    assert cfg.optim.lr == 0.2
    assert cfg.optim.betas == [0.8, 0.9]  # merged, not replaced
    assert (cfg.train.steps, cfg.train.batch_size) == (5, 3)


def test_delete_replaces_mapping():
    base = {"model": {"config": {"depth": 4, "hidden_size": 64}}}
    top = {"model": {"config": {"_delete_": True, "depth": 2}}}
    assert deep_merge(base, top) == {"model": {"config": {"depth": 2}}}
    assert deep_merge(base, {"model": {"config": {"depth": 2}}}) == {
        "model": {"config": {"depth": 2, "hidden_size": 64}}
    }


def test_delete_in_yaml_file(tmp_path):
    write(tmp_path / "a.yaml", "model: {config: {depth: 4, hidden_size: 64}}\n")
    cfg = load_config(
        write(tmp_path / "b.yaml", "_base_: a.yaml\nmodel: {config: {_delete_: true, depth: 2}}\n")
    )
    assert cfg.model.config == {"depth": 2}


def test_both_override_syntaxes(tmp_path):
    cfg = load_config(
        write(tmp_path / "c.yaml", "optim: {lr: 0.1}\n"),
        ["optim.lr=3e-4", "--train.steps", "7", "--checkpoint.resume=latest", "model.lora.rank=4"],
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.train.steps == 7
    assert cfg.checkpoint.resume == "latest"
    assert cfg.model.lora.rank == 4


def test_override_values_are_yaml():
    assert parse_overrides(["a.b=[1, 2]", "c=null", "d=true", "e=hello"]) == {
        "a": {"b": [1, 2]},
        "c": None,
        "d": True,
        "e": "hello",
    }


def test_int_coerces_to_float_but_not_back(tmp_path):
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"^train.steps: expected int, got float 1.5$"):
        load_config(None, ["train.steps=1.5"])


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"^unknown key optim.lrr; did you mean optim.lr\?$"):
        load_config(None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key trian; did you mean train\?"):
        load_config(None, ["trian.steps=1"])
    with pytest.raises(ConfigError, match=r"^unknown key zzzz$"):
        load_config(None, ["zzzz=1"])


def test_wrong_type_names_expected_type():
    with pytest.raises(ConfigError, match=r"^train.batch_size: expected int, got str 'many'$"):
        load_config(None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match=r"checkpoint.resume: expected str or null"):
        load_config(None, ["checkpoint.resume=3"])
    with pytest.raises(ConfigError, match=r"optim.betas\[1\]: expected float"):
        load_config(None, ["optim.betas=[0.9, x]"])


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"^config file not found: {missing}$"):
        load_config(missing)
    with pytest.raises(ConfigError, match="config file not found: .*gone.yaml"):
        load_config(write(tmp_path / "c.yaml", "_base_: gone.yaml\n"))


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="has no value"):
        load_config(None, ["--train.steps"])
    with pytest.raises(ConfigError, match="cannot read override 'steps'"):
        load_config(None, ["steps"])


def test_round_trip_is_identical(tmp_path):
    cfg = load_config(
        None, ["seed=3", "model.config={depth: 2, patch_size: [1, 2, 2]}", "validation.prompts=[a, b]"]
    )
    path = tmp_path / "resolved.yaml"
    dump_yaml(cfg, path)
    assert load_config(path) == cfg
    assert apply_overrides(cfg, ["seed=4"]).seed == 4


def test_manifest_relative_to_config_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.parquet").write_bytes(b"")
    cfg = load_config(write(tmp_path / "c.yaml", "data: {manifest: data/m.parquet}\n"))
    assert Path(cfg.data.manifest) == tmp_path / "data" / "m.parquet"


def test_yaml_boolean_words_of_string_options(tmp_path):
    """YAML 1.1 reads `no` and `off` as false: string options whose word that was take it back; any other
    string option says to quote the value."""
    cfg = load_config(
        write(tmp_path / "c.yaml", "train: {mixed_precision: no}\ndata: {caption_aesthetic: off}\n")
    )
    assert (cfg.train.mixed_precision, cfg.data.caption_aesthetic) == ("no", "off")
    assert load_config(None, ["train.mixed_precision=no", "--data.caption_aesthetic", "off"]) == cfg
    with pytest.raises(ConfigError, match=r"^parallel.mixed_precision: YAML reads no/off/false as the boolean "
                                          r"false; quote the value \(e.g. mixed_precision: 'no'\)$"):  # fmt: skip
        load_config(write(tmp_path / "d.yaml", "parallel: {mixed_precision: off}\n"))
    with pytest.raises(ConfigError, match=r"^data.frame_policy: YAML reads yes/on/true as the boolean true"):
        load_config(None, ["data.frame_policy=on"])  # a str-or-null option
    path = tmp_path / "resolved.yaml"
    dump_yaml(cfg, path)  # written quoted, read back as the word
    assert load_config(path) == cfg


def test_shift_accepts_auto_and_numbers(tmp_path):
    from frameloom.errors import FrameloomError
    from frameloom.objectives import build_objective

    cfg = load_config(write(tmp_path / "c.yaml", "objective: {shift: auto}\n"))
    assert cfg.objective.shift == "auto" and build_objective(cfg).shift == "auto"
    assert load_config(None, ["objective.shift=3"]).objective.shift == 3.0
    with pytest.raises(FrameloomError, match="shift must be a positive number or 'auto', got 'fast'"):
        build_objective(load_config(None, ["objective.shift=fast"]))


def test_backend_choice():
    from frameloom.parallel.env import default_backend

    assert default_backend("cpu") == "gloo" and default_backend("cpu", cpu_collectives=True) == "gloo"
    assert default_backend("cuda") == "nccl"
    assert default_backend("cuda", cpu_collectives=True) == "cuda:nccl,cpu:gloo"  # FSDP CPU offload
