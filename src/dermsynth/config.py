"""Typed dataclass configs: YAML sets the values, ``--set a.b=c`` overrides them, the resolved config is saved.

Every stage has a dataclass config (defined next to the stage). This module only knows how to turn YAML / dotted
overrides into those dataclasses with type checks, and back into YAML. Unknown keys are errors that list the valid
ones, because a typo that silently keeps a default is the worst kind of bug in an experiment.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from dermsynth.io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key that does not fit the dataclass schema."""


# ----------------------------------------------------------------------------------------------------------------------
# Coercion of one value to one annotated type
# ----------------------------------------------------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}: " + "; ".join(errors))
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    # get_origin(typing.Sequence[int]) is collections.abc.Sequence
    if origin in (list, collections.abc.Sequence) or tp in (list, Sequence, collections.abc.Sequence):
        if isinstance(value, str):
            # "df,vasc,mel" on the command line is a list of strings
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (arg,) = get_args(tp) or (Any,)
        return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)  # an item of "--set sizes=3,4" arrives as the string "3"
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from a (possibly partial) mapping; missing keys keep their defaults."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        loc = f" in '{where}'" if where else ""
        raise ConfigError(f"unknown config key(s) {unknown}{loc}; valid keys: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def read_saved(cls: type[T], data: dict, source: str | Path) -> T:
    """A config saved beside a run, read through ``cls``: a field the file lacks takes its default (the run predates
    it); a key ``cls`` no longer has is refused with the file named, since the run was made by another release."""
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}. This run was saved by a dermsynth release whose settings differ from this "
                          "one; continue it with that release, or start a new run") from e


def to_dict(cfg: Any) -> dict:
    """Plain-YAML-able dict of a dataclass config (tuples become lists, Paths strings)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def _fields(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every field of a nested dataclass config by its dotted name; a mapping or list field is one value."""
    if not dataclasses.is_dataclass(cfg):
        return {prefix: to_dict(cfg)}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        out.update(_fields(getattr(cfg, f.name), f"{prefix}.{f.name}" if prefix else f.name))
    return out


def config_diff(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """The dotted fields whose values differ between two configs of one dataclass, as (old, new), sorted by name."""
    a, b = _fields(old), _fields(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def changed_fields(cfg: Any) -> Any:
    """Like :func:`to_dict`, but each dataclass keeps only the fields that differ from their defaults.

    Why: a hash of this view stays the same when a release adds a config field whose default keeps the old
    behaviour, so finished work is not redone after an upgrade. Plain dicts and lists are kept whole.
    """
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if v != _default_of(f):
                out[f.name] = changed_fields(v)
        return out
    if isinstance(cfg, (list, tuple)):
        return [changed_fields(x) for x in cfg]
    if isinstance(cfg, dict):
        return {k: changed_fields(x) for k, x in cfg.items()}
    return str(cfg) if isinstance(cfg, Path) else cfg


# ----------------------------------------------------------------------------------------------------------------------
# Overrides and files
# ----------------------------------------------------------------------------------------------------------------------

def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{p}' is not a section")
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=c`` -> ("a.b", parsed c). Values are read as YAML scalars so ``1e-3``, ``true``, ``[1,2]`` work."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file; a missing file, bad YAML or a non-mapping is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return loaded


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls`` <- YAML file at ``path`` <- ``overrides`` (``a.b=c`` strings), all type-checked."""
    data: dict = read_yaml(path) if path is not None else {}
    try:  # validates the file alone first: errors name the file and its keys
        merged = to_dict(from_dict(cls, data))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    for item in overrides:
        key, value = parse_override(item)
        _check_key(cls, key)
        _set_dotted(merged, key, value)
    try:
        return from_dict(cls, merged)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _check_key(cls: type, key: str) -> None:
    tp: Any = cls
    for i, part in enumerate(key.split(".")):
        if not dataclasses.is_dataclass(tp):
            if get_origin(tp) is dict or tp is dict:
                return  # free-form mapping: any key
            raise ConfigError(f"--set {key}: '{'.'.join(key.split('.')[:i])}' has no sub-keys")
        names = [f.name for f in dataclasses.fields(tp)]
        if part not in names:
            prefix = ".".join(key.split(".")[:i])
            raise ConfigError(f"--set {key}: unknown key '{part}'{' in ' + prefix if prefix else ''}; valid keys: {names}")
        tp = get_type_hints(tp)[part]
        if get_origin(tp) in (Union, types.UnionType):
            non_none = [a for a in get_args(tp) if a is not type(None)]
            tp = non_none[0] if len(non_none) == 1 else tp


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config atomically as YAML (the run's ``config.yaml``)."""
    return atomic_write_text(path, dump_config(cfg))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config's resolved values (used to decide whether a finished unit is still valid)."""
    import hashlib

    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]
