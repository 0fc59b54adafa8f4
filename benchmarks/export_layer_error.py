"""The layer-output objective of quantized exports on held-out text: for every quantized linear,
``||(W - Q) X||^2`` with ``X`` its inputs on held-out rows (the objective GPTQ minimises on the
calibration rows), summed over the model and relative to ``||W X||^2``.

    python benchmarks/export_layer_error.py --load runs/smollm2/mcore --hf runs/smollm2/hf \\
        --dataset runs/smollm2/chat_eval.jsonl --samples 64 \\
        runs/smollm2/w4a16-rtn runs/smollm2/w4a16-gptq

``--load`` is the megatron checkpoint the exports came from (its model gives the inputs ``X``,
as ``mswift export`` calibrates), ``--hf`` the 16-bit HF weights ``W`` (as converted; an
attention padded for tensor parallelism is compared padded, its zero heads add nothing). Each
export's ``Q`` is compressed-tensors' own decompression of its files. Exports whose linears
were rescaled before quantizing (AWQ) have other ``W``s and are not comparable here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def held_out_hessians(ckpt: Path, dataset: Path, samples: int, seq_len: int) -> dict:
    """Per quantizable HF weight name: ``sum_t x_t x_t^T`` of its inputs on the held-out rows."""
    from mswift.bridge.layout import HFModel
    from mswift.export.calibration import calibration_samples, collect_stats
    from mswift.export.model import MegatronModel
    from mswift.runtime import destroy_distributed

    template = HFModel.open(ckpt / "hf")
    rows = calibration_samples(dataset, template.hf_dir, samples, seq_len, what="--dataset")
    try:
        model = MegatronModel(template, ckpt, max(r.shape[1] for r in rows))
        stats = collect_stats(model, rows, progress=False)
    finally:
        destroy_distributed()
    print(f"{len(rows)} held-out rows, {sum(r.shape[1] for r in rows)} tokens")
    return {name: s.hessian for name, s in stats.items()}


def dequantized_export(folder: Path, padded_like: Path):
    """A reader of ``folder``'s quantized linears, dequantized, padded as ``padded_like``."""
    from mswift.bridge.head_padding import read_padding_record
    from mswift.bridge.hf_io import HFCheckpoint
    from mswift.export.report import DequantizedExport

    names = [n.removesuffix("_packed") for n in HFCheckpoint(folder).names
             if n.endswith(".weight_packed")]
    return names, DequantizedExport(folder, folder, names, read_padding_record(padded_like))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", type=Path, required=True, help="megatron checkpoint")
    p.add_argument("--hf", type=Path, required=True, help="its 16-bit HF weights")
    p.add_argument("--dataset", type=Path, required=True, help="held-out rows")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("exports", type=Path, nargs="+", help="W4A16 export folders")
    args = p.parse_args(argv)
    from mswift.bridge.hf_io import HFCheckpoint

    hessians = held_out_hessians(args.load, args.dataset, args.samples, args.seq_len)
    original = HFCheckpoint(args.hf)
    results = {}
    for folder in args.exports:
        names, quantized = dequantized_export(folder, args.load / "hf")
        error = signal = 0.0
        per_linear = {}
        for name in names:
            w, h = original.read(name).double(), hessians[name].double()
            d = quantized.read(name).double() - w
            per_linear[name] = torch.einsum("oi,ij,oj->", d, h, d).item()
            error += per_linear[name]
            signal += torch.einsum("oi,ij,oj->", w, h, w).item()
        results[folder.name] = {"relative_error": error / signal, "per_linear": per_linear}
        print(f"{folder}: sum ||(W - Q) X||^2 / sum ||W X||^2 = {error / signal:.5f} "
              f"({len(names)} linears)")
    first, *rest = results
    for other in rest:
        wins = sum(results[other]["per_linear"][n] < e
                   for n, e in results[first]["per_linear"].items())
        print(f"{other} below {first} on {wins} of {len(results[first]['per_linear'])} linears, "
              f"total ratio {results[other]['relative_error'] / results[first]['relative_error']:.3f}")
    print(json.dumps({k: v["relative_error"] for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
