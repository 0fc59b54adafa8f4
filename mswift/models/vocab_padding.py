"""Keep Megatron's padded vocabulary rows out of every softmax.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by`` x TP, so the
output layer has rows (and the embedding has ids) that the tokenizer and the Hugging Face model
do not have. Their logits would take part in the softmax of the loss, of evaluation and of
sampling: the loss would then depend on the TP size and differ from transformers'. Here the
output layer's logits of padded ids are set to -inf on each TP rank's vocabulary shard (only
the rank(s) holding padded rows change anything), so their softmax probability, the gradient
of their logits and hence of their output-layer rows are exactly zero. The padded rows also
start at zero; with zero gradients Adam and decoupled weight decay keep them there.
"""
from __future__ import annotations

import torch


def padded_ids(start: int, width: int, vocab_size: int) -> slice | None:
    """The padded ids among ``[start, start + width)``, as a slice of that range (None: none)."""
    first = max(vocab_size - start, 0)
    return slice(first, width) if first < width else None


class PaddedLogitsMask:
    """Forward hook of an output layer (``ColumnParallelLinear``): logits of ids at or past
    ``vocab_size`` become -inf, on this rank's shard ``[..., padded_vocab / tp]`` or on logits
    gathered over TP ``[..., padded_vocab]``."""

    def __init__(self, vocab_size: int, padded_vocab: int, tp_rank: int, tp_size: int):
        self.vocab_size, self.padded_vocab = vocab_size, padded_vocab
        self.tp_rank, self.tp_size = tp_rank, tp_size

    def __call__(self, module, args, output):
        logits, bias = output
        width = logits.shape[-1]
        if width == self.padded_vocab:  # gathered (or TP=1): every id
            start = 0
        else:
            assert width * self.tp_size == self.padded_vocab, (width, self.padded_vocab)
            start = self.tp_rank * width
        pad = padded_ids(start, width, self.vocab_size)
        if pad is None:
            return output
        mask = torch.zeros(width, dtype=torch.bool, device=logits.device)
        mask[pad] = True
        # Out of place: the gradient of a masked logit is zero, of the others unchanged.
        return logits.masked_fill(mask, float("-inf")), bias


def mask_padded_vocabulary(chunk, vocab_size: int, padded_vocab: int, tp_rank: int,
                           tp_size: int) -> None:
    """Zero the padded rows of ``chunk``'s embedding and output layer (this rank's shards) and
    mask their logits. ``chunk`` is a megatron-core ``GPTModel`` (any pipeline stage)."""
    if vocab_size >= padded_vocab:
        return
    shard = padded_vocab // tp_size
    pad = padded_ids(tp_rank * shard, shard, vocab_size)
    embedding = getattr(chunk, "embedding", None)
    output_layer = getattr(chunk, "output_layer", None) if chunk.post_process else None
    weights = [getattr(embedding, "word_embeddings", None), output_layer]
    with torch.no_grad():
        for layer in weights:
            weight = getattr(layer, "weight", None)
            if weight is not None and pad is not None:
                weight[pad] = 0  # [vocab / tp, hidden]
    if output_layer is not None:
        output_layer.register_forward_hook(
            PaddedLogitsMask(vocab_size, padded_vocab, tp_rank, tp_size))
