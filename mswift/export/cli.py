"""``mswift export``: a megatron checkpoint (torch_dist or legacy, converted or trained) to a
serving checkpoint, 16-bit or quantized.

    [torchrun --nproc_per_node W -m] mswift export --load CKPT --out DIR --quant w4a16-gptq
        [--group-size 128] [--calib-dataset FILE --calib-samples N --calib-seq-len L]
        [--eval-dataset FILE --eval-samples N] [--tp N --pp N --ep N --etp N]

Steps, each checked before anything is written: the 16-bit HF export (the bridge's
``mcore_to_hf``, the HF config and tokenizer found as ``mswift convert mcore-to-hf`` finds
them) into a staging folder inside ``DIR.tmp``; calibration statistics (schemes that need
them) from the megatron model on ``--calib-dataset``; each linear weight read from the
staging export, quantized and written (:mod:`mswift.export.writer`); the quality report
(``quant_report.json`` / ``.md``: perplexity of the 16-bit and the quantized model on held-out
rows, logit deviation, time, peak memory); ``DIR.tmp`` renamed to ``DIR`` when complete.

Under torchrun / srun every step is shared by the ranks: the megatron model is built at
``--tp/--pp/--ep/--etp`` (data parallel over the remaining ranks; the checkpoint's own layout
does not matter), each rank collects the calibration statistics of its own linears
(:mod:`mswift.export.calibration`) and quantizes those, so no process holds the whole model.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from mswift.bridge.cli import positive_int
from mswift.bridge.errors import BridgeError
from mswift.export.schemes import DEFAULT_GROUP_SIZE, NAMES, SCHEMES, is_quantizable

STAGING = "hf16"  # the 16-bit export inside DIR.tmp, removed once the quantized one is written


class ExportError(BridgeError):
    """Input ``mswift export`` refuses, before anything is written."""

    def __init__(self, problems: list[str] | str):
        super().__init__(problems, headline="cannot export")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mswift export", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="megatron checkpoint (torch_dist or legacy)")
    p.add_argument("--out", required=True, help="new HF model folder")
    p.add_argument("--quant", required=True, help=f"one of: {', '.join(NAMES)}")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help="input columns per scale of W4A16 schemes (-1: one per output channel)")
    p.add_argument("--hf-dir", default=None, help="HF config and tokenizer (default: CKPT/hf)")
    p.add_argument("--calib-dataset", default=None, help="calibration rows (chat or text)")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--calib-memory-gib", type=float, default=8.0,
                   help="calibration statistics held at once per rank (the calibration set "
                        "runs once per window of decoder layers that fits; default 8)")
    p.add_argument("--eval-dataset", default=None, help="held-out rows for the quality report "
                   "(default: the calibration file's rows after the calibration samples)")
    p.add_argument("--eval-samples", type=int, default=16)
    for flag, what in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        p.add_argument(flag, type=positive_int, default=1,
                       help=f"{what}-parallel size of the model that calibrates and evaluates")
    p.add_argument("--etp", type=positive_int, default=None, help="expert tensor-parallel size")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="sequence parallelism (on by itself for MoE models at --tp > 1)")
    p.add_argument("--no-report", action="store_true", help="skip the quality report")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_request(template, scheme_name: str, group_size: int) -> list[str]:
    """Refuse what this export cannot do, before anything is written; returns the names of
    the weights to quantize."""
    if scheme_name not in NAMES:
        raise ExportError(f"--quant {scheme_name}: unknown scheme; expected one of "
                          f"{', '.join(NAMES)}")
    shapes = template.weight_map(template.padded_vocab(1)).hf_shapes()
    if scheme_name == "none":
        return []
    from mswift.export.stacked import expert_names, is_stacked, source

    for name, shape in list(shapes.items()):  # stacked experts (Llama-4): quantized per expert
        if is_stacked(name, shape):
            for expert in expert_names(name, shape):
                # input-major: [E, H, 2I] (gate; up), [E, I, H] (down)
                down = source(expert)[2] == "down"
                shapes[expert] = (shape[2] if down else shape[2] // 2, shape[1])
    names = [n for n, s in shapes.items() if is_quantizable(n, s)]
    scheme = SCHEMES[scheme_name]
    if scheme_name == "w4a16-awq" and not any(n.endswith("self_attn.v_proj.weight")
                                              for n in names):
        raise ExportError(f"--quant w4a16-awq: AWQ's scale groups are those of Llama-style "
                          "layers (q/k/v_proj after input_layernorm); the "
                          f"{template.family.name} model has no v_proj (its attention is "
                          "another kind); use --quant w4a16-gptq")
    if scheme_name == "fp8-block" and template.config.get("model_type") != "deepseek_v3":
        from mswift.export.schemes import FP8_BLOCK

        for name in names:
            if any(size % block for size, block in zip(shapes[name], FP8_BLOCK)):
                raise ExportError(
                    f"--quant fp8-block: {name} is {list(shapes[name])}, not a multiple of the "
                    f"{FP8_BLOCK[0]}x{FP8_BLOCK[1]} blocks (compressed-tensors' block format "
                    "does not load then); use --quant fp8-channel")
    if scheme.grouped and group_size != -1:
        from mswift.export.qweight import check_group_size

        for name in names:
            check_group_size(name, shapes[name][1], group_size)
    return names


def run(args) -> Path:
    from mswift.bridge.convert import (
        _template,
        barrier,
        check_new_output,
        conversion_layout,
        ensure_process_group,
        mcore_to_hf,
        rank,
        staged_output,
    )

    started = time.perf_counter()
    root, out = Path(args.load), Path(args.out)
    if not root.is_dir():
        raise ExportError(f"--load {root}: not a directory")
    if not args.calib_memory_gib > 0:
        raise ExportError(f"--calib-memory-gib {args.calib_memory_gib}: expected a positive "
                          "size")
    template = _template(root, args.hf_dir)
    check_request(template, args.quant, args.group_size)
    layout = conversion_layout(template, args.tp, args.pp, args.ep, args.etp)
    if args.sequence_parallel and args.tp > 1:
        layout = dataclasses.replace(layout, sequence_parallel=True)
    from mswift.bridge.layout import launch_world_size

    template.check_layout(layout, launch_world_size(), seq_length=args.calib_seq_len)
    if args.quant == "none":
        return mcore_to_hf(root, out, args.hf_dir, progress=not args.no_progress)
    scheme = SCHEMES[args.quant]
    calib = eval_rows = None
    if scheme.needs_stats:
        calib = _samples(args.calib_dataset, "--calib-dataset", template, args.calib_samples,
                         args.calib_seq_len)
    if not args.no_report:
        eval_rows = _eval_samples(args, template)
    check_new_output(out, [root])
    progress = not args.no_progress and rank() == 0
    model = None
    if calib is not None or eval_rows:
        from mswift.export.model import MegatronModel

        seq = max(t.shape[1] for t in (calib or []) + (eval_rows or []))
        model = MegatronModel(template, root, seq, layout)  # starts the process groups
        calib = None if calib is None else model.fit(calib)
        eval_rows = None if eval_rows is None else model.fit(eval_rows)
        if calib == []:
            raise ExportError(f"--calib-dataset {args.calib_dataset}: no sample of at least "
                              f"{args.tp} tokens (sequence parallelism cuts each to a multiple "
                              "of --tp)")
    else:
        ensure_process_group()
    with staged_output(out) as tmp:
        staging = tmp / STAGING
        dtype = "bfloat16" if "quantization_config" in template.config else None
        mcore_to_hf(root, staging, args.hf_dir, progress=progress, dtype=dtype)
        stats = None
        if calib is not None:  # a window of layers at a time, each rank its own linears
            from mswift.export.calibration import drop_head_padding, stats_windows

            budget = int(args.calib_memory_gib * 1024 ** 3)
            stats = (drop_head_padding(window, template.hf_dir)
                     for window in stats_windows(model, calib, budget, progress))
        if scheme.prepare is not None:
            scheme.prepare_staging(staging, stats, args.group_size, progress)
            stats = None  # (its quantizer needs none)
        from mswift.export.writer import write_quantized

        final = tmp / "model"
        if rank() == 0:
            final.mkdir()
        barrier()
        quantized = write_quantized(staging, final, scheme, args.group_size, stats, progress)
        from mswift.export.report import quality_report, write_report

        report = quality_report(model, eval_rows, staging, final, scheme, quantized,
                                time.perf_counter() - started)
        barrier()
        if rank() == 0:
            shutil.rmtree(staging)
            for path in final.iterdir():
                path.rename(tmp / path.name)
            final.rmdir()
            write_report(tmp, report)
    return out


def _samples(path, flag: str, template, count: int, seq_len: int, skip: int = 0):
    from mswift.export.calibration import calibration_samples

    if path is None:
        raise ExportError(f"{flag}: required by this scheme (the calibration rows)")
    if count < 1 or seq_len < 2:
        raise ExportError(f"{flag}: expected at least one sample of at least 2 tokens")
    try:
        samples = calibration_samples(path, template.hf_dir, count, seq_len, skip, flag)
    except ValueError as err:
        raise ExportError(str(err)) from None
    if not samples:
        raise ExportError(f"{flag} {path}: no usable rows (empty, or every row shorter than 2 "
                          "tokens" + (f" after the first {skip} calibration rows)" if skip
                                      else ")"))
    return samples


def _eval_samples(args, template):
    """Held-out rows for the report: ``--eval-dataset``, else the calibration file's rows after
    the calibration samples; None when there are none (the report then has no perplexity)."""
    seq = args.calib_seq_len
    if args.eval_dataset is not None:
        return _samples(args.eval_dataset, "--eval-dataset", template, args.eval_samples, seq)
    if args.calib_dataset is None:
        return None
    try:
        return _samples(args.calib_dataset, "--calib-dataset", template, args.eval_samples, seq,
                        skip=args.calib_samples)
    except BridgeError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mswift.bridge.convert import rank

    try:
        out = run(args)
        if rank() == 0:
            print(f"mswift export: wrote {out}")
    except (BridgeError, ValueError) as err:
        print(f"mswift export: {err}", file=sys.stderr)
        return 2
    finally:
        from mswift.runtime import destroy_distributed

        destroy_distributed()
    return 0
