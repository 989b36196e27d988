"""YAML configs with `_base_` inheritance and dotted overrides, turned into the typed `Config`.

Rules (DESIGN.md, "Overrides"):
- A YAML file may list `_base_: [a.yaml, b.yaml]` (paths relative to that file); bases merge left to right,
  then the file itself merges on top. Mappings merge key by key; a mapping carrying `_delete_: true`
  replaces what it merges onto instead (Open-Sora's rule).
- Overrides: `key.sub=value` or `--key.sub value` (or `--key.sub=value`); values are parsed as YAML scalars
  or flow collections (`3`, `1e-4`, `null`, `[1, 2]`).
- Unknown keys are an error naming the closest valid key; a wrong type names the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from frameloom.config.schema import FREEFORM, YAML_BOOL_WORDS, Config
from frameloom.errors import FrameloomError


class ConfigError(FrameloomError):
    """A config that cannot be loaded: missing file, unknown key, wrong type, bad override."""


# ---------------------------------------------------------------- YAML files and merging


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `top` onto `base`; nested mappings merge unless `top`'s has `_delete_: true`."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping):
            value = dict(value)
            replace = bool(value.pop("_delete_", False))
            if not replace and isinstance(out.get(key), Mapping):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = deep_merge({}, value)  # strips nested _delete_ markers
        else:
            out[key] = value
    return out


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML config, resolving its `_base_` files recursively."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"config _base_ cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_seen, resolved)))
    return deep_merge(merged, data)


# ---------------------------------------------------------------- overrides


def parse_overrides(args: Sequence[str]) -> dict[str, Any]:
    """`['a.b=1', '--c.d', 'x', '--e=2']` -> nested dict `{'a': {'b': 1}, 'c': {'d': 'x'}, 'e': 2}`."""
    flat: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, _, value = body.partition("=")
            else:
                if i + 1 >= len(args):
                    raise ConfigError(f"override {arg} has no value")
                key, value = body, args[i + 1]
                i += 1
        elif "=" in arg:
            key, _, value = arg.partition("=")
        else:
            raise ConfigError(f"cannot read override {arg!r}: use key.sub=value or --key.sub value")
        if not key:
            raise ConfigError(f"override {arg!r} has an empty key")
        flat.append((key, value))
        i += 1
    nested: dict[str, Any] = {}
    for key, text in flat:
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            value = text
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key} conflicts with an earlier override")
        node[parts[-1]] = value
    return nested


# ---------------------------------------------------------------- typed conversion


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys += valid_keys(hints[f.name], name + ".")
    return keys


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"unknown key {key}{hint}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (coercing int -> float and tuple -> list)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(tp)
            return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str and isinstance(value, bool) and value in YAML_BOOL_WORDS.get(key, {}):
        return YAML_BOOL_WORDS[key][value]  # YAML 1.1 read the word (`no`, `off`) as a boolean
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    if isinstance(value, bool) and _accepts_str(tp):
        word = "no/off/false" if not value else "yes/on/true"
        raise ConfigError(
            f"{key}: YAML reads {word} as the boolean {str(value).lower()}; quote the value "
            f"(e.g. {key.rsplit('.', 1)[-1]}: '{'no' if not value else 'yes'}')"
        )
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _accepts_str(tp: Any) -> bool:
    """True when the annotation `tp` admits a string (str, or a union with str)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return tp is str


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Turn a nested mapping into the dataclass `cls`, validating keys and types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key))
    kwargs = {}
    for key, value in data.items():
        tp, dotted = hints[key], prefix + key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value if value is not None else {}, dotted + ".")
        elif dotted in FREEFORM:
            kwargs[key] = _convert(value if value is not None else {}, tp, dotted)
        else:
            kwargs[key] = _convert(value, tp, dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts/lists (what `dump_yaml` writes)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: str | Path | None = None) -> str:
    """YAML text of the resolved config; written to `path` if given. `load_config(path)` reads it back equal."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with `_base_`), apply overrides, and return the validated `Config`.

    `data.manifest` and `data.extra_roots` given relative in a file are taken relative to that file's folder,
    so configs can sit beside their data; relative paths given in overrides stay relative to the working
    directory.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = load_yaml_tree(path)
        manifest = (data.get("data") or {}).get("manifest")
        if isinstance(manifest, str) and not Path(manifest).is_absolute():
            candidate = Path(path).parent / manifest
            if candidate.exists() or not Path(manifest).exists():
                data["data"]["manifest"] = str(candidate)
        roots = (data.get("data") or {}).get("extra_roots")
        if isinstance(roots, list):  # data.extra_roots given relative in a file: from the file's folder
            data["data"]["extra_roots"] = [
                str(Path(path).parent / r)
                if isinstance(r, str) and not Path(r).expanduser().is_absolute()
                else r
                for r in roots
            ]
    data = deep_merge(data, parse_overrides(overrides))
    return build(Config, data)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new config with the overrides applied on top of `cfg`."""
    return build(Config, deep_merge(to_dict(cfg), parse_overrides(overrides)))
