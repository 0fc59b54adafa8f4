"""The error an HF model can cause: a config.json, a model folder or weights mswift cannot use."""
from __future__ import annotations


class ModelError(ValueError):
    """An HF model mswift cannot use; lists every problem found.

    Each problem names the file, key or tensor and what was expected, so one run shows
    everything to fix. The bridge's ``BridgeError`` (a checkpoint or layout it cannot convert)
    is a kind of it: a command that reports a user's mistake catches this one.
    """

    MAX_SHOWN = 25

    def __init__(self, problems: list[str] | str, headline: str = "cannot use the model"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.headline = headline
        shown = self.problems[: self.MAX_SHOWN]
        more = len(self.problems) - len(shown)
        lines = shown + ([f"... and {more} more"] if more > 0 else [])
        if len(lines) == 1:
            super().__init__(f"{headline}: {lines[0]}")
        else:
            super().__init__(f"{headline}:\n  - " + "\n  - ".join(lines))
