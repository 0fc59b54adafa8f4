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

from mswift.bridge.hf_io import HFCheckpoint

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


def quality_report(model, rows, staging: Path, export: Path, scheme, quantized: list[str],
                   seconds: float) -> dict:
    """The 16-bit pass keeps each row's logits in a file under ``staging`` (removed with it),
    so that memory holds one row's logits, not the evaluation set's."""
    from mswift.runtime.device import peak_memory_bytes

    report = {"scheme": scheme.name, "quantized_weights": len(quantized),
              "eval_rows": len(rows or []), "eval_tokens": sum(t.shape[1] for t in rows or [])}
    if model is not None and rows:
        kept = staging / "eval_logits"
        kept.mkdir()
        base = quant = 0.0
        for i, tokens in enumerate(rows):
            logits = model.logits(tokens)
            base += _loss_sum(logits, tokens)
            torch.save(logits, kept / f"{i}.pt")
        from mswift.bridge.head_padding import read_padding_record

        model.load(DequantizedExport(staging, export, quantized,
                                     read_padding_record(model.hf.hf_dir)))
        worst, total, count = 0.0, 0.0, 0
        for i, tokens in enumerate(rows):
            logits = model.logits(tokens)
            quant += _loss_sum(logits, tokens)
            diff = (logits - torch.load(kept / f"{i}.pt")).abs()
            worst = max(worst, diff.max().item())
            total, count = total + diff.sum().item(), count + diff.numel()
        predicted = sum(t.shape[1] - 1 for t in rows)
        base, quant = math.exp(base / predicted), math.exp(quant / predicted)
        report.update({"ppl_16bit": base, "ppl_quantized": quant, "ppl_increase": quant - base,
                       "max_abs_logit_diff": worst, "mean_abs_logit_diff": total / count})
    device_peak = peak_memory_bytes()
    report.update({
        "seconds": seconds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
        "peak_device_gib": None if device_peak is None else device_peak / 1024 ** 3,
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
            f"{report['mean_abs_logit_diff']:.4g}",
        ]
    else:
        lines.append("- no held-out evaluation (no --eval-dataset or --calib-dataset rows left)")
    device = ("" if report["peak_device_gib"] is None
              else f", peak device memory {report['peak_device_gib']:.2f} GiB")
    lines.append(f"- export {report['seconds']:.1f} s (the evaluation not counted), peak RSS "
                 f"{report['peak_rss_gib']:.2f} GiB{device}")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    text = markdown(report)
    (out / f"{REPORT}.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / f"{REPORT}.md").write_text(text, encoding="utf-8")
    print(text, end="")
