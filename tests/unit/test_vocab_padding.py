"""The padded-logits mask: on any TP rank's vocabulary shard (or on gathered logits), the
cross entropy over the padded vocabulary is torch's cross entropy over the real vocabulary, and
padded logits get exactly zero gradient."""
import pytest
import torch

from mswift.models.vocab_padding import PaddedLogitsMask

VOCAB, PADDED = 300, 512  # 300 padded for TP=2 (multiple of 256)


def masked_shards(logits: torch.Tensor, tp: int) -> torch.Tensor:
    """``logits`` [tokens, PADDED] split over ``tp`` ranks, each shard masked as its rank would,
    joined again."""
    shards = logits.chunk(tp, dim=-1)
    hooks = [PaddedLogitsMask(VOCAB, PADDED, rank, tp) for rank in range(tp)]
    return torch.cat([hook(None, (), (shard, None))[0] for hook, shard in zip(hooks, shards)], -1)


@pytest.mark.parametrize("tp", [1, 2, 4])  # TP=4: rank 1 partly padded, ranks 2-3 all padding
def test_masked_loss_is_the_real_vocabulary_loss(tp):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, PADDED, generator=generator, requires_grad=True)
    targets = torch.randint(0, VOCAB, (6,), generator=generator)

    loss = torch.nn.functional.cross_entropy(masked_shards(logits, tp), targets)
    loss.backward()
    want = torch.nn.functional.cross_entropy(logits.detach()[:, :VOCAB], targets)
    assert torch.allclose(loss, want, rtol=1e-6, atol=0)
    assert torch.count_nonzero(logits.grad[:, VOCAB:]) == 0
    assert torch.count_nonzero(logits.grad[:, :VOCAB]) == 6 * VOCAB


def test_gathered_logits_are_masked_and_shards_without_padding_untouched():
    logits = torch.randn(2, 3, PADDED)  # [batch, seq, vocab] gathered over TP=2
    out, bias = PaddedLogitsMask(VOCAB, PADDED, 1, 2)(None, (), (logits, "bias"))
    assert bias == "bias" and torch.equal(out[..., :VOCAB], logits[..., :VOCAB])
    assert bool((out[..., VOCAB:] == float("-inf")).all())
    first_half = logits[..., : PADDED // 2]  # rank 0 of TP=2: ids 0-255, all real
    assert PaddedLogitsMask(VOCAB, PADDED, 0, 2)(None, (), (first_half, None))[0] is first_half
