"""Benchmark mswift's Triton varlen attention against PyTorch SDPA (and flash-attn if installed).

Packed batches of mixed-length samples (total 16k-64k tokens, head dim 128, causal), bf16.
Reports forward and forward+backward TFLOP/s with causal FLOPs counted (only the useful,
unpadded work), each backend's ratio to mswift, and the share of the bf16 dense peak.

    python benchmarks/attention.py                      # defaults: 32 q heads, 8 kv heads
    python benchmarks/attention.py --totals 16384 --heads 16 --kv-heads 16 --peak-tflops 989

Backends:
- ``mswift``: ``mswift.kernels.varlen_attention`` over the packed batch, one launch.
- ``sdpa-{flash,cudnn}-per-sample``: ``torch.nn.functional.scaled_dot_product_attention``
  pinned to its flash or cuDNN implementation, on each sample in turn (the way packed data
  runs without a varlen kernel).
- ``sdpa-{flash,cudnn}-padded``: one SDPA call on the batch padded to its longest sample
  (causal, right padding: real queries never see padded keys); padding FLOPs are not counted.
- ``flash-attn-varlen``: ``flash_attn.flash_attn_varlen_func``, when the package is present.
- ``te-fused-thd``: Transformer Engine's ``DotProductAttention`` on the packed batch (THD layout,
  ``padding_causal`` over ``cu_seqlens``: its fused cuDNN / flash kernels), when TE imports.
k/v are repeated to the query heads for SDPA beforehand (not timed).

``--backends NAME ...`` runs only those (mswift always runs: the ratios are against it);
``--markdown FILE`` also writes the results as one markdown table.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import sys

import torch
import torch.nn.functional as F


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--totals", type=int, nargs="+", default=[16384, 32768, 65536],
                        help="total tokens of each packed batch")
    parser.add_argument("--min-len", type=int, default=512, help="shortest sample")
    parser.add_argument("--max-len", type=int, default=8192, help="longest sample")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="bf16 dense peak of the card (H100 SXM: 989)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=None,
                        help="run only these backends besides mswift (default: every one present)")
    parser.add_argument("--markdown", default=None, help="also write the results table here")
    return parser.parse_args()


def mixed_lengths(total: int, low: int, high: int, seed: int) -> list[int]:
    """Sample lengths drawn uniformly from [low, high] that add up to exactly ``total``."""
    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(low, high), total - sum(lengths)))
    return lengths


def causal_flops(lengths: list[int], heads: int, head_dim: int) -> float:
    """Forward FLOPs: two matmuls (QK^T, PV), 2 FLOPs a multiply-add, half the square causal."""
    return sum(4.0 * n * n * heads * head_dim / 2 for n in lengths)


def time_ms(fn, iters: int) -> float:
    """Median CUDA time of ``fn`` in milliseconds after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def make_packed(lengths, args):
    total = sum(lengths)
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(total, args.heads, args.head_dim, device=dev, dtype=dt)  # [tokens, heads, dim]
    k = torch.randn(total, args.kv_heads, args.head_dim, device=dev, dtype=dt)
    v = torch.randn(total, args.kv_heads, args.head_dim, device=dev, dtype=dt)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, dtype=torch.int32, device=dev)
    return q, k, v, cu


def runners_mswift(q, k, v, cu, lengths):
    from mswift.kernels import varlen_attention

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    longest = max(lengths)

    def fwd():
        return varlen_attention(q, k, v, cu, cu, longest, longest, causal=True)

    dout = torch.randn_like(q)
    return fwd, lambda: fwd().backward(dout)


def runners_sdpa_per_sample(q, k, v, cu, lengths):
    group = q.shape[1] // k.shape[1]
    samples = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs = q[a:b].transpose(0, 1)[None].contiguous()  # [1, heads, len, dim]
        ks = k[a:b].repeat_interleave(group, 1).transpose(0, 1)[None].contiguous()
        vs = v[a:b].repeat_interleave(group, 1).transpose(0, 1)[None].contiguous()
        samples.append(tuple(t.requires_grad_() for t in (qs, ks, vs)))
    douts = [torch.randn_like(s[0]) for s in samples]

    def fwd():
        return [F.scaled_dot_product_attention(*s, is_causal=True) for s in samples]

    def fwd_bwd():
        for s, dout in zip(samples, douts):
            F.scaled_dot_product_attention(*s, is_causal=True).backward(dout)

    return fwd, fwd_bwd


def runners_sdpa_padded(q, k, v, cu, lengths):
    group, longest, batch = q.shape[1] // k.shape[1], max(lengths), len(lengths)
    padded = [torch.zeros(batch, q.shape[1], longest, q.shape[2], device=q.device, dtype=q.dtype)
              for _ in range(3)]  # [batch, heads, longest, dim]
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        padded[0][i, :, : b - a] = q[a:b].transpose(0, 1)
        padded[1][i, :, : b - a] = k[a:b].repeat_interleave(group, 1).transpose(0, 1)
        padded[2][i, :, : b - a] = v[a:b].repeat_interleave(group, 1).transpose(0, 1)
    qp, kp, vp = (t.requires_grad_() for t in padded)

    def fwd():
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)

    dout = torch.randn_like(qp)
    return fwd, lambda: fwd().backward(dout)


def runners_flash_attn(q, k, v, cu, lengths):
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    longest = max(lengths)

    def fwd():
        return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)

    dout = torch.randn_like(q)
    return fwd, lambda: fwd().backward(dout)


def runners_te(q, k, v, cu, lengths):
    import transformer_engine.pytorch as te

    attention = te.DotProductAttention(q.shape[1], q.shape[2], num_gqa_groups=k.shape[1],
                                       qkv_format="thd", attn_mask_type="padding_causal")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    longest = max(lengths)

    def fwd():
        return attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                         max_seqlen_kv=longest)

    dout = torch.randn(q.shape[0], q.shape[1] * q.shape[2], device=q.device, dtype=q.dtype)
    return fwd, lambda: fwd().backward(dout)


def with_sdpa_backend(make, sdpa_backend):
    """Pin torch's SDPA to one implementation (flash or cudnn) around every call."""
    from torch.nn.attention import sdpa_kernel

    def pinned(fn):
        def run():
            with sdpa_kernel([sdpa_backend]):
                return fn()
        return run

    def make_pinned(*args):
        return tuple(pinned(fn) for fn in make(*args))

    return make_pinned


def available_backends():
    from torch.nn.attention import SDPBackend

    backends = {"mswift": runners_mswift}
    for label, sdpa_backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        backends[f"sdpa-{label}-per-sample"] = with_sdpa_backend(runners_sdpa_per_sample,
                                                                 sdpa_backend)
        backends[f"sdpa-{label}-padded"] = with_sdpa_backend(runners_sdpa_padded, sdpa_backend)
    if importlib.util.find_spec("flash_attn") is not None:
        backends["flash-attn-varlen"] = runners_flash_attn
    from mswift.runtime.device import transformer_engine_importable

    if transformer_engine_importable():
        backends["te-fused-thd"] = runners_te
    return backends


def check_against_sdpa(q, k, v, cu, lengths):
    """Max abs difference of mswift's output from per-sample SDPA (a correctness sanity check)."""
    with torch.no_grad():
        out = runners_mswift(q, k, v, cu, lengths)[0]()
        want = [o[0].transpose(0, 1) for o in runners_sdpa_per_sample(q, k, v, cu, lengths)[0]()]
    return (out.float() - torch.cat(want).float()).abs().max().item()


def bench_total(total, args, backends):
    lengths = mixed_lengths(total, args.min_len, args.max_len, args.seed + total)
    flops = causal_flops(lengths, args.heads, args.head_dim)
    q, k, v, cu = make_packed(lengths, args)
    diff = check_against_sdpa(q, k, v, cu, lengths)
    print(f"\ntotal {total} tokens, {len(lengths)} samples ({min(lengths)}-{max(lengths)}), "
          f"heads {args.heads}/{args.kv_heads}, head dim {args.head_dim}; "
          f"max |mswift - sdpa| = {diff:.3g}")
    results = {}
    for name, make in backends.items():
        try:
            fwd, fwd_bwd = make(q, k, v, cu, lengths)
            ms_f, ms_fb = time_ms(fwd, args.iters), time_ms(fwd_bwd, args.iters)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            print(f"  {name:18s} failed: {str(err).splitlines()[0]}")
            continue
        results[name] = (flops / ms_f / 1e9, 3.5 * flops / ms_fb / 1e9)  # TFLOP/s
        torch.cuda.empty_cache()
    base = results.get("mswift")
    for name, (tf_f, tf_fb) in results.items():
        ratio = f"  mswift/this: fwd {base[0] / tf_f:5.2f}x  fwd+bwd {base[1] / tf_fb:5.2f}x" \
            if base and name != "mswift" else ""
        print(f"  {name:18s} fwd {tf_f:7.1f} TFLOP/s ({100 * tf_f / args.peak_tflops:4.1f}% peak)"
              f"  fwd+bwd {tf_fb:7.1f} TFLOP/s ({100 * tf_fb / args.peak_tflops:4.1f}%){ratio}")
    return [(total, len(lengths), name, tf_f, tf_fb, diff) for name, (tf_f, tf_fb)
            in results.items()]


def markdown(rows, args) -> str:
    """The results as one table: TFLOP/s, share of the peak, and mswift's speed-up."""
    lines = [f"bf16, head dim {args.head_dim}, {args.heads}/{args.kv_heads} heads, causal, "
             f"samples {args.min_len}-{args.max_len} tokens; peak {args.peak_tflops:g} TFLOP/s",
             "", "| total tokens | samples | backend | fwd TFLOP/s | fwd+bwd TFLOP/s | "
             "mswift / this fwd | mswift / this fwd+bwd | max abs diff mswift vs SDPA |",
             "|--:|--:|---|--:|--:|--:|--:|--:|"]
    mine = {total: (f, fb) for total, _, name, f, fb, _ in rows if name == "mswift"}
    for total, count, name, f, fb, diff in rows:
        base = mine.get(total)
        ratios = f"{base[0] / f:.2f}x | {base[1] / fb:.2f}x" if base else "— | —"
        lines.append(f"| {total} | {count} | {name} | {f:.1f} ({100 * f / args.peak_tflops:.0f}%) "
                     f"| {fb:.1f} ({100 * fb / args.peak_tflops:.0f}%) | {ratios} | {diff:.3g} |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py measures GPU kernels and needs a CUDA device; "
                 "torch.cuda.is_available() is False on this machine. Nothing was measured.")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    backends = available_backends()
    if args.backends:
        unknown = set(args.backends) - set(backends)
        if unknown:
            print(f"not available here: {', '.join(sorted(unknown))}; "
                  f"running: {', '.join(sorted(backends))}")
        backends = {n: b for n, b in backends.items() if n == "mswift" or n in args.backends}
    rows = [row for total in args.totals for row in bench_total(total, args, backends)]
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, args))


if __name__ == "__main__":
    main()
