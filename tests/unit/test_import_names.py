"""No project folder may shadow an installed package when commands run from the repository root.

Python puts the current folder first on ``sys.path`` for ``python -c``, ``python -m`` and
pytest. transformers 5.25 imports Hugging Face's ``kernels`` package; a top-level
``kernels/__init__.py`` in the repository made every modeling import fail from the root.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_pypi_kernels_and_transformers_import_from_repository_root():
    code = ("import kernels, transformers.models.llama.modeling_llama, "
            "transformers.models.qwen3_moe.modeling_qwen3_moe, mswift.kernels\n"
            "print(kernels.__file__, hasattr(kernels, 'get_kernel'))\n"
            "print(mswift.kernels.varlen_attention.__module__)")
    proc = _run_from_root(code)
    assert proc.returncode == 0, proc.stderr
    kernels_file, has_get_kernel, attention_module = proc.stdout.split()
    assert not Path(kernels_file).resolve().is_relative_to(REPO / "kernels"), kernels_file
    assert has_get_kernel == "True"  # Hugging Face's kernels package, not a namespace stand-in
    assert attention_module.startswith("mswift.kernels.attention")


def test_project_command_runs_from_repository_root():
    proc = subprocess.run([sys.executable, "-m", "mswift", "env"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "transformers" in proc.stdout


@pytest.mark.parametrize("folder", sorted(p.name for p in REPO.iterdir()
                                          if p.is_dir() and not p.name.startswith(".")))
def test_top_level_folders_are_not_packages(folder):
    # Only mswift/ is a package; any other top-level folder with an __init__.py would import
    # under its own name from the root (kernels, docker, examples, benchmarks are PyPI names).
    if folder in ("mswift", "build") or folder.endswith(".egg-info"):
        return
    assert not (REPO / folder / "__init__.py").exists(), (
        f"{folder}/__init__.py makes the folder importable as {folder!r} from the repository "
        "root; install its code under mswift.* instead")
