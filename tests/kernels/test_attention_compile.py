"""The attention kernels compile for an H100 (sm_90) with Triton's real compiler.

The interpreter runs kernels as Python and accepts code that the GPU compiler rejects (it
caught a kernel reading a plain-float global here), so this builds the kernels for sm_90 with
Triton's bundled ptxas in a subprocess without TRITON_INTERPRET. No GPU is needed.
"""
import os
import subprocess
import sys


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "mswift.kernels.attention.compile_check", "--arch", "90", "--quick"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(compiled) == 8, result.stdout  # 4 kernels x 2 variants
