"""docker/constraints_for_base.py: mswift's pins for the GPU image leave out what the NGC
base image pins (its CUDA torch, TE, numpy, ...) and keep everything else."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pins_of_the_base_image_and_the_gpu_stack_are_left_out(tmp_path):
    base = tmp_path / "constraint.txt"
    base.write_text("# NGC\nnumpy==1.26.4\nPyYAML==6.0.2\nflash_attn @ file:///opt/wheels/fa.whl\n"
                    "Transformer-Engine==2.9.0+abc\n")
    proc = subprocess.run([sys.executable, str(REPO / "docker" / "constraints_for_base.py"),
                           str(REPO / "constraints.txt"), str(base)],
                          capture_output=True, text=True, check=True)
    kept = {line.split("==")[0].lower() for line in proc.stdout.splitlines()}
    ours = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text()
            .splitlines() if "==" in line and not line.startswith("#")}
    assert kept == ours - {"torch", "triton", "numpy", "pyyaml"}
    assert "megatron-core" in kept and "transformers" in kept


def test_without_a_base_constraint_file_only_the_gpu_stack_is_left_out(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "docker" / "constraints_for_base.py"),
                           str(REPO / "constraints.txt"), str(tmp_path / "absent.txt")],
                          capture_output=True, text=True, check=True)
    assert "torch==" not in proc.stdout and "triton==" not in proc.stdout
    assert "megatron-core==0.16.1" in proc.stdout
