"""Benchmark mswift's MoE and fused-op kernels against torch, in one run (ratios of the same run).

* permute + unpermute (forward): ``mswift.kernels.permute`` / ``unpermute`` vs a torch
  ``argsort`` + ``index_select`` / ``index_add_`` baseline (what megatron-core's own permutation
  does), GB/s counted as the bytes a perfect kernel moves (read the tokens, write ``topk`` rows;
  read them back, write the tokens), and the share of the device's HBM bandwidth;
* router: ``mswift.kernels.topk_routing`` at DeepSeek-V3's shapes (256 experts, 8 groups, 4
  kept, top-8, sigmoid + expert bias, renormalised, x2.5) vs its torch reference, ms;
* RMSNorm (hidden 7168) and cross-entropy (vocabulary 129280) forward: Triton vs torch
  reference, GB/s (bytes read + written once);
* expert MLP (``moe_grouped_gemm``) forward: mswift's grouped GEMMs
  (``mswift.models.grouped_experts.grouped_matmul``: ``torch._grouped_mm`` for CUDA bf16, else
  one matmul per expert) vs the per-expert loop of megatron-core's ``SequentialMLP``, at one
  EP8 rank of DeepSeek-V3 (32 local experts, hidden 7168, expert width 2048, top-8), GFLOP/s;
  on the CPU also ``torch._grouped_mm`` in fp32, which torch 2.13 runs there.

    python benchmarks/moe.py            # CUDA: bf16, 4k-64k tokens
    python benchmarks/moe.py --quick    # small sizes (CPU: the torch paths, in seconds)

Without CUDA the Triton kernels run only under ``TRITON_INTERPRET=1`` (far slower than torch;
fp32: the interpreter mishandles bf16); otherwise they are reported unavailable. The device
comes from :mod:`mswift.runtime.device`.
"""
from __future__ import annotations

import argparse
import time

import torch

from mswift.kernels import permute, rms_norm, topk_routing, unpermute, vocab_parallel_cross_entropy
from mswift.kernels.attention.env import interpreter_enabled
from mswift.models.grouped_experts import grouped_matmul
from mswift.runtime import device


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU, smoke runs)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None,
                        help="token counts (default 4096 16384 65536; --quick: 256 1024)")
    parser.add_argument("--hidden", type=int, default=None, help="default 7168 (--quick: 512)")
    parser.add_argument("--vocab", type=int, default=None, help="default 129280 (--quick: 8000)")
    parser.add_argument("--iters", type=int, default=None, help="timed repeats (default 20/3)")
    return parser.parse_args()


def time_ms(fn, iters: int) -> float:
    """Median wall time of ``fn`` in ms, after one warm-up call, device work included."""
    fn()
    device.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        device.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def torch_permute(tokens, indices, num_experts):
    """Baseline: a stable argsort of the choices, then row gathers and an index_add back."""
    topk = indices.shape[1]
    order = torch.argsort(indices.reshape(-1), stable=True)  # choices, expert-major
    source = order // topk  # [tokens * topk] token of each permuted row
    permuted = tokens.index_select(0, source)
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts)
    return permuted, source, counts


def torch_unpermute(expert_out, source, weights_sorted, num_tokens):
    out = torch.zeros(num_tokens, expert_out.shape[1], dtype=torch.float32,
                      device=expert_out.device)
    out.index_add_(0, source, expert_out.float() * weights_sorted[:, None])
    return out.to(expert_out.dtype)


def bench_permutation(tokens_n, hidden, dtype, dev, iters, triton_ok, rows):
    experts, topk = 256, 8
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(tokens_n, hidden, dtype=dtype, device=dev, generator=gen)
    scores = torch.rand(tokens_n, experts, device=dev, generator=gen)
    indices = scores.topk(topk, dim=1).indices
    weights = torch.rand(tokens_n, topk, device=dev, generator=gen)
    moved = 2 * (tokens_n + tokens_n * topk) * hidden * x.element_size()

    def baseline():
        permuted, source, _ = torch_permute(x, indices, experts)
        order_weights = weights.reshape(-1)[torch.argsort(indices.reshape(-1), stable=True)]
        torch_unpermute(permuted, source, order_weights, tokens_n)

    def reference():
        permuted, row_map, _ = permute(x, indices, experts, backend="torch")
        unpermute(permuted, row_map, weights, backend="torch")

    results = {"torch argsort/index_select": time_ms(baseline, iters),
               "mswift torch reference": time_ms(reference, iters)}
    if triton_ok:
        def kernels():
            permuted, row_map, _ = permute(x, indices, experts, backend="triton")
            unpermute(permuted, row_map, weights, backend="triton")
        results["mswift triton"] = time_ms(kernels, iters)
    add_rows(rows, f"permute+unpermute T={tokens_n} H={hidden} top-{topk}/{experts}", results,
             moved)


def bench_router(tokens_n, dev, iters, triton_ok, rows):
    gen = torch.Generator(device=dev).manual_seed(1)
    logits = torch.randn(tokens_n, 256, device=dev, generator=gen)
    bias = 0.1 * torch.randn(256, device=dev, generator=gen)
    options = dict(score_function="sigmoid", expert_bias=bias, num_groups=8, group_topk=4,
                   normalize=True, scaling_factor=2.5)
    results = {"mswift torch reference": time_ms(
        lambda: topk_routing(logits, 8, backend="torch", **options), iters)}
    if triton_ok:
        results["mswift triton"] = time_ms(
            lambda: topk_routing(logits, 8, backend="triton", **options), iters)
    add_rows(rows, f"router DeepSeek-V3 T={tokens_n}", results, None)


def bench_rms_norm(tokens_n, hidden, dtype, dev, iters, triton_ok, rows):
    gen = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(tokens_n, hidden, dtype=dtype, device=dev, generator=gen)
    w = torch.rand(hidden, dtype=dtype, device=dev, generator=gen)
    results = {"mswift torch reference": time_ms(
        lambda: rms_norm(x, w, 1e-6, backend="torch"), iters)}
    if triton_ok:
        results["mswift triton"] = time_ms(lambda: rms_norm(x, w, 1e-6, backend="triton"),
                                           iters)
    add_rows(rows, f"RMSNorm T={tokens_n} H={hidden}", results, 2 * x.numel() * x.element_size())


def bench_cross_entropy(tokens_n, vocab, dtype, dev, iters, triton_ok, rows):
    gen = torch.Generator(device=dev).manual_seed(3)
    logits = torch.randn(tokens_n, vocab, dtype=dtype, device=dev, generator=gen)
    targets = torch.randint(0, vocab, (tokens_n,), device=dev, generator=gen)
    results = {"mswift torch reference": time_ms(
        lambda: vocab_parallel_cross_entropy(logits, targets, backend="torch"), iters)}
    if triton_ok:
        results["mswift triton"] = time_ms(
            lambda: vocab_parallel_cross_entropy(logits, targets, backend="triton"), iters)
    add_rows(rows, f"cross-entropy T={tokens_n} V={vocab}", results,
             logits.numel() * logits.element_size())


def bench_expert_mlp(tokens_n, hidden, ffn, experts, dtype, dev, iters, rows):
    """One rank's experts: ``tokens_n * 8`` routed rows spread unevenly over ``experts``, each
    expert's SwiGLU MLP (fc1 ``[2 * ffn, hidden]``, fc2 ``[hidden, ffn]``)."""
    gen = torch.Generator(device=dev).manual_seed(4)
    choices = torch.randint(0, experts, (tokens_n * 8,), device=dev, generator=gen)
    counts = torch.bincount(choices, minlength=experts).tolist()
    x = torch.randn(len(choices), hidden, dtype=dtype, device=dev, generator=gen)
    fc1 = torch.randn(experts, 2 * ffn, hidden, dtype=dtype, device=dev, generator=gen)
    fc2 = torch.randn(experts, hidden, ffn, dtype=dtype, device=dev, generator=gen)

    def swiglu(h):
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up

    def per_expert():
        outs = [swiglu(seg @ fc1[e].t()) @ fc2[e].t() for e, seg in enumerate(x.split(counts))]
        return torch.cat(outs)

    def grouped(use_grouped_mm=None):
        return grouped_matmul(swiglu(grouped_matmul(x, fc1, counts, use_grouped_mm)), fc2,
                              counts, use_grouped_mm)

    results = {"per-expert loop (SequentialMLP)": time_ms(per_expert, iters),
               "mswift grouped": time_ms(grouped, iters)}
    if dtype == torch.float32 and hasattr(torch, "_grouped_mm"):  # the CPU: the loop above
        results["torch._grouped_mm fp32"] = time_ms(lambda: grouped(True), iters)
    flops = 2 * len(choices) * 3 * ffn * hidden
    add_rows(rows, f"expert MLP rows={len(choices)} H={hidden} F={ffn} experts={experts}",
             results, None, mswift="mswift grouped", flops=flops)


def add_rows(rows, case, results, moved_bytes, mswift: str | None = None,
             flops: int | None = None):
    """One row per backend: ms, GB/s (or GFLOP/s given ``flops``), share of HBM, and mswift's
    speed-up over it (``mswift``: its row; default its Triton kernels where they run, else
    its torch path)."""
    hbm = device.hbm_bytes_per_s()
    mswift = results.get(mswift or "mswift triton", results.get("mswift torch reference"))
    for name, ms in results.items():
        rate = None if moved_bytes is None else moved_bytes / (ms * 1e-3)
        if flops is not None:
            name = f"{name} ({flops / (ms * 1e-3) / 1e9:.1f} GFLOP/s)"
        rows.append((case, name, ms, rate, None if rate is None or hbm is None else rate / hbm,
                     None if mswift is None else ms / mswift))


def print_rows(rows):
    print("| case | backend | ms | GB/s | of HBM | mswift speed-up |")
    print("|---|---|---|---|---|---|")
    for case, name, ms, rate, share, ratio in rows:
        gbs = "-" if rate is None else f"{rate / 1e9:.1f}"
        hbm = "-" if share is None else f"{share:.0%}"
        speed = "-" if ratio is None else f"{ratio:.2f}x"
        print(f"| {case} | {name} | {ms:.3f} | {gbs} | {hbm} | {speed} |")


def main():
    args = parse_args()
    cuda = device.cuda_available()
    dev = device.local_device()
    triton_ok = cuda or interpreter_enabled()
    dtype = torch.bfloat16 if cuda else torch.float32
    quick = args.quick or not cuda
    tokens = args.tokens or ([256, 1024] if quick else [4096, 16384, 65536])
    hidden = args.hidden or (512 if quick else 7168)
    vocab = args.vocab or (8000 if quick else 129280)
    iters = args.iters or (3 if quick else 20)
    print(f"device: {device.device_name()}, {str(dtype).removeprefix('torch.')}; Triton: "
          + ("CUDA" if cuda else "interpreter (TRITON_INTERPRET=1)" if triton_ok else
             "unavailable (no CUDA and TRITON_INTERPRET unset): torch paths only"))
    rows = []
    for n in tokens:
        bench_permutation(n, hidden, dtype, dev, iters, triton_ok, rows)
    for n in tokens:
        bench_router(n, dev, iters, triton_ok, rows)
    for n in tokens:
        bench_rms_norm(n, hidden, dtype, dev, iters, triton_ok, rows)
    for n in tokens[:2]:  # logits of 64k tokens x 129k ids would not fit next to the rest
        bench_cross_entropy(n, vocab, dtype, dev, iters, triton_ok, rows)
    # one EP8 rank of DeepSeek-V3 (--quick: 8 experts, width 256)
    for n in tokens[:2]:
        bench_expert_mlp(n, hidden, 256 if quick else 2048, 8 if quick else 32, dtype, dev,
                         iters, rows)
    print_rows(rows)


if __name__ == "__main__":
    main()
