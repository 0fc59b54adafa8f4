"""Build a :class:`MswiftConfig` from a YAML file plus command-line overrides.

YAML may be flat (Megatron-LM style, ``tensor_model_parallel_size: 2``) or grouped by section
(``parallel: {tensor_model_parallel_size: 2}``). Overrides are ``key=value``,
``section.key=value`` or ``--key-name value``; values are parsed as YAML (``true``, ``1e-4``,
``[a, b]``). Unknown keys and values of the wrong type are all reported in one error.
"""
from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from mswift.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    MswiftConfig,
    ParallelConfig,
    TrainingConfig,
    field_doc,
)

SECTIONS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
}
# Flat key -> section. Field names are unique across sections (checked below).
KEY_SECTION = {f.name: name for name, cls in SECTIONS.items() for f in fields(cls)}
assert len(KEY_SECTION) == sum(len(fields(c)) for c in SECTIONS.values()), "duplicate field names"
# Other spellings users bring from elsewhere -> the setting's name here.
ALIASES = {"exit_duration_minutes": "exit_duration_in_mins", "max_length": "seq_length"}


def all_keys() -> list[str]:
    return sorted(KEY_SECTION)


def _default_text(f) -> str:
    value = f.default_factory() if f.default is MISSING else f.default
    return "None" if value is None else str(value)


def describe_settings() -> str:
    """Every setting by section: name, default, one-line description (``--list-settings``)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        rows = []
        for f in fields(cls):
            doc = field_doc(f)
            if f.metadata.get("choices"):
                doc += f" [{' | '.join(map(str, f.metadata['choices']))}]"
            rows.append((f.name, _default_text(f), doc))
        name_width = max(len(name) for name, _, _ in rows)
        default_width = max(len(default) for _, default, _ in rows)
        lines += [f"  {name:<{name_width}}  {default:<{default_width}}  {doc}"
                  for name, default, doc in rows]
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> MswiftConfig:
    """Read ``path`` (YAML, optional) and apply ``overrides``; raise ConfigError on any mistake."""
    problems: list[str] = []
    values: dict[str, dict] = {name: {} for name in SECTIONS}
    if path is not None:
        _collect(_read_yaml(Path(path)), values, problems, where=str(path))
    _collect(parse_overrides(overrides, problems), values, problems, where="command line")
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**values[name])
        except ConfigError as err:
            problems.extend(err.problems)
    if problems:
        raise ConfigError(problems)
    return MswiftConfig(**sections)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError([f"config file {path}: not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError([f"config file {path}: not valid YAML ({err})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {path}: expected a mapping of settings at the top level"])
    return data


def parse_overrides(argv: list[str], problems: list[str]) -> dict:
    """``['tp=2', '--lr', '1e-4', 'parallel.sequence_parallel=true']`` -> a flat/dotted dict."""
    out: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    problems.append(f"{arg}: expected a value after it")
                    break
                raw, i = argv[i + 1], i + 1
            key = key.replace("-", "_")
        elif "=" in arg:
            key, _, raw = arg.partition("=")
        else:
            problems.append(f"{arg!r}: expected key=value or --key value")
            i += 1
            continue
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        i += 1
    return out


def _collect(data: dict, values: dict, problems: list[str], where: str) -> None:
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _put(f"{key}.{sub_key}", sub_value, values, problems, where)
        else:
            _put(str(key), value, values, problems, where)


def _put(key: str, value, values: dict, problems: list[str], where: str) -> None:
    section, _, name = key.rpartition(".")
    name = ALIASES.get(name, name)
    if not section:
        section = KEY_SECTION.get(name, "")
    if section not in SECTIONS or name not in KEY_SECTION or KEY_SECTION[name] != section:
        near = difflib.get_close_matches(name, all_keys(), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        problems.append(f"{key} ({where}): unknown setting{hint}")
        return
    hint = typing.get_type_hints(SECTIONS[section])[name]
    try:
        values[section][name] = coerce(value, hint)
    except TypeError as err:
        problems.append(f"{name}={value!r} ({where}): expected {err}")


def coerce(value, hint):
    """Check/convert a parsed YAML value to the field's annotated type; TypeError says what."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return coerce(value, inner)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [coerce(item, args[0]) for item in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("a number")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError("a string")
    raise TypeError(f"a value of type {hint}")
