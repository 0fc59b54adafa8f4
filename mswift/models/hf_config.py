"""Reading an HF model's config.json: the file itself, then its values for one family.

:func:`read_hf_config` loads config.json with a clear error when it is missing or broken;
:class:`HFConfigReader` reads its values for a family's translation and collects every
unsupported feature, by name, to refuse them all at once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from mswift.models.errors import ModelError

_MISSING = object()


def read_hf_config(directory: str | Path) -> dict:
    """config.json of an HF model directory, with a clear error if it is missing or broken."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a directory (expected an HF model directory with "
                         "config.json and *.safetensors)")
    path = directory / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: not found (expected an HF model directory with config.json "
                         "and *.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object at the top level")
    return config


class HFConfigReader:
    """config.json values for one family, with every problem collected for one error."""

    def __init__(self, config: dict, family: str):
        self.config = config
        self.family = family
        self.problems: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key, default)
        return default if value is None else value

    def require(self, key: str, kind: type = int) -> Any:
        value = self.config.get(key, _MISSING)
        if value is _MISSING or value is None:
            self.problems.append(f"{key}: missing from config.json ({self.family} needs it)")
            return 1
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            self.problems.append(f"{key}={value!r}: expected a positive integer")
            return 1
        return value

    def refuse(self, key: str, value: Any, why: str) -> None:
        self.problems.append(f"{key}={value!r}: not supported by mswift's {self.family} "
                             f"bridge ({why})")

    def refuse_if(self, key: str, bad: Callable[[Any], bool], why: str, default=None) -> None:
        value = self.get(key, default)
        if bad(value):
            self.refuse(key, value, why)

    def raise_problems(self) -> None:
        if self.problems:
            raise ModelError(self.problems, headline=f"config.json of a {self.family} model")
