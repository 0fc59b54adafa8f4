"""data_path / split read with Megatron-LM's meanings; bad values named before anything starts."""
import pytest
import torch

from mswift.config import load_config
from mswift.config.data_path import parse_data_path, parse_split
from mswift.config.schema import ConfigError


@pytest.mark.parametrize("items, want", [
    (["corpus"], (["corpus"], None)),
    (["0.7", "a", "0.3", "b"], (["a", "b"], [0.7, 0.3])),
    (["0.7 a 0.3 b"], (["a", "b"], [0.7, 0.3])),  # the command-line string form
    (["a", "b"], (["a", "b"], None)),  # no weights: by size (megatron-core)
    (["a", "b", "c"], (["a", "b", "c"], None)),
    (["2", "x/a", "1", "x/b"], (["x/a", "x/b"], [2.0, 1.0])),
])
def test_data_path_forms(items, want):
    assert parse_data_path(items) == want


@pytest.mark.parametrize("items, says", [
    (["0.5", "a", "half", "b"], "'half' in a weight place is not a number"),
    (["0.5", "a", "0.5"], "expected pairs"),
    (["a", "0.5"], "weights must come before each PREFIX"),
    (["-1", "a", "2", "b"], "expected numbers >= 0"),
    (["0", "a", "0", "b"], "positive sum"),
])
def test_bad_data_path_is_named(items, says):
    with pytest.raises(ValueError, match="data_path") as err:
        parse_data_path(items)
    assert says in str(err.value)


def test_split_like_megatron_lm():
    assert parse_split("969,30,1") == pytest.approx([0.969, 0.030, 0.001])
    assert parse_split("99,1") == pytest.approx([0.99, 0.01, 0.0])
    assert parse_split("8/1/1") == pytest.approx([0.8, 0.1, 0.1])
    for bad in ("train", "1,2,3,4", "0,0,0", "90,-10,0", ""):
        with pytest.raises(ValueError, match="split="):
            parse_split(bad)


def test_config_collects_data_path_and_split_problems():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data_path=[0.5, a, x, b]", "split=90;10", "dataset=[rows.jsonl]"])
    text = str(err.value)
    assert "data_path: 'x' in a weight place" in text
    assert "split='90;10'" in text
    assert "data_path and dataset/eval_dataset" in text
    cfg = load_config(None, ["data_path=0.5 a 0.5 b", "split=90,10,0"])
    assert cfg.data.data_path == ["0.5 a 0.5 b"]
    assert (cfg.data.reset_position_ids, cfg.data.reset_attention_mask,
            cfg.data.eod_mask_loss) == (False, False, False)  # Megatron-LM's defaults


def test_missing_prefix_is_named_before_start(tmp_path):
    from mswift.train.loop import setup

    (tmp_path / "a.bin").write_bytes(b"")
    (tmp_path / "a.idx").write_bytes(b"")
    (tmp_path / "b.idx").write_bytes(b"")
    cfg = load_config(None, [f"data_path=[1, {tmp_path}/a, 1, {tmp_path}/b, 1, {tmp_path}/c]",
                             f"tokenizer={tmp_path}", "split=100,0,0", "eval_interval=5"])
    with pytest.raises(ConfigError) as err:
        setup(cfg)  # raises before any process group or model exists
    text = str(err.value)
    assert f"{tmp_path}/b.bin not found" in text
    assert f"{tmp_path}/c.bin and {tmp_path}/c.idx not found" in text
    assert f"{tmp_path}/a." not in text
    assert "split='100,0,0': the valid part is empty" in text
    assert not torch.distributed.is_initialized()


def test_cu_seqlens_cut_after_every_end_of_document():
    from mswift.train.indexed_data import collate_documents

    eod = 9
    rows = [[1, 2, 9, 3, 4, 5, 9, 6], [7, 7, 7, 7, 7, 7, 7, 9]]
    items = [{"tokens": torch.tensor(r), "labels": torch.tensor(r), "loss_mask": torch.ones(8),
              "position_ids": torch.arange(8)} for r in rows]
    batch = collate_documents(items, eod, keep_documents_apart=True)
    assert batch["tokens"].shape == (2, 8)
    assert batch["cu_seqlens"].tolist() == [0, 3, 7, 8, 16]
    assert batch["cu_seqlens"].dtype == torch.int32 and int(batch["max_seqlen"]) == 8
    plain = collate_documents(items, eod, keep_documents_apart=False)
    assert "cu_seqlens" not in plain
