"""``mswift env``: installed versions against the tested set (constraints.txt)."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mswift.runtime.versions import read_constraints

REPO = Path(__file__).resolve().parents[2]


def _env(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "mswift", "env", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_version_outside_the_tested_set_is_named(tmp_path):
    torch_version = metadata.version("torch")
    pins = tmp_path / "constraints.txt"
    pins.write_text("torch==1.0.0\ntransformers==" + metadata.version("transformers") + "\n")
    out = _env("--constraints", str(pins))
    outside = out.split("\noutside the tested set", 1)[1]
    assert f"torch {torch_version} (tested: 1.0.0)" in outside
    assert "transformers" not in outside  # the installed transformers is the pinned one


def test_this_installation_is_the_tested_set():
    # The README's install commands pass -c constraints.txt, so nothing may differ here.
    out = _env()
    assert "every installed package of the tested set matches" in out, out


def test_constraints_pin_the_packages_mswift_depends_on():
    pins = read_constraints(REPO / "constraints.txt")
    for name in ("torch", "megatron-core", "transformers", "triton", "datasets", "safetensors",
                 "tokenizers", "huggingface-hub", "kernels"):
        assert name in pins, name


def test_a_malformed_constraints_line_names_file_and_line(tmp_path):
    pins = tmp_path / "c.txt"
    pins.write_text("# tested\ntorch>=2.0\n")
    with pytest.raises(ValueError, match=r"c\.txt:2: expected 'name==version'"):
        read_constraints(pins)
