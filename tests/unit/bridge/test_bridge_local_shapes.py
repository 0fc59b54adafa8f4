"""``Transform.local_shape`` (a TP slice's shape from the HF shapes alone, what a streamed write
announces before reading) and ``Transform.tiles`` (the slice as rectangles of the HF tensors,
what the byte copies copy) against the slices ``local`` and ``split`` actually give, for every
tensor of every family's tiny model at TP 1 and 2."""
import pytest
import torch

from mswift.bridge.hf_io import HFCheckpoint
from mswift.models.registry import (
    dims_for,
    families,
    model_config_from_hf,
    padded_vocab_for,
)
from mswift.models.weight_map import SliceReader, WeightMap, matrix_shape
from mswift.testing.hf_models import save_tiny_hf_model

FAMILIES = [f.name for f in families()]


def every_tensor(ckpt: HFCheckpoint):
    """(rule, HF names, TP size, dims) of every megatron tensor of the model, at TP 1 and 2."""
    family, model = model_config_from_hf(ckpt.config)
    for tp in (1, 2):
        wmap = WeightMap(family.weight_rules, dims_for(model, padded_vocab_for(model, tp)))
        for mcore in wmap.mcore_names():
            rule, hf_names = wmap.lookup(mcore)
            yield mcore, rule, hf_names, tp, wmap.dims


@pytest.mark.parametrize("name", FAMILIES)
def test_local_shape_is_the_shape_of_local_and_split(tmp_path, name):
    """Also: the merged slices give the HF tensors back (``to_hf``); one expert of a stacked
    tensor (Llama-4) is read through the bridge's SliceReader."""
    ckpt = SliceReader(HFCheckpoint(save_tiny_hf_model(name, tmp_path / name)))
    for mcore, rule, hf_names, tp, d in every_tensor(ckpt.src):
        transform = rule.transform
        shards = [transform.local(ckpt, hf_names, r, tp, d) for r in range(tp)]
        full = transform.merge(shards, d)
        expected = transform.local_shape(rule.hf_shapes(d), tp, d)
        for r, shard in enumerate(shards):
            assert tuple(shard.shape) == expected, (mcore, tp, r)
            assert tuple(transform.split(full, r, tp, d).shape) == expected, (mcore, tp, r)
        if not transform.pads:
            for hf_name, tensor in zip(hf_names, transform.to_hf(full, d)):
                assert torch.equal(tensor, ckpt.read(hf_name)), (mcore, hf_name, tp)


def _from_tiles(ckpt, hf_names, tiles, shape, dtype):
    """A TP slice assembled from ``Transform.tiles`` (what the byte copies write)."""
    out = torch.empty(matrix_shape(shape), dtype=dtype)
    at = 0
    for tile in tiles:
        assert tile.at_row == at and tile.cols == out.shape[1], tile  # stacked, full width
        if tile.part is None:
            out[at:at + tile.rows] = 0
        else:
            hf = ckpt.read(hf_names[tile.part])
            hf = hf.reshape(matrix_shape(tuple(hf.shape)))
            out[at:at + tile.rows] = hf[tile.row:tile.row + tile.rows,
                                        tile.col:tile.col + tile.cols]
        at += tile.rows
    assert at == out.shape[0]
    return out.reshape(shape)


@pytest.mark.parametrize("name", FAMILIES)
def test_tiles_give_the_slices_local_reads(tmp_path, name):
    ckpt = HFCheckpoint(save_tiny_hf_model(name, tmp_path / name))
    for mcore, rule, hf_names, tp, d in every_tensor(ckpt):
        shape = rule.transform.local_shape(rule.hf_shapes(d), tp, d)
        if rule.transform.name.startswith("input_major"):  # Llama-4 experts: transposes
            with pytest.raises(NotImplementedError, match="not a byte copy"):
                rule.transform.tiles(rule.hf_shapes(d), 0, tp, d)
            continue
        for r in range(tp):
            tiles = rule.transform.tiles(rule.hf_shapes(d), r, tp, d)
            expected = rule.transform.local(ckpt, hf_names, r, tp, d)
            got = _from_tiles(ckpt, hf_names, tiles, shape, expected.dtype)
            assert torch.equal(got, expected), (mcore, tp, r)
