"""The quality report of a quantized export: the same held-out rows through the megatron model
with the 16-bit weights and with the exported weights dequantized from the written files (so
the report judges what was written), perplexity of each and their logit deviation, plus time
and peak memory. Saved beside the export as ``quant_report.json`` and ``quant_report.md``."""
from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from mswift.bridge.hf_io import HFCheckpoint
from mswift.export.stacked import expert_names, is_stacked, restack

REPORT = "quant_report"


class DequantizedExport(HFCheckpoint):
    """The 16-bit staging export with each quantized weight replaced by its dequantized value,
    read back from the quantized export's files (compressed-tensors' own decompression, or the
    bridge's reader of DeepSeek's FP8 layout). ``padding``: the checkpoint's head-padding
    record (:mod:`mswift.bridge.head_padding`; the export dropped the padded heads): the
    attention tensors are shown padded again with zeros, in the megatron model's shapes."""

    def __init__(self, staging: Path, export: Path, quantized: list[str], padding=None):
        super().__init__(staging)
        self.export, self.quantized, self.padding = export, set(quantized), padding
        config = json.loads((export / "config.json").read_text(encoding="utf-8"))
        self.qc = config["quantization_config"]
        self._stored = None

    def _dequantized(self, name: str) -> torch.Tensor:
        if self.qc.get("quant_method") == "fp8":
            from mswift.bridge.quantized import open_checkpoint

            if self._stored is None:
                self._stored = open_checkpoint(self.export)
            return self._stored.read(name)
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationScheme

        if self._stored is None:
            self._stored = HFCheckpoint.__new__(HFCheckpoint)
            HFCheckpoint.__init__(self._stored, self.export)
        prefix = name.removesuffix("weight")
        state = {n[len(prefix):]: self._stored.read(n) for n in self._stored.names
                 if n.startswith(prefix) and "." not in n[len(prefix):]}
        # in fp32, as transformers runs it: compressed-tensors computes in the scale's dtype,
        # and q * scale is exact in fp32 (the quantizer's own values), not in bf16
        state["weight_scale"] = state["weight_scale"].float()
        scheme = QuantizationScheme.model_validate(self.qc["config_groups"]["group_0"])
        compressor = BaseCompressor.get_value_from_registry(self.qc["format"])
        return compressor.decompress(state, scheme)["weight"].float()

    def _pad(self, name: str):
        """(axis, rows or columns to append) of a padded attention tensor, else None."""
        from mswift.bridge.head_padding import _head_rule

        rule = _head_rule(name) if self.padding else None
        if rule is None:
            return None
        axis, count = rule
        added = self.padding["padded"][count] - self.padding["original"][count]
        return axis, added * self.padding["head_dim"]

    def shape(self, name: str) -> tuple[int, ...]:
        shape, pad = list(super().shape(name)), self._pad(name)
        if pad is not None:
            shape[pad[0]] += pad[1]
        return tuple(shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0):
        pad = self._pad(name)
        shape = super().shape(name)
        if is_stacked(name, shape) and set(expert_names(name, shape)) <= self.quantized:
            full = restack({n: self._dequantized(n) for n in expert_names(name, shape)},
                           name, shape)
            return full if dim is None else full.narrow(dim, start, stop - start)
        if name not in self.quantized and pad is None:
            return super().read(name, dim, start, stop)
        full = self._dequantized(name) if name in self.quantized else super().read(name)
        if pad is not None:
            zeros = list(full.shape)
            zeros[pad[0]] = pad[1]
            full = torch.cat([full, full.new_zeros(zeros)], dim=pad[0])
        return full if dim is None else full.narrow(dim, start, stop - start)

    def read_rows_into(self, name, start, out):
        out.copy_(self.read(name, 0, start, start + out.shape[0]))

    def location(self, name: str):
        raise ValueError(f"{name}: dequantized, not copied")


def _loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    return torch.nn.functional.cross_entropy(flat, tokens[:, 1:].reshape(-1),
                                             reduction="sum").item()


def _kl_sum(base: torch.Tensor, quant: torch.Tensor) -> float:
    """Sum over positions of KL(16-bit || quantized) of the next-token distributions, in nats:
    unlike perplexity, it weighs every position by how far the quantized model moved, not by
    how well either predicts the text (a chat template's fixed prefix, which both predict
    badly, dominates a perplexity)."""
    p = torch.log_softmax(base.double(), dim=-1)
    q = torch.log_softmax(quant.double(), dim=-1)
    return (p.exp() * (p - q)).sum().item()


def quality_report(model, rows, staging: Path, export: Path, scheme, quantized: list[str],
                   seconds: float) -> dict:
    """The 16-bit pass keeps each row's logits in a file under ``staging`` (removed with it),
    so that memory holds one row's logits, not the evaluation set's. Data-parallel ranks
    evaluate different rows; the sums are added up over all ranks (each row counted once: by
    the first tensor-parallel rank of the last pipeline stage that ran it)."""
    from mswift.bridge.head_padding import read_padding_record
    from mswift.runtime.device import collective_device, peak_memory_bytes

    report = {"scheme": scheme.name, "quantized_weights": len(quantized),
              "eval_rows": len(rows or []), "eval_tokens": sum(t.shape[1] for t in rows or [])}
    # loss sums (16-bit, quantized), |diff| sum, diff count, KL sum, KL tokens; then the maxima
    sums = torch.zeros(6, dtype=torch.float64, device=collective_device())
    maxima = torch.zeros(3, dtype=torch.float64, device=collective_device())
    if model is not None and rows:
        from megatron.core import parallel_state as ps

        from mswift.export.model import DataParallel

        steps = DataParallel.current().steps(len(rows), drop_remainder=False)
        counts = ps.get_tensor_model_parallel_rank() == 0
        kept = staging / "eval_logits"
        kept.mkdir(exist_ok=True)
        for row in steps:
            logits = model.logits(rows[0 if row is None else row])
            if logits is not None and row is not None and counts:
                sums[0] += _loss_sum(logits, rows[row])
                torch.save(logits, kept / f"{row}.pt")
        model.load(DequantizedExport(staging, export, quantized,
                                     read_padding_record(model.hf.hf_dir)))
        for row in steps:
            logits = model.logits(rows[0 if row is None else row])
            if logits is not None and row is not None and counts:
                sums[1] += _loss_sum(logits, rows[row])
                base_logits = torch.load(kept / f"{row}.pt")
                diff = (logits - base_logits).abs()
                maxima[0] = max(maxima[0].item(), diff.max().item())
                sums[2] += diff.sum().item()
                sums[3] += diff.numel()
                sums[4] += _kl_sum(base_logits, logits)
                sums[5] += logits.shape[0] * logits.shape[1]
    device_peak = peak_memory_bytes()
    maxima[1] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    maxima[2] = -1 if device_peak is None else device_peak / 1024 ** 3
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    if model is not None and rows:
        predicted = sum(t.shape[1] - 1 for t in rows)
        base, quant = (math.exp(v / predicted) for v in sums[:2].tolist())
        report.update({"ppl_16bit": base, "ppl_quantized": quant, "ppl_increase": quant - base,
                       "max_abs_logit_diff": maxima[0].item(),
                       "mean_abs_logit_diff": (sums[2] / sums[3]).item(),
                       "mean_kl": (sums[4] / sums[5]).item()})
    report.update({
        "seconds": seconds,
        "peak_rss_gib": maxima[1].item(),
        "peak_device_gib": None if device_peak is None else maxima[2].item(),
        "ranks": dist.get_world_size() if dist.is_initialized() else 1,
    })
    return report


def markdown(report: dict) -> str:
    lines = [f"# Quantized export: {report['scheme']}", "",
             f"- quantized weights: {report['quantized_weights']}"]
    if "ppl_16bit" in report:
        lines += [
            f"- held-out perplexity: 16-bit {report['ppl_16bit']:.4f}, quantized weights "
            "(activations unquantized: the run-time activation quantization of int8 / FP8 "
            "is not modelled) "
            f"{report['ppl_quantized']:.4f} (+{report['ppl_increase']:.4f}) on "
            f"{report['eval_rows']} rows / {report['eval_tokens']} tokens",
            f"- logit deviation: max {report['max_abs_logit_diff']:.4g}, mean "
            f"{report['mean_abs_logit_diff']:.4g}; mean KL(16-bit || quantized) per token "
            f"{report['mean_kl']:.4g} nats",
        ]
    else:
        lines.append("- no held-out evaluation (no --eval-dataset or --calib-dataset rows left)")
    device = ("" if report["peak_device_gib"] is None
              else f", peak device memory {report['peak_device_gib']:.2f} GiB")
    ranks = report.get("ranks", 1)
    per = f" (the largest of {ranks} ranks)" if ranks > 1 else ""
    lines.append(f"- export {report['seconds']:.1f} s (the evaluation not counted), peak RSS "
                 f"{report['peak_rss_gib']:.2f} GiB{device}{per}")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    text = markdown(report)
    (out / f"{REPORT}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / f"{REPORT}.md").write_text(text, encoding="utf-8")
    print(text, end="")
