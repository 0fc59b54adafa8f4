"""The device decision (mswift.runtime.device) with CUDA availability faked, and the rule that no
other module asks torch.cuda."""
import re
from pathlib import Path

import pytest
import torch

from mswift.runtime import device

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as a node with 4 GPUs would answer (CUDA is absent here); set_device is
    recorded and current_device follows it."""
    current = {"index": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: current.update(index=torch.device(d).index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    return current


def test_without_cuda_everything_is_the_cpu_and_gloo():
    assert not torch.cuda.is_available()  # the premise of this machine
    assert device.distributed_backend() == "gloo"
    assert device.device_for_local_rank(3) == torch.device("cpu")
    assert device.set_local_device(3) == torch.device("cpu")
    assert device.local_device() == torch.device("cpu")
    assert device.device_count() == 0
    assert device.device_name() == "cpu"
    assert device.bf16_peak_flops() is None
    assert device.hbm_bytes_per_s() is None
    assert device.peak_memory_bytes() is None
    assert device.device_rng_state() is None
    device.set_device_rng_state(torch.zeros(8, dtype=torch.uint8))  # nothing to restore into


def test_with_cuda_each_local_rank_gets_its_gpu_and_nccl(fake_cuda):
    assert device.distributed_backend() == "nccl"
    assert device.device_for_local_rank(1) == torch.device("cuda", 1)
    assert device.device_for_local_rank(6) == torch.device("cuda", 2)  # 4 visible: 6 % 4
    assert device.local_device() == torch.device("cuda", 0)  # before set_local_device
    assert device.set_local_device(3) == torch.device("cuda", 3)
    assert fake_cuda["index"] == 3
    assert device.local_device() == torch.device("cuda", 3)


def test_a_launcher_that_shows_each_rank_one_gpu(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES=<one>
    assert device.set_local_device(5) == torch.device("cuda", 0)


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA B200", 2.25e15),
    ("Tesla T4", None),
    ("cpu", None),
])
def test_bf16_peak_by_device_name(name, peak):
    assert device.bf16_peak_flops(name) == peak


@pytest.mark.parametrize("name, rate", [
    ("NVIDIA H100 80GB HBM3", 3.35e12),
    ("NVIDIA H100 PCIe", 2.0e12),
    ("NVIDIA H200", 4.8e12),
    ("NVIDIA H200 NVL", 4.8e12),
    ("Tesla T4", None),
    ("cpu", None),
])
def test_hbm_bandwidth_by_device_name(name, rate):
    assert device.hbm_bytes_per_s(name) == rate


def test_bf16_peak_of_the_current_device(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert device.device_name() == "NVIDIA H100 PCIe"
    assert device.bf16_peak_flops() == 756e12


def test_only_the_device_module_asks_torch_cuda():
    """Every device decision is made in mswift/runtime/device.py (the CPU layer stands in for
    torch.cuda and is the other place that names it)."""
    allowed = {"mswift/runtime/device.py", "mswift/runtime/cpu_layer.py"}
    asks = re.compile(r"torch\.cuda\b|from torch import cuda|import torch\.cuda")
    found = set()
    for folder in ("mswift", "kernels", "launch", "checkpoint_convert"):
        for path in (ROOT / folder).rglob("*.py"):
            if asks.search(path.read_text(encoding="utf-8")):
                found.add(path.relative_to(ROOT).as_posix())
    assert found - allowed == set(), "ask mswift.runtime.device instead"
    assert found == allowed  # the pattern does find the two that do ask
