"""Reading a run config: YAML files and dicts, ``--set key=value`` overrides, type checks; and writing it back.

Keys are checked against the schema as they are read: an unknown key names the closest valid one, a value of the
wrong type names the expected type. :func:`load_config` then resolves the config (:mod:`.resolve`).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import ConfigError
from .resolve import resolve_config
from .schema import RunConfig

__all__ = ["apply_overrides", "config_from_dict", "dump_config", "load_config"]


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int accepted for float); raise ConfigError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {value!r}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {value!r}.")
        return [_coerce(v, args[0], key) for v in value]
    if tp is float and isinstance(value, str):
        value = _yaml_float(value)
    scalar_ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if scalar_ok.get(tp, False):
        return float(value) if tp is float else value
    raise ConfigError(f"Config key '{key}' must be {_type_name(tp)}, got {value!r}.")


def _yaml_float(text: str) -> float | str:
    """PyYAML reads ``1e-3`` (no dot) as a string; accept it as a number."""
    try:
        return float(text)
    except ValueError:
        return text


def _unknown_key(prefix: str, name: str, valid: Iterable[str]) -> ConfigError:
    """The error for ``name`` not among the ``valid`` keys of section ``prefix`` (``""`` or ending in a dot)."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; valid keys here: {', '.join(valid)}"
    return ConfigError(f"Unknown config key '{prefix}{name}'{hint}.")


def _from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config section '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix, str(key), names)
        tp = hints[key]
        kwargs[key] = _from_dict(tp, value, f"{prefix}{key}.") if is_dataclass(tp) else _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> RunConfig:
    """Build a (not yet resolved) :class:`RunConfig` from a nested dict, checking keys and types."""
    return _from_dict(RunConfig, data or {})


def _set_in(cfg: Any, parts: list[str], raw: Any, key: str) -> Any:
    names = [f.name for f in fields(cfg)]
    if parts[0] not in names:
        raise _unknown_key(key[: len(key) - len(".".join(parts))], parts[0], names)
    current = getattr(cfg, parts[0])
    if len(parts) > 1:
        if not is_dataclass(current):
            raise ConfigError(f"Config key '{'.'.join(key.split('.')[: -len(parts) + 1])}' has no sub-keys.")
        return replace(cfg, **{parts[0]: _set_in(current, parts[1:], raw, key)})
    tp = typing.get_type_hints(type(cfg))[parts[0]]
    value = _from_dict(tp, raw, key + ".") if is_dataclass(tp) else _coerce(raw, tp, key)
    return replace(cfg, **{parts[0]: value})


def apply_overrides(cfg: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """Apply ``key=value`` overrides; values are parsed as YAML (``1e-3``, ``true``, ``[1, 2]``, ``null``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like key=value, e.g. train.lr=0.01.")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            raw = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override '{item}': the value is not valid YAML ({exc.problem}).") from None
        cfg = _set_in(cfg, key.split("."), raw, key)
    return cfg


def load_config(source: str | Path | Mapping[str, Any] | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML file (or a dict), apply overrides and resolve derived values.

    Args:
        source: Path of a YAML file, a nested dict, or None for the defaults.
        overrides: ``key=value`` strings applied after the file.

    Returns:
        A validated, resolved :class:`RunConfig`.
    """
    if source is None or isinstance(source, Mapping):
        data = dict(source or {})
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"Config file '{path}' does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"Config file '{path}' is not valid YAML{where}.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"Config file '{path}' must contain a mapping of sections, got {type(data).__name__}.")
    return resolve_config(apply_overrides(config_from_dict(data), overrides))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
