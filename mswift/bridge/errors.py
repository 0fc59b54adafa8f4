"""The error a user's input to the bridge can cause (bad files, unsupported models, layouts)."""
from __future__ import annotations


class BridgeError(ValueError):
    """A checkpoint, model or layout the bridge cannot convert; lists every problem found.

    Each problem names the file, tensor or setting and what was expected, so one run shows
    everything to fix.
    """

    MAX_SHOWN = 25

    def __init__(self, problems: list[str] | str, headline: str = "cannot convert"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.headline = headline
        shown = self.problems[: self.MAX_SHOWN]
        more = len(self.problems) - len(shown)
        lines = shown + ([f"... and {more} more"] if more > 0 else [])
        if len(lines) == 1:
            super().__init__(f"{headline}: {lines[0]}")
        else:
            super().__init__(f"{headline}:\n  - " + "\n  - ".join(lines))
