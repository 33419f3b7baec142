"""Typed dataclass configs loaded from YAML with ``key=value`` overrides.

One mechanism for every config in the project: the experiment schema (``scan.config``) and the
extraction job's (``cluster``) are plain dataclasses; this module fills them from YAML mappings,
applies dotted overrides such as ``optim.lr=5e-4`` and checks every value against its annotation,
so an error names the key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from dataio import storage

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; ``key``: the dotted key at fault,
    when one is."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        return f"a list of {_describe(inner)}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Returns ``value`` converted to type ``tp`` or raises ConfigError naming ``key``."""
    origin = get_origin(tp)
    bad = ConfigError(f"config key '{key}': {value!r} is not allowed; expected {_describe(tp)}", key)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, prefix=key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # `lr_update=15` means [15]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Builds dataclass ``cls`` from a (nested) mapping; unknown keys are errors."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys here: {', '.join(sorted(names))}",
            prefix + unknown[0])
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


@dataclasses.dataclass(frozen=True)
class Key:
    """One leaf key of a schema, for help texts and config templates."""
    name: str  # dotted, e.g. "source.karpathy"
    default: Any  # dataclasses.MISSING when the field has none
    allowed: str  # what the loader accepts, e.g. "int or null"
    help: str  # the field's metadata["help"], or ""


def keys(cls: type, prefix: str = "") -> list[Key]:
    """Every leaf key of dataclass ``cls`` in field order, nested dataclasses expanded."""
    hints = get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += keys(tp, prefix + f.name + ".")
            continue
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else dataclasses.MISSING)
        out.append(Key(prefix + f.name, default, _describe(tp), f.metadata.get("help", "")))
    return out


def apply_override(data: dict[str, Any], override: str) -> str:
    """Applies one ``a.b.c=value`` override to a nested mapping in place (value parsed as YAML);
    returns its dotted key."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value (e.g. optim.lr=5e-4)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value {raw!r} is not valid YAML "
                          f"({getattr(err, 'problem', None) or err})", key) from None
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section", key)
        node = child
    node[parts[-1]] = value
    return key


BASE_KEY = "base"  # a config file may start from another: `base: demo.yaml` (relative to itself)


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a config file, over the mapping of its ``base`` file when it names one
    (deep-merged: a section's keys not set here keep the base's values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:  # a stream: the parser's marks name the file
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: key '{BASE_KEY}' must name a config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"config file {path}: '{BASE_KEY}: {base}' makes a cycle")
    return _deep_merge(read_yaml(base_path, (*_seen, path.resolve())), data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (_deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Loads ``cls`` from an optional YAML file, then applies ``key=value`` overrides in order."""
    data = read_yaml(path) if path else {}
    given: list[tuple[str, str]] = []  # (dotted key, override) of the command line, in order
    for override in overrides:
        try:
            given.append((apply_override(data, override), override))
        except ConfigError as err:
            raise ConfigError(f"command-line {err}", err.key) from None  # "override 'k=v': ..."
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        culprit = _override_of(err, given)
        if culprit:  # the command line's value, not the file's, is at fault
            raise ConfigError(f"command-line override {culprit!r}: {err}", err.key) from None
        if path:
            raise ConfigError(f"{path}: {err}", err.key) from None
        raise


_NAMED_KEY = re.compile(r"config key '([^']+)'")


def _override_of(err: ConfigError, given: list[tuple[str, str]]) -> str | None:
    """The last override that set the key ``err`` is about (or its section, or a key inside it)."""
    named = err.key or next(iter(_NAMED_KEY.findall(str(err))), None)
    if not named:
        return None
    named = re.sub(r"\[\d+\]", "", named)  # optim.lr_update[0] -> optim.lr_update
    for key, override in reversed(given):
        if key == named or named.startswith(key + ".") or key.startswith(named + "."):
            return override
    return None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """``line L, column C: <problem>`` of a parser error (PyYAML's text names no file for a string)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def save(obj: Any, path: str | Path) -> None:
    """Writes a config as YAML atomically (temporary file, then rename)."""
    storage.write_text_atomic(path, yaml.safe_dump(to_dict(obj), sort_keys=False))
