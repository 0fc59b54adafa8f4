"""The error a user's input to the bridge can cause (bad files, unsupported models, layouts)."""
from __future__ import annotations

from mswift.models.errors import ModelError


class BridgeError(ModelError):
    """A checkpoint, model or layout the bridge cannot convert; lists every problem found
    (each naming the file, tensor or setting and what was expected)."""

    def __init__(self, problems: list[str] | str, headline: str = "cannot convert"):
        super().__init__(problems, headline)
