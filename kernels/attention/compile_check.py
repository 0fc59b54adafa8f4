"""Compile the attention kernels for an NVIDIA GPU on a machine without one.

    python -m mswift.kernels.attention.compile_check [--arch 90] [--quick]

The CPU interpreter checks numerics but runs kernels as Python, so it accepts code the GPU
compiler rejects (a non-constexpr global, a bad type in a loop) and says nothing of shared
memory or registers. This builds every kernel the launchers would use for a set of variants
(dtype, head dims, mask options) with Triton's own compiler and bundled ``ptxas``, and prints
shared memory, registers and spilled bytes per kernel. Exit status 1 if a kernel fails to
compile or needs more shared memory than the target has. Needs ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

# dtype, head dim qk, head dim v, causal, window_size, chunk_size
VARIANTS = [
    ("bf16", 128, 128, True, (-1, -1), None),
    ("fp32", 192, 128, False, (64, 16), 128),
    ("bf16", 64, 64, True, (-1, -1), None),
    ("fp16", 192, 128, True, (-1, -1), None),
    ("bf16", 256, 256, True, (255, -1), None),
    ("fp16", 128, 128, True, (-1, -1), 8192),
]
QUICK = VARIANTS[:2]


def _signature(fn, ptr_dtype: str, constexprs: dict) -> dict:
    """Triton type of each kernel argument, as a launch with these dtypes would give."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
            sig[name] = "*" + ptr_dtype
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name.startswith("cu_seqlens"):
            sig[name] = "*i32"
        elif name in ("scale_log2", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers, spilled bytes) from ``ptxas -v``; None where ptxas could not be run."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except (ImportError, TypeError, AttributeError, RuntimeError):
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    try:
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", f.name, "-o", os.devnull],
                                capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", result.stderr)
    spills = re.search(r"(\d+) bytes spill stores", result.stderr)
    return (int(regs.group(1)) if regs else None), (int(spills.group(1)) if spills else None)


def _kernel_specs(variant):
    """(kernel, constexprs, num_warps, num_stages) of every launch for one variant."""
    import torch

    from .triton_backward import _delta_kernel, _dkdv_kernel, _dq_kernel
    from .triton_common import choose_block_sizes, dot_precision, padded_dim
    from .triton_forward import _fwd_kernel, mask_flags
    from .validation import AttentionOptions

    dtype, dim_qk, dim_v, causal, window, chunk = variant
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    opts = AttentionOptions(1.0, causal, window[0], 0 if causal else window[1], chunk or 0)
    flags = {k: v for k, v in mask_flags(opts).items() if k.startswith("HAS_")}
    blocks = choose_block_sizes(dim_qk, dim_v)
    common = dict(DIM_QK=dim_qk, DIM_V=dim_v, BLOCK_DQK=padded_dim(dim_qk),
                  BLOCK_DV=padded_dim(dim_v), UPCAST=False, PRECISION=dot_precision(torch_dtype),
                  **flags)
    fwd, bwd = (blocks.num_warps, blocks.num_stages), (blocks.bwd_num_warps, blocks.bwd_num_stages)
    return [
        (_fwd_kernel, dict(common, BLOCK_M=blocks.fwd_m, BLOCK_N=blocks.fwd_n), *fwd),
        (_dkdv_kernel, dict(common, BLOCK_M=blocks.dkdv_m, BLOCK_N=blocks.dkdv_n), *bwd),
        (_dq_kernel, dict(common, BLOCK_M=blocks.dq_m, BLOCK_N=blocks.dq_n), *bwd),
        (_delta_kernel, dict(DIM_V=dim_v, BLOCK_DV=padded_dim(dim_v),
                             BLOCK=64 if dim_v <= 128 else 32), 4, 2),
    ]


def check_variant(variant, arch: int) -> list[str]:
    """Compile one variant's kernels; return problems (empty when all is well)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    problems = []
    for fn, constexprs, warps, stages in _kernel_specs(variant):
        src = ASTSource(fn, _signature(fn, variant[0], constexprs),
                        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
        label = f"{fn.__name__:13s} {variant}"
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options=dict(num_warps=warps, num_stages=stages))
        except Exception as err:  # report every failing kernel, not only the first
            problems.append(f"{label}: does not compile: {str(err).splitlines()[0]}")
            print(f"FAIL {label}: {err}", flush=True)
            continue
        shared = kernel.metadata.shared
        regs, spills = _ptxas_usage(kernel.asm["ptx"], arch)
        print(f"ok   {label} warps {warps} stages {stages}: shared {shared} B, "
              f"registers {regs}, spilled {spills} B", flush=True)
        if shared > SHARED_LIMIT.get(arch, 99 * 1024):
            problems.append(f"{label}: {shared} B of shared memory exceeds sm_{arch}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 90 = H100")
    parser.add_argument("--quick", action="store_true", help="two variants only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check needs TRITON_INTERPRET unset: the interpreter replaces the compiler",
              file=sys.stderr)
        return 2
    problems = []
    for variant in QUICK if args.quick else VARIANTS:
        problems += check_variant(variant, args.arch)
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
