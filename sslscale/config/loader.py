"""Reading a config: YAML files (with `base:` chains), `a.b=value` overrides, and the coercion of every value
to its field's type. Everything is checked before a run starts: unknown keys, wrong types and impossible
values are collected into one ConfigError whose lines name the key, the bad value and what is valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing

import yaml

from sslscale.config.errors import ConfigError
from sslscale.config.tree import Config, validate


def load_config(path: str | None = None, overrides: list[str] = (), *, check: bool = True) -> Config:
    """YAML file (optional) + `a.b=value` overrides -> a validated Config."""
    raw = read_config_file(path) if path is not None else {}
    problems: list[str] = []
    for item in overrides:
        problems += apply_override(raw, item)
    if problems:
        raise ConfigError(problems)
    return config_from_dict(raw, check=check)


# A config is a few kilobytes; the limits stop a huge file, or a few lines of nested aliases (a "billion
# laughs") that expand to millions of values, before any of it is built or printed in an error message.
MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_VALUES = 100_000


def load_yaml(text: str, what: str):
    """yaml.safe_load, refusing a document whose aliases expand to more than MAX_CONFIG_VALUES values."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_CONFIG_VALUES:
            raise ConfigError([f"{what}: its aliases expand to more than {MAX_CONFIG_VALUES:,} values; refused"])
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict) -> int:
    """Values in a YAML node with every alias expanded, counted once per distinct node (memoised)."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a node that contains itself counts once
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, sizes) for item in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


BASE_KEY = "base"  # a recipe may start from another one: `base: other.yaml`, relative to its own folder


def read_config_file(path: str, _children: tuple[str, ...] = ()) -> dict:
    """A YAML recipe as a dict, with its `base:` chain merged in (the file's own values win; sections
    merge key by key, lists and values are replaced whole)."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ConfigError([f"config file {path} is {os.path.getsize(path):,} bytes; a config is at most "
                               f"{MAX_CONFIG_BYTES:,} (is it the right file?)"])
        with open(path) as f:
            raw = load_yaml(f.read(), f"config file {path}") or {}
    except FileNotFoundError:
        where = f" (the base of {_children[-1]})" if _children else ""
        raise ConfigError([f"config file {path} does not exist{where}"]) from None
    except IsADirectoryError:
        raise ConfigError([f"config file {path} is a folder; give a YAML file in it, e.g. {path}/quickstart.yaml"]
                          ) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config file {path} is not a text file (binary content)"]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"config file {path} is not valid YAML: {error}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"config file {path}: the top level must be a mapping of sections"])
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError([f"config file {path}: {BASE_KEY}: expected the path of another config, got {base!r}"])
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    chain = (*_children, os.path.normpath(path))
    if base_path in chain:
        raise ConfigError([f"config file {path}: {BASE_KEY}: {base} leads back to itself ({' -> '.join(chain)})"])
    return merge_sections(read_config_file(base_path, chain), raw)


def merge_sections(base: dict, own: dict) -> dict:
    merged = dict(base)
    for key, value in own.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(raw: dict, *, check: bool = True) -> Config:
    problems: list[str] = []
    config = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    if check:
        problems = validate(config)
        if problems:
            raise ConfigError(problems)
    return config


def apply_override(raw: dict, item: str) -> list[str]:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        return [f"override {item!r}: expected key=value, e.g. optim.base_lr=0.5"]
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        return [f"override {item!r}: empty key component"]
    try:
        value = load_yaml(text, f"override {item!r}") if text.strip() else ""
    except yaml.YAMLError as error:
        return [f"override {item!r}: the value is not valid YAML ({str(error).splitlines()[0]}); quote it whole "
                "in the shell, e.g. 'data.crops=[{size: 8, count: 2}]'"]
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return [f"override {item!r}: {'.'.join(parts[:depth + 1])} is not an index of the list"]
            node = node[int(part)]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            return [f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a section"]
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            return [f"override {item!r}: {last} is not an index of the list"]
        node[int(last)] = value
    else:
        node[last] = value
    return []


def _build(cls, raw, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(f"unknown key {prefix}{key}{hint}; valid keys here: {', '.join(names)}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], f"{prefix}{name}", problems)
    try:
        return cls(**values)
    except TypeError as error:  # only reachable if coercion let something odd through
        problems.append(f"{prefix.rstrip('.')}: {error}")
        return cls()


def _coerce(value, hint, key: str, problems: list[str]):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, problems)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", problems)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return []
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
            return tuple(0.0 for _ in args)
        return tuple(_coerce(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if math.isfinite(number):
                return number
            problems.append(f"{key}: {value!r} is not a finite number")  # .inf overflows every step count
            return 0.0
    elif hint is str:
        if isinstance(value, str):
            return value
    problems.append(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value
