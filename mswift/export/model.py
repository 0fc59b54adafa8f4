"""The megatron model an export calibrates and evaluates: built and loaded by the code
``mswift verify`` and training use, at the export's parallel layout (a torch_dist checkpoint of
any layout reshards on load, a legacy one is read through its weight map), fp32, on megatron-
core's local spec (its layer norms are modules of their own, so that a hook on a linear sees
the normalised input the linear multiplies; Transformer Engine's spec fuses the norm into the
linear)."""
from __future__ import annotations

import dataclasses

import torch

from mswift.export.schemes import is_quantizable
from mswift.export.stacked import indexed_names


class MegatronModel:
    def __init__(self, hf, ckpt_dir, seq_len: int, layout=None):
        from mswift.bridge.layout import Layout, build_chunks, launch_world_size
        from mswift.bridge.verify import _load_weights, _padded_vocab

        layout = Layout() if layout is None else layout
        hf.check_layout(layout, launch_world_size(), seq_length=seq_len)
        self.hf, self.layout = hf, layout
        padded = _padded_vocab(hf, ckpt_dir, layout.tp)
        model = dataclasses.replace(hf.model, make_vocab_size_divisible_by=padded // layout.tp,
                                    transformer_impl="local")
        run_hf = dataclasses.replace(hf, model=model)
        self.chunks = build_chunks(run_hf.run_config(layout, seq_length=seq_len))
        self.wmap = run_hf.weight_map(padded)
        _load_weights(self.chunks, hf, ckpt_dir, self.wmap)

    def fit(self, samples: list[torch.Tensor]) -> list[torch.Tensor]:
        """``samples`` as this layout runs them: under sequence parallelism each is cut to a
        multiple of the tensor-parallel size (its ranks split the sequence evenly; a padded
        token would reach the experts), and one left shorter than 2 tokens is dropped."""
        if not (self.layout.sequence_parallel and self.layout.tp > 1):
            return samples
        tp = self.layout.tp
        cut = [t[:, : t.shape[1] // tp * tp] for t in samples]
        return [t for t in cut if t.shape[1] >= 2]

    def quantizable_linears(self):
        """(module, the quantizable HF weight names its weight holds) of each linear of this
        rank, in the model's order."""
        from mswift.bridge.model_io import global_name

        shapes = self.wmap.hf_shapes()
        for chunk in self.chunks:
            for local, module in chunk.named_modules():
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                    continue
                try:
                    _, hf_names = self.wmap.lookup(global_name(chunk, local + ".weight"))
                except KeyError:
                    continue
                names = [n for n in hf_names if n in shapes and is_quantizable(n, shapes[n])]
                for name in hf_names:  # one expert's slice of stacked experts (Llama-4)
                    names.extend(indexed_names(name) or [])
                if names:
                    yield module, names

    def logits(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits [batch, seq, vocab] of ``tokens`` [batch, seq] on the ranks of the last
        pipeline stage (gathered over tensor parallelism), None on the others."""
        from mswift.bridge.forward import megatron_logits

        logits = megatron_logits(self.chunks, tokens, self.hf.model.vocab_size)
        return None if logits is None else logits.cpu()

    def load(self, ckpt) -> None:
        """Replace the weights with an HF checkpoint's (an
        :class:`~mswift.bridge.hf_io.HFCheckpoint`: the dequantized export)."""
        from mswift.bridge.model_io import HFSource, load_into_model

        load_into_model(self.chunks, HFSource(ckpt, self.wmap))


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Where this rank stands among the model's replicas: ``size`` data-parallel ranks each
    run their own rows; ``expert_parallel``: MoE tokens travel between them (a rank's experts
    see other ranks' rows)."""

    rank: int = 0
    size: int = 1
    expert_parallel: bool = False

    @classmethod
    def current(cls) -> DataParallel:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if not dist.is_initialized() or not ps.model_parallel_is_initialized():
            return cls()
        return cls(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                   ps.get_expert_model_parallel_world_size() > 1)

    def steps(self, count: int, drop_remainder: bool) -> list[int | None]:
        """The row this rank runs at each step (row ``step * size + rank``); None where the
        last step has no row for it (the rank runs a stand-in row whose results are not
        used). ``drop_remainder``: the rows of an incomplete last step are not run at all."""
        full = count // self.size
        steps: list[int | None] = [s * self.size + self.rank for s in range(full)]
        if count % self.size and not drop_remainder:
            last = full * self.size + self.rank
            steps.append(last if last < count else None)
        return steps
