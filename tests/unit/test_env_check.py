"""``mswift env --check`` (the GPU image's health check) as a user runs it on a machine
without a GPU: it names what is absent and fails, unless ``--cpu-ok``; the tiny megatron-core
forward pass really runs (here on the CPU layer)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="checks the behaviour on a machine without a GPU")


def _check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mswift", "env", "--check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _lines(out: str) -> dict[str, str]:
    """``{part: status}`` from the check's ``status part: detail`` lines."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition(" ")
        if ":" in rest and status in ("ok", "absent", "FAIL"):
            found[rest.strip().split(":")[0]] = status
    return found


def test_without_a_gpu_the_check_fails_naming_cuda_nccl_and_te():
    proc = _check()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    parts = _lines(proc.stdout)
    assert parts == {"megatron-core": "ok", "Triton": "ok", "CUDA": "FAIL", "NCCL": "FAIL",
                     "Transformer Engine": "FAIL", "GPT forward": "ok"}, proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert last == ("mswift env --check: FAILED: CUDA, NCCL, Transformer Engine "
                    "(on a machine without a GPU: --cpu-ok)"), proc.stdout


def test_cpu_ok_accepts_their_absence_and_runs_the_forward_on_the_cpu():
    proc = _check("--cpu-ok")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = _lines(proc.stdout)
    assert parts["CUDA"] == parts["NCCL"] == parts["Transformer Engine"] == "absent", proc.stdout
    # vocabulary 300 padded to 384 by the builder; fp32 without a GPU
    assert "ok     GPT forward: logits (2, 64, 384) float32 on cpu" in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("mswift env --check: all checks passed")


def test_a_megatron_core_that_does_not_import_is_named(tmp_path):
    broken = tmp_path / "megatron" / "core"
    broken.mkdir(parents=True)
    (broken.parent / "__init__.py").write_text("")
    (broken / "__init__.py").write_text("raise ImportError('libfoo.so: cannot open')\n")
    proc = _check("--cpu-ok", env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL   megatron-core: does not import: ImportError: libfoo.so: cannot open" \
        in proc.stdout, proc.stdout
    assert proc.stdout.strip().endswith("FAILED: megatron-core, GPT forward"), proc.stdout


def test_cpu_ok_needs_check():
    proc = subprocess.run([sys.executable, "-m", "mswift", "env", "--cpu-ok"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cpu-ok goes with --check" in proc.stderr, proc.stderr
