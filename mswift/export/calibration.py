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
megatron-core's SequentialMLP).

The model runs at the export's parallel layout, and each rank keeps the statistics of its own
linears only. They do not depend on the layout: a hook gathers what a sharded linear does not
see whole (the input features of a row-parallel linear over its tensor-parallel group, the
sequence of a sequence-parallel column-parallel one), the data-parallel ranks run different
calibration rows (row ``step * dp + rank``) and their sums are added up over the replicas of
each linear (the data-parallel group; an expert's, over the expert data-parallel group), and the
token rows kept for ``act_sample`` are ordered by calibration row as in one process (an
expert's: within one step, in the order its token dispatcher delivers them). Each
linear's statistics are accumulated by one of its tensor-parallel ranks (they all see the
same gathered input) in each data-parallel replica, and kept by one of those, its owner, which
quantizes it; linears are spread over the ranks that hold them.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterator
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
    too much memory for big ``in``; fp32 sums of a few hundred thousand rows are ample), on
    the model's device; ``rows``: (step, the first token rows seen at that step) up to
    ``SAMPLE_ROWS`` rows in all, on the CPU."""

    def __init__(self, names: list[str], in_features: int):
        self.names, self.in_features = names, in_features
        self.hessian = None
        self.abs_sum = None
        self.tokens = 0
        self.rows: list[tuple[int, torch.Tensor]] = []
        self.kept = 0

    def add(self, x: torch.Tensor, step: int) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.hessian is None:
            self.hessian = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.abs_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        self.hessian.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]
        if self.kept < SAMPLE_ROWS and x.shape[0]:
            take = x[: SAMPLE_ROWS - self.kept]
            self.rows.append((step, take.cpu().clone()))
            self.kept += take.shape[0]

    def reduce(self, group, device) -> None:
        """Add up the sums of the replicas in ``group`` (all hold this linear); keep the first
        ``SAMPLE_ROWS`` of their rows, by step, then by the replica's rank in ``group``."""
        import torch.distributed as dist

        if group is None or dist.get_world_size(group) == 1:
            return
        n = self.in_features
        if self.hessian is None:  # no token reached this replica
            self.hessian = torch.zeros(n, n, device=device)
            self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device)
        tokens = torch.tensor([self.tokens], dtype=torch.float64, device=self.hessian.device)
        for tensor in (self.hessian, self.abs_sum, tokens):
            dist.all_reduce(tensor, group=group)
        self.tokens = int(tokens.item())
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, self.rows, group=group)
        rows = sorted(((step, replica, t) for replica, kept in enumerate(everyone)
                       for step, t in kept), key=lambda r: r[:2])
        self.rows, self.kept = [], 0
        for step, _, t in rows:
            take = t[: SAMPLE_ROWS - self.kept]
            if take.shape[0]:
                self.rows.append((step, take))
                self.kept += take.shape[0]
        if not self.tokens:
            self.hessian = self.abs_sum = None

    def stats(self) -> LinearStats:
        n = self.in_features
        if self.hessian is None:
            zeros = torch.zeros(n)
            return LinearStats(torch.zeros(n, n), 0, zeros, torch.zeros(0, n))
        return LinearStats(self.hessian.cpu(), self.tokens,
                           (self.abs_sum / self.tokens).float().cpu(),
                           torch.cat([t for _, t in self.rows]))


def _gather_input(module, x: torch.Tensor) -> torch.Tensor:
    """What the whole (unsharded) linear would read, from this rank's part ``x``: a
    row-parallel linear's input features are split over its tensor-parallel group, a
    sequence-parallel column-parallel linear's sequence ([s, b, h], dim 0) is (an expert's
    linears read the tokens their dispatcher gathered: whole)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    group = getattr(module, "tp_group", None)
    if group is None or dist.get_world_size(group) == 1:
        return x
    if isinstance(module, RowParallelLinear) and module.input_is_parallel:
        dim = -1
    elif (isinstance(module, ColumnParallelLinear) and module.sequence_parallel
          and not module.explicit_expert_comm):
        dim = 0
    else:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


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
    """The statistics of this rank's linears from one pass over ``samples``, by HF weight
    name, each as the whole linear in one process would see it (:func:`stats_windows` with
    every layer in one window)."""
    stats: CalibrationStats = {}
    for window in stats_windows(model, samples, None, progress):
        stats.update(window)
    return stats


def stats_windows(model, samples: list[torch.Tensor], budget_bytes: int | None,
                  progress: bool = True) -> Iterator[CalibrationStats]:
    """The statistics of this rank's linears, a window of consecutive decoder layers at a
    time: each window's accumulators (an ``in x in`` fp32 Hessian per linear) fit
    ``budget_bytes`` (None: no limit; a layer that alone does not fit is a window of its
    own), and the calibration samples run through ``model`` once per window; each yielded
    dict holds the linears of one window that this rank owns. Every rank runs the same
    number of passes (pipeline stages run together).

    ``model``: :class:`mswift.export.model.MegatronModel`, at any layout. Data-parallel ranks
    run different samples; when MoE tokens travel between them (expert parallelism) the
    samples of an incomplete last step are left out (a stand-in row would reach other
    ranks' experts), with a note."""
    from mswift.export.model import DataParallel

    samples = model.fit(samples)
    if not samples:
        raise ValueError("--calib-samples: no calibration sample is long enough for this "
                         "layout")
    dp = DataParallel.current()
    steps = dp.steps(len(samples), drop_remainder=dp.expert_parallel)
    if dp.expert_parallel and len(samples) % dp.size:
        if len(samples) < dp.size:
            raise ValueError(f"--calib-samples: {len(samples)} calibration samples for "
                             f"{dp.size} data-parallel ranks with expert parallelism; at "
                             f"least {dp.size} are needed")
        _note(f"calibrating on {len(steps) * dp.size} of {len(samples)} samples (a multiple "
              f"of the {dp.size} data-parallel ranks: MoE tokens travel between them)")
    windows = _windows(list(model.quantizable_linears()), budget_bytes)
    passes = max(all_ranks(len(windows)))
    for i in range(passes):
        window = windows[i] if i < len(windows) else []
        label = "calibration" if passes == 1 else f"calibration {i + 1}/{passes}"
        yield _one_pass(model, samples, steps, window, label if progress else None)


def _layer(name: str) -> int:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return -1 if match is None else int(match.group(1))


def _windows(linears: list, budget_bytes: int | None) -> list[list]:
    """``linears`` ((module, names) in model order) in windows of whole decoder layers."""
    layers: dict[int, list] = {}
    for module, names in linears:
        layers.setdefault(_layer(names[0]), []).append((module, names))
    windows: list[list] = []
    size = 0
    for members in layers.values():
        cost = sum(4 * _in_features(m) ** 2 for m, _ in members)
        if not windows or (budget_bytes is not None and size + cost > budget_bytes):
            windows.append([])
            size = 0
        windows[-1].extend(members)
        size += cost
    return windows


def _in_features(module) -> int:
    return module.weight.shape[1] * (_tp_size(module) if _input_is_split(module) else 1)


def _one_pass(model, samples, steps, window: list, label: str | None) -> CalibrationStats:
    from megatron.core import parallel_state as ps

    from mswift.runtime.device import local_device

    accumulators: list[_Accumulator] = []
    handles = []
    now = {"step": 0, "mute": False}

    def hook(module, args, acc):
        x = _gather_input(module, args[0])  # (a collective: on every rank of the group)
        if acc.accumulates and not now["mute"]:
            acc.add(x, now["step"])

    order = sorted({key for keys in all_ranks([tuple(n) for _, n in window]) for key in keys})
    index = {key: i for i, key in enumerate(order)}
    for module, hf_names in window:
        acc = _Accumulator(hf_names, _in_features(module))
        acc.expert = bool(getattr(module, "is_expert", False))
        # Who keeps what: the tensor-parallel ranks of a linear see the same (gathered)
        # input, so one of them accumulates; its data-parallel replicas see other rows and
        # all accumulate, to be added up; one of those owns the result. Spread by linear.
        i = index[tuple(hf_names)]
        (tp_rank, tp), (dp_rank, dp) = _position(module, acc.expert)
        acc.accumulates = tp_rank == i % tp
        acc.owned = acc.accumulates and dp_rank == (i // tp) % dp
        accumulators.append(acc)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, acc=acc: hook(mod, args, acc)))
    try:
        todo = list(enumerate(steps))
        if label is not None:
            from tqdm import tqdm

            todo = tqdm(todo, desc=label, unit="step", file=sys.stderr)
        for step, row in todo:
            now.update(step=step, mute=row is None)
            model.logits(samples[0 if row is None else row])
    finally:
        for handle in handles:
            handle.remove()
    device = local_device()
    if ps.model_parallel_is_initialized():
        for expert in (False, True):  # each group's reductions in the same order on every rank
            group = (ps.get_expert_data_parallel_group() if expert
                     else ps.get_data_parallel_group())
            for acc in accumulators:
                if acc.expert == expert and acc.accumulates:
                    acc.reduce(group, device)
    stats: CalibrationStats = {}
    for acc in accumulators:
        if acc.owned:
            one = acc.stats()  # one object for the linears that read one input
            stats.update((name, one) for name in acc.names)
    return stats


def _position(module, expert: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(rank, size) of this rank in ``module``'s tensor-parallel group and in its
    data-parallel group (an expert's: the expert data-parallel group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = getattr(module, "tp_group", None)
    tp = ((0, 1) if group is None or not dist.is_initialized()
          else (dist.get_rank(group), dist.get_world_size(group)))
    if not ps.model_parallel_is_initialized():
        return tp, (0, 1)
    if expert:
        return tp, (ps.get_expert_data_parallel_rank(), ps.get_expert_data_parallel_world_size())
    return tp, (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())


def all_ranks(value) -> list:
    """``value`` of every rank, by rank (``[value]`` without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _input_is_split(module) -> bool:
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    return isinstance(module, RowParallelLinear) and module.input_is_parallel


def _tp_size(module) -> int:
    import torch.distributed as dist

    group = getattr(module, "tp_group", None)
    return 1 if group is None or not dist.is_initialized() else dist.get_world_size(group)


def _note(text: str) -> None:
    from mswift.bridge.convert import rank

    if rank() == 0:
        print(f"mswift export: {text}", file=sys.stderr, flush=True)


def assign_owners(held: list[list[str]]) -> set[str]:
    """The names this rank quantizes. ``held``: the HF names of each linear whose statistics
    this rank holds (or every rank can quantize: a scheme without statistics); each linear
    goes to one of the ranks that hold it, spread evenly, the same answer on every rank."""
    import torch.distributed as dist

    mine = {tuple(names) for names in held}
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {n for names in mine for n in names}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    holders: dict[tuple[str, ...], list[int]] = {}
    for r, keys in enumerate(everyone):
        for key in keys:
            holders.setdefault(tuple(key), []).append(r)
    me = dist.get_rank()
    owned: set[str] = set()
    for i, key in enumerate(sorted(holders)):
        ranks = holders[key]
        if ranks[i % len(ranks)] == me:
            owned.update(key)
    return owned


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

