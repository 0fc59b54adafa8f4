"""Attention padded for TP=2 (9/3-style heads -> whole all-zero KV groups added, the way
examples/smollm2/prepare.py pads SmolLM2) comes back with its original head counts from every
HF export: ``save_hf`` after training at TP=2 and ``mcore_to_hf`` after a TP=2 conversion.

A tiny Llama with 6 query heads in 3 KV groups is padded to 8 / 4. Each export must have the
original config head counts, hold the real heads' weights bit for bit as the padded model holds
them, and give transformers' logits of the padded model (1e-5); padding that is not zero any
more is refused by name.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from mswift.bridge.errors import BridgeError
from mswift.bridge.head_padding import PADDING_FILE, pad_heads, write_padding_record
from mswift.testing import run_ranks
from mswift.testing.hf_models import hf_logits, read_safetensors_dir, save_tiny_hf_model

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "data" / "tiny_corpus.txt"
HEADS = dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96)  # head_dim 16
TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1, 64, 300, 12, 8]])


def pad_like_prepare(original: Path, out: Path, record: bool = True) -> dict:
    """prepare.py's way: HF state dict + config padded with pad_heads, saved by transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
    config, state = model.config, dict(model.state_dict())
    padding = pad_heads(state, config, tp=2)
    padded = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    padded.load_state_dict(state)
    padded.save_pretrained(out)
    for path in original.iterdir():  # tokenizer files
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(path, out / path.name)
    if record:
        write_padding_record(out, padding)
    return padding


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from mswift.testing.tokenizers import train_chatml_tokenizer, write_chat_jsonl

    root = tmp_path_factory.mktemp("padding")
    original = save_tiny_hf_model("llama", root / "original", vocab_size=384, **HEADS)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (original / name).unlink(missing_ok=True)
    train_chatml_tokenizer(CORPUS, original)
    padding = pad_like_prepare(original, root / "padded")
    assert padding == {"original": {"num_attention_heads": 6, "num_key_value_heads": 3},
                       "padded": {"num_attention_heads": 8, "num_key_value_heads": 4},
                       "head_dim": 16}
    write_chat_jsonl(CORPUS, root / "chat.jsonl")
    return root


def real_part(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The original heads' part of a padded tensor (6 of 8 heads, 3 of 4 groups; dim 16)."""
    if name.endswith("q_proj.weight"):
        return tensor[:6 * 16]
    if name.endswith(("k_proj.weight", "v_proj.weight")):
        return tensor[:3 * 16]
    if name.endswith("o_proj.weight"):
        return tensor[:, :6 * 16]
    return tensor


def assert_unpadded_export(export: Path, padded: Path) -> None:
    config = json.loads((export / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (6, 3)
    assert not (export / PADDING_FILE).exists()
    got, want = read_safetensors_dir(export), read_safetensors_dir(padded)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], real_part(name, tensor)), name
    torch.testing.assert_close(hf_logits(export, TOKENS), hf_logits(padded, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_padded_model_is_the_original(models):
    torch.testing.assert_close(hf_logits(models / "padded", TOKENS),
                               hf_logits(models / "original", TOKENS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_mcore_to_hf_after_a_tp2_conversion_gives_the_original_heads(models, tmp_path, fmt):
    from mswift.bridge.convert import hf_to_mcore, mcore_to_hf

    hf_to_mcore(models / "padded", tmp_path / "mcore", fmt, tp=2 if fmt == "legacy" else 1,
                progress=False)
    assert (tmp_path / "mcore" / "hf" / PADDING_FILE).is_file()  # travels with the config
    mcore_to_hf(tmp_path / "mcore", tmp_path / "export", progress=False)
    assert_unpadded_export(tmp_path / "export", models / "padded")
    original = read_safetensors_dir(models / "original")
    assert all(torch.equal(t, original[n]) for n, t in read_safetensors_dir(tmp_path / "export").items())


def test_padding_that_is_not_zero_is_refused_by_name(models, tmp_path):
    from mswift.bridge.convert import hf_to_mcore, mcore_to_hf

    broken = tmp_path / "broken"
    shutil.copytree(models / "padded", broken)
    state = read_safetensors_dir(broken)
    state["model.layers.2.self_attn.o_proj.weight"][:, 6 * 16 + 3] = 0.5
    from safetensors.torch import save_file

    for file in broken.glob("*.safetensors"):
        file.unlink()
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    hf_to_mcore(broken, tmp_path / "mcore", "legacy", tp=2, progress=False)
    with pytest.raises(BridgeError, match=r"not all zero(.|\n)*layers\.2\.self_attn\.o_proj"):
        mcore_to_hf(tmp_path / "mcore", tmp_path / "export", progress=False)
    assert not (tmp_path / "export").exists() and not (tmp_path / "export.tmp").exists()


def train_and_export(hf_model: str, plain_copy: str, data: str, save: str) -> None:
    """Rank body: SFT at TP=2 + SP with save_hf (unpadded export), then the same trained model
    written once more through an hf_model copy without the padding record (padded export)."""
    from mswift.bridge.hf_checkpoint import save_hf_checkpoint
    from mswift.config import load_config
    from mswift.train.loop import run_training, setup

    cfg = load_config(None, [
        f"hf_model={hf_model}", "mode=sft", f"dataset=[{data}]", "tensor_model_parallel_size=2",
        "sequence_parallel=true", "seq_length=128", "micro_batch_size=1",
        "global_batch_size=2", "train_iters=3", "lr=1e-2", "lr_warmup_iters=1", f"save={save}",
        "save_hf=true", "log_interval=1"])
    state = setup(cfg)
    run_training(cfg, state)
    state.cfg.model.hf_model = plain_copy
    save_hf_checkpoint([ddp.module for ddp in state.model], state.cfg, Path(save) / "hf_padded")


def test_save_hf_after_training_at_tp2_gives_the_original_heads(models, tmp_path):
    plain = tmp_path / "padded_without_record"
    shutil.copytree(models / "padded", plain)
    (plain / PADDING_FILE).unlink()
    run_ranks(2, train_and_export, str(models / "padded"), str(plain),
              str(models / "chat.jsonl"), str(tmp_path / "run"))
    export, padded = tmp_path / "run" / "hf", tmp_path / "run" / "hf_padded"
    assert json.loads((padded / "config.json").read_text())["num_attention_heads"] == 8
    assert_unpadded_export(export, padded)
    trained, before = read_safetensors_dir(export), read_safetensors_dir(models / "original")
    assert any(not torch.equal(trained[n], before[n]) for n in before)  # it did train
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    out = model.generate(TOKENS[:, :4], min_new_tokens=3, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
