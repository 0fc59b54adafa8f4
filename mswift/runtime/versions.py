"""The tested set of package versions (``constraints.txt``) and how an installation compares.

``constraints.txt`` at the repository root holds the exact versions the test suite last passed
with; the README's install commands pass it to pip (``-c constraints.txt``). A wheel carries a
copy as ``mswift/constraints.txt`` (setup.py), so ``mswift env`` can name every installed
package that is outside the tested set either way.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)")


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name (``Megatron_Core`` -> ``megatron-core``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def tested_constraints_path() -> Path | None:
    """``constraints.txt`` of this checkout, else the copy installed inside the package."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package.parent / "constraints.txt", package / "constraints.txt"):
        if candidate.is_file():
            return candidate
    return None


def read_constraints(path: str | Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line; other lines are refused."""
    pins: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = _PIN.match(text)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line.strip()!r}")
        pins[canonical_name(match.group(1))] = match.group(2)
    return pins


def _public(version: str) -> str:
    return version.split("+", 1)[0]  # torch 2.13.0+cpu is the tested torch 2.13.0


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def outside_tested_set(pins: dict[str, str]) -> list[tuple[str, str, str]]:
    """``(name, installed, tested)`` for each pinned package installed at another version."""
    found = []
    for name, tested in sorted(pins.items()):
        have = installed_version(name)
        if have is not None and _public(have) != _public(tested):
            found.append((name, have, tested))
    return found
