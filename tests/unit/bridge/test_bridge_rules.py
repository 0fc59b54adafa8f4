"""Weight-map transforms against layouts written out by hand here (megatron-core's fused QKV
by query group, [gate; up] per TP rank, padded vocabulary rows)."""
import torch

from mswift.models.qwen3_moe import FAMILY as QWEN3_MOE
from mswift.models.weight_map import (
    FUSED_GATE_UP,
    FUSED_QKV,
    ROW_PARALLEL,
    VOCAB_PARALLEL,
    Dims,
    WeightMap,
)


class DictReader:
    """HF tensors held in a dict, read like HFCheckpoint (rows / columns)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def read(self, name, dim=None, start=0, stop=0):
        t = self.tensors[name]
        return t if dim is None else t.narrow(dim, start, stop - start)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype


def dims(**kw):
    base = dict(num_layers=1, hidden=3, heads=4, groups=2, head_dim=2, ffn=4, vocab=5,
                padded_vocab=8, tied=False)
    return Dims(**{**base, **kw})


def numbered(rows, cols, start):
    return torch.arange(start, start + rows * cols, dtype=torch.float32).reshape(rows, cols)


def test_fused_qkv_groups_query_heads_with_their_key_and_value():
    d = dims()
    q, k, v = numbered(8, 3, 0), numbered(4, 3, 100), numbered(4, 3, 200)  # [heads*hd, H]
    reader = DictReader({"q": q, "k": k, "v": v})
    # megatron-core: per group g: its query heads (heads/groups of them), key head g, value g.
    expected = []
    for g in range(2):
        for h in range(2):
            expected.append(q[(g * 2 + h) * 2:(g * 2 + h + 1) * 2])
        expected += [k[g * 2:(g + 1) * 2], v[g * 2:(g + 1) * 2]]
    expected = torch.cat(expected)
    assert torch.equal(FUSED_QKV.local(reader, ["q", "k", "v"], 0, 1, d), expected)
    halves = expected.chunk(2)  # TP ranks own whole groups: contiguous halves
    for rank in range(2):
        assert torch.equal(FUSED_QKV.local(reader, ["q", "k", "v"], rank, 2, d), halves[rank])
    back = FUSED_QKV.to_hf(FUSED_QKV.merge(list(halves), d), d)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_fused_qkv_bias():
    d = dims()
    q, k, v = torch.arange(8.0), torch.arange(100.0, 104), torch.arange(200.0, 204)
    fused = FUSED_QKV.local(DictReader({"q": q, "k": k, "v": v}), ["q", "k", "v"], 0, 1, d)
    assert fused.tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]


def test_gate_up_each_rank_holds_its_gate_rows_then_its_up_rows():
    d = dims()
    gate, up = numbered(4, 3, 0), numbered(4, 3, 100)
    reader = DictReader({"g": gate, "u": up})
    rank1 = FUSED_GATE_UP.local(reader, ["g", "u"], 1, 2, d)
    assert torch.equal(rank1, torch.cat([gate[2:], up[2:]]))
    shards = [FUSED_GATE_UP.local(reader, ["g", "u"], r, 2, d) for r in range(2)]
    full = FUSED_GATE_UP.merge(shards, d)
    assert torch.equal(full, torch.cat([gate, up]))
    assert torch.equal(FUSED_GATE_UP.split(full, 1, 2, d), rank1)
    assert all(torch.equal(a, b) for a, b in zip(FUSED_GATE_UP.to_hf(full, d), (gate, up)))


def test_row_parallel_splits_columns():
    w = numbered(3, 4, 0)
    local = ROW_PARALLEL.local(DictReader({"w": w}), ["w"], 1, 2, dims())
    assert torch.equal(local, w[:, 2:])


def test_vocab_rows_padded_with_zeros_and_repadded_for_another_tp():
    emb = numbered(5, 3, 1)  # vocab 5, padded to 8 over TP 2
    reader = DictReader({"e": emb})
    d = dims()
    rank0, rank1 = (VOCAB_PARALLEL.local(reader, ["e"], r, 2, d) for r in range(2))
    assert torch.equal(rank0, emb[:4])
    assert torch.equal(rank1[0], emb[4]) and not rank1[1:].any() and rank1.shape == (4, 3)
    full = VOCAB_PARALLEL.merge([rank0, rank1], d)
    assert torch.equal(VOCAB_PARALLEL.to_hf(full, d)[0], emb)
    wider = d.with_padded_vocab(12)  # e.g. TP 3: crop the old padding, pad anew
    parts = [VOCAB_PARALLEL.split(full, r, 3, wider) for r in range(3)]
    assert torch.equal(torch.cat(parts)[:5], emb) and not torch.cat(parts)[5:].any()


def test_weight_map_global_names_and_lookup():
    d = Dims(num_layers=2, hidden=8, heads=2, groups=1, head_dim=4, ffn=6, vocab=10,
             padded_vocab=16, tied=False, experts=3, moe_ffn=2, moe_layers=(True, False))
    wmap = WeightMap(QWEN3_MOE.weight_rules, d)
    rule, hf = wmap.lookup("decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight")
    assert rule.transform is FUSED_GATE_UP
    assert hf == ["model.layers.0.mlp.experts.2.gate_proj.weight",
                  "model.layers.0.mlp.experts.2.up_proj.weight"]
    names = wmap.mcore_names()
    assert names[0] == "embedding.word_embeddings.weight" and names[-1] == "output_layer.weight"
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names  # layer 1 is dense
    assert "decoder.layers.1.mlp.router.weight" not in names
    assert sum(".local_experts." in n for n in names) == 3 * 2  # fc1 + fc2 of 3 experts
    shapes = wmap.hf_shapes()
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (4, 8)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (8, 6)
