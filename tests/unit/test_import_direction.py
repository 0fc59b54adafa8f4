"""Imports run one way through mswift's layers: config -> runtime -> models -> bridge -> data ->
train -> export (DESIGN.md, "The house"). A module may import its own layer and the layers
before it, never a later one: ``models`` knows nothing of checkpoint files or training, the
bridge nothing of the driver. Every import is read from the source with ``ast``, including
those inside functions (imported on use), so a late import cannot hide a backward one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mswift"
LAYERS = ("config", "runtime", "models", "bridge", "data", "train", "export")
# Backward imports not yet moved: (module, what it imports) -> why it is there. None today.
KNOWN: dict[tuple[str, str], str] = {}


def _imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, a module under ``root``."""
    package = ".".join(("mswift",) + path.relative_to(root).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base == "mswift":  # `from mswift import bridge`: the subpackages named
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, base))
    return found


def _backward_imports(layer: str, root: Path = PACKAGE) -> list[str]:
    later = LAYERS[LAYERS.index(layer) + 1:]
    problems = []
    for path in sorted((root / layer).rglob("*.py")):
        for line, module in _imported_modules(path, root):
            parts = module.split(".")
            known = (str(path.relative_to(root.parent)), module) in KNOWN
            if parts[0] == "mswift" and len(parts) > 1 and parts[1] in later and not known:
                problems.append(f"{path.relative_to(root.parent)}:{line} imports {module}")
    return problems


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if (PACKAGE / layer).is_dir()])
def test_layer_imports_no_later_layer(layer):
    assert _backward_imports(layer) == []


def test_models_import_neither_bridge_train_nor_data():
    # The case the layer order exists for, spelled out: the weight-map schema and config.json
    # reading live in models/, the files in bridge/.
    imported = {module for path in (PACKAGE / "models").rglob("*.py")
                for _, module in _imported_modules(path)}
    assert imported, "no imports found under mswift/models: the scan is broken"
    assert not {m for m in imported if m.split(".")[:2] in (
        ["mswift", "bridge"], ["mswift", "train"], ["mswift", "data"])}


def test_scan_finds_backward_imports_of_every_form(tmp_path):
    # The scan itself: each import form a module can use is seen (a missed form would let the
    # tests above pass on a backward import).
    fake = tmp_path / "mswift"
    (fake / "models" / "sub").mkdir(parents=True)
    (fake / "models" / "a.py").write_text(
        "import mswift.bridge.hf_io\n"
        "from mswift import train\n"
        "def f():\n    from mswift.data.packing import pack_samples\n")
    (fake / "models" / "sub" / "b.py").write_text("from ...bridge import errors\n"
                                                   "from ..registry import dims_for\n")
    assert _backward_imports("models", fake) == [
        "mswift/models/a.py:1 imports mswift.bridge.hf_io",
        "mswift/models/a.py:2 imports mswift.train",
        "mswift/models/a.py:4 imports mswift.data.packing",
        "mswift/models/sub/b.py:1 imports mswift.bridge",
    ]
