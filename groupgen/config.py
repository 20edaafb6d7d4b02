"""One config mechanism for every stage: dataclasses + YAML + dotted ``key=value`` overrides.

A config is a (nested) dataclass with defaults. ``load_config(Cls, yaml_path, ["a.b=3"])`` reads the
YAML file, applies the overrides, checks every key and type, and returns a ``Cls`` instance. Unknown
keys and wrong types raise ``ConfigError`` naming the key and the closest valid ones.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the config schema."""


def _hint(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(repr(c) for c in close)}?"
    return f"valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to type ``tp`` or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: value {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section left empty in the YAML file (all keys commented out): defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _from_dict(cls: type[T], data: dict, where: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; {_hint(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def _set_dotted(tree: dict, dotted: str, raw: str, cls: type) -> None:
    """Store the override text ``raw`` at ``dotted`` in ``tree``: as written for ``str`` fields (YAML
    would turn ``0123`` into 83 and ``1_000`` into 1000), else parsed as YAML."""
    parts = dotted.split(".")
    node, node_cls = tree, cls
    for i, p in enumerate(parts):
        path = ".".join(parts[: i + 1])
        names = [f.name for f in dataclasses.fields(node_cls)]
        if p not in names:
            raise ConfigError(f"unknown config key {path!r}; {_hint(p, names)}")
        tp = typing.get_type_hints(node_cls)[p]
        if i == len(parts) - 1:
            quoted = raw.strip()[:1] in ("'", '"')  # name="a b" still drops its quotes
            node[p] = raw if tp is str and not quoted else _yaml_value(raw)
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key {path!r} is not a section")
        child = node.get(p)
        if child is None:  # a section left empty in the YAML file loads as None
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"config section {path!r}: expected a mapping, got {type(child).__name__} {child!r}")
        node, node_cls = child, tp


def parse_overrides(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    return out


def _yaml_value(v: str) -> Any:
    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping, got {type(tree).__name__}")
    try:
        for key, raw in parse_overrides(overrides or []):
            _set_dotted(tree, key, raw, cls)
        return _from_dict(cls, tree)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from None
        raise


def from_dict(cls: type[T], data: dict) -> T:
    return _from_dict(cls, data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def with_defaults(saved: Any, defaults: Any) -> Any:
    """``saved`` (a config dict read back from a checkpoint or a record) with every field it predates set
    to its value in ``defaults``: a field added later defaults to the old behaviour, so what was saved
    before it still matches a config that leaves it at its default."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    out = {k: with_defaults(v, defaults.get(k)) for k, v in saved.items()}
    for k, v in defaults.items():
        out.setdefault(k, v)
    return out


def added_field(*, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING):
    """A config field added after results were cached under ``config_hash``: at its default (which must be
    the old behaviour) it is left out of the hash, so every cached stage keyed before it stays valid; set
    to anything else it is hashed like any field."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"added_later": True})


def key_view(obj: Any) -> Any:
    """What ``config_hash`` hashes: dataclasses as dicts (inside dicts and lists too), without the
    ``added_field`` fields that sit at their defaults."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.metadata.get("added_later"):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                if v == default:
                    continue
            out[f.name] = key_view(v)
        return out
    if isinstance(obj, dict):
        return {k: key_view(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [key_view(v) for v in obj]
    return obj


def config_hash(cfg: Any, n: int = 12) -> str:
    """A stable short hash of a config (or a dict that may hold configs), used to key cached pipeline stages."""
    blob = json.dumps(key_view(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
