"""Modules imported on first use, for code that must also run without paying for them.

``torch = lazy_module("torch")`` binds a stand-in whose first attribute access imports torch:
the checkpoint conversions that only move bytes (:mod:`mswift.bridge.byte_copy`) go through
modules that need torch on their other paths, and importing it takes longer than such a
conversion of a few GB.
"""
from __future__ import annotations

import importlib
import types


class _LazyModule(types.ModuleType):
    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)


def lazy_module(name: str) -> types.ModuleType:
    """A stand-in for module ``name``, imported when an attribute is first read."""
    return _LazyModule(name)
