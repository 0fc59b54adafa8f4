"""benchmarks/gpu_check.sh, the prepared device check, in its dry run: every command it would
run on a GPU parses here (files compile, --help works, every training run's settings pass the
config loader and pre-start checks, pytest collects the gpu tests), and it says so."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_dry_run_checks_every_command_and_writes_the_report(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "DRY RUN" in report
    for step in ("install", "compile", "attention-help", "env-help", "gpu-tests-collect",
                 "train-settings"):
        assert f"| {step} | ok |" in report, report
    assert "tests/gpu/test_nccl.py::test_one_rank_all_reduce_under_nccl" in report
    assert "refused" not in report.split("## Training runs' settings")[1].split("dry run:")[0]
    assert list(tmp_path.glob("gpu_check.*")) == []  # its work folder is removed


def test_dry_run_fails_when_a_command_does_not_parse(tmp_path):
    # a pytest that cannot collect stands for any broken step: the script must exit 1 and say so
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(
        f'#!/bin/sh\n[ "$2" = pytest ] && exit 4\nexec {sys.executable} "$@"\n')
    (fake / "python3").chmod(0o755)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={"PATH": f"{fake}:/usr/bin:/bin", "TMPDIR": str(tmp_path),
                               "HOME": str(tmp_path)})
    assert proc.returncode == 1, proc.stdout[-2000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| gpu-tests-collect | failed (exit 4)" in report, report


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_check_passes_shellcheck():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
