"""The megatron model an export calibrates and evaluates: built and loaded by the code
``mswift verify`` and training use, in one process at TP1 (a torch_dist checkpoint of any
layout reshards on load, a legacy one is read through its weight map), fp32."""
from __future__ import annotations

import dataclasses

import torch

from mswift.export.schemes import is_quantizable


class MegatronModel:
    def __init__(self, hf, ckpt_dir, seq_len: int):
        from mswift.bridge.layout import Layout, build_chunks
        from mswift.bridge.verify import _load_weights, _padded_vocab

        self.hf = hf
        padded = _padded_vocab(hf, ckpt_dir, 1)
        model = dataclasses.replace(hf.model, make_vocab_size_divisible_by=padded)
        run_hf = dataclasses.replace(hf, model=model)
        self.chunks = build_chunks(run_hf.run_config(Layout(), seq_length=seq_len))
        self.wmap = run_hf.weight_map(padded)
        _load_weights(self.chunks, hf, ckpt_dir, self.wmap)

    def quantizable_linears(self):
        """(module, the quantizable HF weight names its weight holds) of each linear."""
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
                if names:
                    yield module, names

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 logits [batch, seq, vocab] of ``tokens`` [batch, seq]."""
        from mswift.bridge.forward import megatron_logits

        return megatron_logits(self.chunks, tokens, self.hf.model.vocab_size).cpu()

    def load(self, ckpt) -> None:
        """Replace the weights with an HF checkpoint's (an
        :class:`~mswift.bridge.hf_io.HFCheckpoint`: the dequantized export)."""
        from mswift.bridge.model_io import HFSource, load_into_model

        load_into_model(self.chunks, HFSource(ckpt, self.wmap))
