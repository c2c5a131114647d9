"""Typed configuration: dataclasses loaded from YAML plus ``key=value`` overrides.

Every job (embed, train, export) has one dataclass config. Users write a YAML file (local or
any fsspec URI) and override single fields on the command line with ``--set a.b=value``.
Unknown keys are an error that names them, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from care_scale.exceptions import ConfigError

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the annotated type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, vt = get_args(tp) or (Any, Any)
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, coercing types and rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        if isinstance(value, dict) and _is_dataclass_type(hints[name]):
            # Over the field's own default, not the nested class's: `--set
            # slide_encoder.checkpoint=X` keeps the slide encoder's default name.
            value = merge_trees(_default_tree(fields[name]), value)
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    try:
        obj = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def _default_tree(f: dataclasses.Field) -> dict[str, Any]:
    """The default of a dataclass-typed field as a mapping of its init fields ({} if none)."""
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:
        return {}
    if not dataclasses.is_dataclass(default):
        return {}
    tree = dataclasses.asdict(default)  # nested dataclasses become mappings too
    return {g.name: tree[g.name] for g in dataclasses.fields(default) if g.init}


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain dict of a config dataclass (YAML/JSON-serialisable)."""
    return dataclasses.asdict(obj)


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {pair!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with another override")
        node[parts[-1]] = value
    return tree


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``; nested dicts merge key by key instead of replacing."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_trees(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URI."""
    import fsspec

    try:
        with fsspec.open(uri, "r", **(storage_options or {})) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {uri} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {uri} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri} must hold a mapping, not {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path``, updated by ``overrides``."""
    data: dict[str, Any] = read_yaml(path, storage_options) if path else {}
    if isinstance(overrides, dict):
        extra = overrides
    else:
        extra = parse_overrides(overrides)
    return from_dict(cls, merge_trees(data, extra))
