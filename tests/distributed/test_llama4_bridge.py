"""Llama-4 checkpoints through the bridge, in both HF layouts and both megatron formats: HF ->
megatron -> HF gives back every tensor bit for bit (names, dtypes, vision tower and projector
included) and the config, generation config and tokenizer files.

Two tiny models: Scout-like (every layer MoE) as ``Llama4ForCausalLM`` (keys ``model.*``,
``lm_head.weight``) in fp32, and Maverick-like (every second layer MoE) as the released
``Llama4ForConditionalGeneration`` (``language_model.model.*``, ``language_model.lm_head.weight``
beside ``vision_model.*`` and ``multi_modal_projector.*``) in bf16, both with 3 query heads per KV
group and a vocabulary of 250 (padded to 256 at TP2). Their stacked, input-major experts
(``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) are transposed into megatron's experts
and back.

* conversions (no process group): HF -> torch_dist / legacy at TP2 x EP2 (legacy also PP2) ->
  HF, by byte copies and, on the way back, by the tensor path; the legacy one also on the
  command line;
* four ranks at TP2 x EP2: each converted checkpoint loaded into the sharded model and written
  to HF by training's export (experts gathered from both EP ranks, the vision tower copied from
  ``hf_model``), the model saved as training saves torch_dist and that checkpoint converted
  back, and ``mswift verify --mcore-dir`` on two of the converted checkpoints (logits and
  loss equal transformers').
"""
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mswift.bridge import byte_copy, dist_bytes
from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.testing import run_ranks
from mswift.testing.hf_models import (
    read_safetensors_dir,
    save_tiny_hf_model,
    save_tiny_llama4_multimodal,
)

pytestmark = pytest.mark.slow  # Llama-4 conversions at every layout on 4 ranks

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("scout", "maverick")
FORMATS = ("torch_dist", "legacy")
LAYOUT = {"tp": 2, "ep": 2}
VERIFIED = (("maverick", "torch_dist"), ("scout", "legacy"))  # (model, format) verify checks
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama4")
    return {
        "scout": save_tiny_hf_model("llama4", root / "scout", seed=1,
                                    interleave_moe_layer_step=1),
        "maverick": save_tiny_llama4_multimodal(root / "maverick", dtype=torch.bfloat16, seed=2),
    }


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory):
    """(model, format) -> the checkpoint converted at TP2 x EP2 (Maverick legacy: also PP2)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for model in MODELS:
        for fmt in FORMATS:
            pp = 2 if (model, fmt) == ("maverick", "legacy") else 1
            out[(model, fmt)] = hf_to_mcore(hf_dirs[model], root / f"{model}-{fmt}", fmt,
                                            pp=pp, progress=False, **LAYOUT)
    return out


def assert_same_hf(back: Path, original: Path, aux: bool = True) -> None:
    """Every tensor of ``original`` in ``back`` bit for bit, with its dtype, and nothing else."""
    got, want = read_safetensors_dir(back), read_safetensors_dir(original)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name
    if aux:
        for name in AUX_FILES:
            assert filecmp.cmp(back / name, original / name, shallow=False), name


def test_hf_key_names_of_both_layouts(hf_dirs):
    """The names the bridge reads are the ones transformers writes (and the release holds)."""
    scout, maverick = (read_safetensors_dir(hf_dirs[m]) for m in MODELS)
    assert "model.layers.0.feed_forward.experts.gate_up_proj" in scout
    assert scout["model.layers.0.feed_forward.experts.gate_up_proj"].shape == (4, 96, 96)
    assert scout["model.layers.0.feed_forward.experts.down_proj"].shape == (4, 48, 96)
    assert "language_model.lm_head.weight" in maverick
    assert "language_model.model.layers.1.feed_forward.experts.gate_up_proj" in maverick
    assert "language_model.model.layers.0.feed_forward.gate_proj.weight" in maverick  # dense
    assert any(n.startswith("vision_model.") for n in maverick)
    assert any(n.startswith("multi_modal_projector.") for n in maverick)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", MODELS)
def test_round_trip_is_bit_exact(hf_dirs, converted, tmp_path, monkeypatch, model, fmt):
    ckpt = converted[(model, fmt)]
    assert_same_hf(mcore_to_hf(ckpt, tmp_path / "copied", progress=False), hf_dirs[model])
    # The tensor path (torch tensors instead of byte copies) gives the same.
    monkeypatch.setattr(byte_copy, "legacy_to_hf_applies", lambda source, kinds: False)
    monkeypatch.setattr(dist_bytes.DistBytes, "applies", lambda self, kinds: False)
    assert_same_hf(mcore_to_hf(ckpt, tmp_path / "made", progress=False), hf_dirs[model])


def test_multimodal_conversion_on_the_command_line(hf_dirs, tmp_path):
    src, out, back = hf_dirs["maverick"], tmp_path / "legacy", tmp_path / "back"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    for cmd in (["checkpoint_convert/hf_to_mcore.py", "--hf-dir", str(src), "--out", str(out),
                 "--format", "legacy", "--tp", "2", "--ep", "2"],
                ["checkpoint_convert/mcore_to_hf.py", "--mcore-dir", str(out), "--out",
                 str(back)]):
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((out / "iter_0000000").iterdir())) == 4  # TP2 x EP2 rank files
    assert_same_hf(back, src)


def test_export_without_the_vision_tower_is_refused(hf_dirs, converted, tmp_path):
    """A multimodal checkpoint's way back needs the vision weights: a template folder without
    them is refused by name, before anything is written."""
    from mswift.bridge.errors import BridgeError

    template = tmp_path / "template"
    template.mkdir()
    for name in AUX_FILES:
        (template / name).write_bytes((hf_dirs["maverick"] / name).read_bytes())
    with pytest.raises(BridgeError, match=r"vision_model.*--hf-dir"):
        mcore_to_hf(converted[("maverick", "legacy")], tmp_path / "back", hf_dir=template,
                    progress=False)
    assert not (tmp_path / "back").exists() and not (tmp_path / "back.tmp").exists()


# -- four ranks at TP2 x EP2 ------------------------------------------------------------------


def sharded_round_trips(models, verified):
    """Per model: each converted checkpoint loaded at TP2 x EP2 and exported to HF as training
    does (the weights zeroed before each load), then saved as training saves torch_dist; then
    ``mswift verify`` on the ``verified`` converted checkpoints."""
    import dataclasses

    import torch

    from mswift.bridge import verify
    from mswift.bridge.hf_checkpoint import save_hf_checkpoint
    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.legacy import LegacySource
    from mswift.bridge.model_io import load_into_model
    from mswift.bridge.torch_dist import load_torch_dist, save_torch_dist

    layout = Layout(sequence_parallel=True, **LAYOUT)  # megatron-core: MoE with TP needs SP
    for model in models:
        hf = HFModel.open(model["hf_dir"])
        cfg = hf.run_config(layout, dtype=model["dtype"])
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 hf_model=model["hf_dir"]))
        chunks = build_chunks(cfg)
        for fmt in FORMATS:
            with torch.no_grad():
                for param in chunks[0].parameters():
                    param.zero_()
            if fmt == "torch_dist":
                load_torch_dist(chunks, model["torch_dist"])
            else:
                wmap = hf.weight_map(hf.padded_vocab(LAYOUT["tp"]))
                load_into_model(chunks, LegacySource(model["legacy"], wmap))
            save_hf_checkpoint(chunks, cfg, model[f"{fmt}_hf"])
        save_torch_dist(chunks, model["saved_dist"])
    codes = {}
    for hf_dir, ckpt in verified:  # run_verify: main would end the process group
        args = verify.parser().parse_args(["--hf-dir", hf_dir, "--mcore-dir", ckpt, "--tp", "2",
                                           "--ep", "2", "--seq-len", "24"])
        codes[ckpt] = verify.run_verify(args)
    return codes


@pytest.fixture(scope="module")
def sharded(hf_dirs, converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    models = {m: {"hf_dir": str(hf_dirs[m]),
                  "dtype": torch.bfloat16 if m == "maverick" else torch.float32,
                  "saved_dist": str(root / f"{m}-dist"),
                  **{f: str(converted[(m, f)]) for f in FORMATS},
                  **{f"{f}_hf": str(root / f"{m}-{f}-hf") for f in FORMATS}}
              for m in MODELS}
    verified = [(str(hf_dirs[m]), str(converted[(m, f)])) for m, f in VERIFIED]
    codes = run_ranks(4, sharded_round_trips, list(models.values()), verified, timeout=600)
    return models, codes


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model", MODELS)
def test_sharded_export_is_bit_exact(hf_dirs, sharded, model, fmt):
    models, _ = sharded
    assert_same_hf(Path(models[model][f"{fmt}_hf"]), hf_dirs[model])


@pytest.mark.parametrize("model", MODELS)
def test_torch_dist_saved_at_tp2_ep2_converts_back(hf_dirs, sharded, tmp_path, model):
    models, _ = sharded
    back = mcore_to_hf(models[model]["saved_dist"], tmp_path / "back", hf_dir=hf_dirs[model],
                       progress=False)
    assert_same_hf(back, hf_dirs[model])


@pytest.mark.parametrize("model,fmt", VERIFIED)
def test_verify_passes_on_the_converted_checkpoint(converted, sharded, model, fmt):
    _, codes = sharded
    assert [c[str(converted[(model, fmt)])] for c in codes] == [0, 0, 0, 0]
