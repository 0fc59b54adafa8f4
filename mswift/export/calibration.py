"""Calibration statistics: what each quantizable linear sees on the calibration set.

GPTQ and AWQ pick their integers from the activations that reach a layer; these are
collected from the megatron model itself (built and loaded by the code training uses,
:mod:`mswift.export.model`), with forward pre-hooks on its linear modules, while the
calibration samples run through it one at a time.

``CalibrationStats`` maps each quantizable HF weight name (``model.layers.0.self_attn.
q_proj.weight``, ``model.layers.1.mlp.experts.3.down_proj.weight``) to the
:class:`LinearStats` of that linear's input ``x`` [tokens, in]:

* ``hessian``: ``sum_t x_t x_t^T`` in fp32 [in, in] (not divided by ``tokens``; GPTQ's
  ``H = 2 X X^T / n`` is ``2 * hessian / tokens``);
* ``tokens``: how many token rows were summed (0 for an expert no token was routed to);
* ``act_abs_mean``: ``mean_t |x_t|`` in fp32 [in] (zeros when ``tokens`` is 0);
* ``act_sample``: the first ``SAMPLE_ROWS`` token rows ``x`` in fp32 [n, in], n <= 512, in
  calibration order (for AWQ's search of scales; [0, in] when ``tokens`` is 0).

Linears that read one input (q/k/v, gate/up) share one ``LinearStats`` object. An MoE expert's
statistics hold only the tokens routed to that expert (each expert is its own module in
megatron-core's SequentialMLP). The model runs in one process at TP1 (a checkpoint of any layout is
resharded as it loads), so each linear sees its full input and the statistics do not depend on
the checkpoint's layout.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLE_ROWS = 512  # token rows kept per linear in ``act_sample``


@dataclass
class LinearStats:
    """Statistics of one linear's input; see the module docstring."""

    hessian: torch.Tensor       # [in, in] fp32, sum over tokens of x x^T
    tokens: int
    act_abs_mean: torch.Tensor  # [in] fp32
    act_sample: torch.Tensor    # [n, in] fp32, n <= SAMPLE_ROWS


CalibrationStats = dict[str, LinearStats]


class _Accumulator:
    """Sums of one linear's inputs, token rows in fp32 (the sums in fp64 on CPU would cost
    too much memory for big ``in``; fp32 sums of a few hundred thousand rows are ample)."""

    def __init__(self):
        self.hessian = None
        self.abs_sum = None
        self.tokens = 0
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.hessian.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]
        if self.kept < SAMPLE_ROWS:
            take = x[: SAMPLE_ROWS - self.kept]
            self.rows.append(take.cpu().clone())
            self.kept += take.shape[0]

    def stats(self, in_features: int) -> LinearStats:
        if self.hessian is None:
            zeros = torch.zeros(in_features)
            return LinearStats(torch.zeros(in_features, in_features), 0, zeros,
                               torch.zeros(0, in_features))
        return LinearStats(self.hessian.cpu(), self.tokens,
                           (self.abs_sum / self.tokens).float().cpu(), torch.cat(self.rows))


def calibration_samples(path: str | Path, tokenizer_dir: str | Path, count: int, seq_len: int,
                        skip: int = 0, what: str = "--calib-dataset") -> list[torch.Tensor]:
    """Token ids [1, <= seq_len] of up to ``count`` rows of ``path`` (any format training
    reads: chat or text rows), after the first ``skip`` usable rows, encoded with the
    checkpoint's own tokenizer and chat template as training encodes them (mswift.data)."""
    from transformers import AutoTokenizer

    from mswift.data.encode import SampleEncoder
    from mswift.data.formats import BadRowError, detect_row_format, row_to_example
    from mswift.data.sources import iter_file_rows, list_data_files

    try:
        files = list_data_files(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(f"{what} {path}: {err}") from None
    encoder = SampleEncoder(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    samples: list[torch.Tensor] = []
    seen = 0
    for file in files:
        for raw in iter_file_rows(file):
            if len(samples) >= count:
                return samples
            try:
                row = raw.load()
                row_format = detect_row_format(row, "text") if isinstance(row, dict) else None
                if row_format is None:
                    raise BadRowError(raw.where, "expected a text or chat row (text, messages, "
                                                 "conversations or instruction/output)")
                ids = encoder.encode(row_to_example(row, row_format, "text", raw.where)).input_ids
            except (BadRowError, ValueError) as err:
                raise ValueError(f"{what} {path}: {err}") from None
            if len(ids) < 2:
                continue
            seen += 1
            if seen > skip:
                samples.append(torch.from_numpy(ids[:seq_len]).unsqueeze(0))
    return samples


def collect_stats(model, samples: list[torch.Tensor], progress: bool = True) -> CalibrationStats:
    """Run ``samples`` through ``model`` (:class:`mswift.export.model.MegatronModel`) with a
    pre-hook on every quantizable linear; the statistics of each, by HF weight name."""
    accumulators: dict[str, _Accumulator] = {}
    sizes: dict[str, int] = {}
    handles = []
    for module, hf_names in model.quantizable_linears():
        acc = _Accumulator()
        for name in hf_names:
            accumulators[name] = acc
        sizes[id(acc)] = module.weight.shape[1]
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, acc=acc: acc.add(args[0])))
    try:
        batches = samples
        if progress:
            from tqdm import tqdm

            batches = tqdm(samples, desc="calibration", unit="sample", file=sys.stderr)
        for tokens in batches:
            model.logits(tokens)
    finally:
        for handle in handles:
            handle.remove()
    done: dict[int, LinearStats] = {}
    return {name: done.setdefault(id(acc), acc.stats(sizes[id(acc)]))
            for name, acc in accumulators.items()}


def drop_head_padding(stats: CalibrationStats, hf_dir: str | Path) -> CalibrationStats:
    """``stats`` in the HF export's shapes: a model whose attention was padded for tensor
    parallelism (:mod:`mswift.bridge.head_padding`) calibrates with the padded heads, whose
    inputs to o_proj are the trailing, always-zero columns the export drops; they are dropped
    from o_proj's statistics too. Unchanged without a padding record in ``hf_dir``."""
    from mswift.bridge.head_padding import HEAD_AXES, read_padding_record

    record = read_padding_record(hf_dir)
    if record is None:
        return stats
    on_inputs = {suffix: count for suffix, (axis, count) in HEAD_AXES.items() if axis == 1}
    out = dict(stats)
    for name, s in stats.items():
        count = next((c for suffix, c in on_inputs.items() if name.endswith(suffix)), None)
        if count is None:
            continue
        keep = record["original"][count] * record["head_dim"]
        out[name] = LinearStats(s.hessian[:keep, :keep].contiguous(), s.tokens,
                                s.act_abs_mean[:keep].contiguous(),
                                s.act_sample[:, :keep].contiguous())
    return out

