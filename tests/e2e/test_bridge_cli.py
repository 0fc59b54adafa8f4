"""The conversion tools and ``mswift verify`` on real files: HF -> megatron -> HF gives back
every tensor bit for bit (names, dtypes, index, config and tokenizer files), legacy reshards,
verify fails a corrupted checkpoint, and bad input is refused without leaving output behind.

Legacy conversions need no process group, so most run in this process; each command line is
also run once as a subprocess, exactly as documented.
"""
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mswift.bridge.cli import convert_main, hf_to_mcore_main, mcore_to_hf_main, reshard_main
from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.testing.files import snapshot
from mswift.testing.hf_models import hf_logits, save_tiny_hf_model
from mswift.testing.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run(cmd, timeout=300):
    # A conversion run in this process (torch_dist) keeps its process group, and the port it
    # put in MASTER_PORT, bound: a child must pick its own.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {(f, d): save_tiny_hf_model(f, root / f"{f}-{d}", dtype=DTYPES[d])
              for f in FAMILIES for d in DTYPES}
    # A multi-shard source (model.safetensors.index.json).
    models[("llama", "sharded")] = save_tiny_hf_model("llama", root / "llama-sharded",
                                                      dtype=torch.bfloat16, max_shard_size="60KB")
    return models


def read_hf_dir(path: Path) -> dict:
    """Every tensor of an HF dir, checking its index against the files."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors, nbytes = {}, 0
    for file in sorted(set(index["weight_map"].values())):
        part = load_file(path / file)
        assert all(index["weight_map"][n] == file for n in part), f"{file}: index disagrees"
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"])
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == nbytes
    return tensors


def original_tensors(path: Path) -> dict:
    if (path / "model.safetensors").is_file():
        return load_file(path / "model.safetensors")
    return read_hf_dir(path)


def assert_same_hf(back: Path, original: Path):
    got, want = read_hf_dir(back), original_tensors(original)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert filecmp.cmp(back / name, original / name, shallow=False), name


def assert_no_output(out: Path):
    assert not out.exists(), f"{out} left behind"
    assert not out.with_name(out.name + ".tmp").exists(), "partial output left behind"


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_legacy_tp2_pp2_hf_is_bit_exact(hf, tmp_path, family, dtype):
    ep = 2 if family == "qwen3_moe" else 1
    legacy = hf_to_mcore(hf[(family, dtype)], tmp_path / "legacy", "legacy", tp=2, pp=2, ep=ep,
                         progress=False)
    dirs = sorted(p.name for p in (legacy / "iter_0000000").iterdir())
    suffix = ["_000", "_001"] if ep == 2 else [""]
    assert dirs == sorted(f"mp_rank_{t:02d}_{p:03d}{e}" for t in range(2) for p in range(2)
                          for e in suffix)
    assert (legacy / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    back = mcore_to_hf(legacy, tmp_path / "back", progress=False)
    assert_same_hf(back, hf[(family, dtype)])


def test_multi_shard_source_and_output(hf, tmp_path):
    src = hf[("llama", "sharded")]
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    legacy = hf_to_mcore(src, tmp_path / "legacy", "legacy", tp=2, progress=False)
    back = mcore_to_hf(legacy, tmp_path / "back", max_shard_bytes=40_000, progress=False)
    assert len(list(back.glob("model-*-of-*.safetensors"))) > 2
    assert_same_hf(back, src)


def test_transformers_loads_the_converted_model(hf, tmp_path):
    src = hf[("qwen2", "fp32")]  # tied embeddings: no lm_head written
    back = mcore_to_hf(hf_to_mcore(src, tmp_path / "l", "legacy", tp=2, progress=False),
                       tmp_path / "back", progress=False)
    tokens = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(hf_logits(back, tokens), hf_logits(src, tokens))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(back)).convert_tokens_to_ids("w7") == 7


def test_reshard_legacy_tp2_to_tp1_pp2(hf, tmp_path):
    src = hf[("llama", "bf16")]
    tp2 = hf_to_mcore(src, tmp_path / "tp2", "legacy", tp=2, progress=False)
    proc = run([sys.executable, "checkpoint_convert/reshard.py", "--mcore-dir", str(tp2),
                "--out", str(tmp_path / "tp1pp2"), "--tp", "1", "--pp", "2", "--ep", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "tp1pp2"
    assert sorted(p.name for p in (out / "iter_0000000").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001"]
    first = torch.load(out / "iter_0000000" / "mp_rank_00_000" / "model_optim_rng.pt",
                       weights_only=False)
    assert first["args"].tensor_model_parallel_size == 1
    assert first["args"].pipeline_model_parallel_size == 2
    assert "decoder.layers.1.mlp.linear_fc1.weight" in first["model"]  # layers 0-1 of 4
    assert "decoder.layers.2.mlp.linear_fc1.weight" not in first["model"]
    assert_same_hf(mcore_to_hf(out, tmp_path / "back", progress=False), src)


def test_reshard_moe_over_experts(hf, tmp_path):
    src = hf[("qwen3_moe", "fp32")]
    a = hf_to_mcore(src, tmp_path / "a", "legacy", tp=2, pp=2, ep=2, progress=False)
    assert reshard_main(["--mcore-dir", str(a), "--out", str(tmp_path / "b"), "--tp", "1",
                         "--pp", "1", "--ep", "4"]) == 0
    assert len(list((tmp_path / "b" / "iter_0000000").iterdir())) == 4
    assert_same_hf(mcore_to_hf(tmp_path / "b", tmp_path / "back", progress=False), src)


def test_legacy_with_grouped_expert_names(hf, tmp_path):
    """--moe-grouped-gemm: rank files with the names moe_grouped_gemm models hold
    (``mlp.experts.linear_fc1.weight{i}``, one ``_extra_state`` per grouped layer), marked in
    Megatron-LM's args; they export back to the source bit for bit."""
    from mswift.bridge.legacy import FILE

    src, out = hf[("qwen3_moe", "fp32")], tmp_path / "grouped"
    assert hf_to_mcore_main(["--hf-dir", str(src), "--out", str(out), "--format", "legacy",
                             "--ep", "2", "--moe-grouped-gemm"]) == 0
    state = torch.load(out / "iter_0000000" / "mp_rank_00_001" / FILE, weights_only=False)
    experts = sorted(k for k in state["model"] if k.startswith("decoder.layers.0.mlp.experts."))
    assert state["args"].moe_grouped_gemm
    assert experts == [f"decoder.layers.0.mlp.experts.linear_fc{i}.{name}" for i in (1, 2)
                       for name in ("_extra_state", "weight0", "weight1")]
    assert_same_hf(mcore_to_hf(out, tmp_path / "back", progress=False), src)


def test_command_lines_legacy(hf, tmp_path):
    src = hf[("qwen2", "bf16")]
    out, back = tmp_path / "legacy", tmp_path / "back"
    proc = run([sys.executable, "checkpoint_convert/hf_to_mcore.py", "--hf-dir", str(src),
                "--out", str(out), "--format", "legacy", "--tp", "2", "--pp", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run([sys.executable, "-m", "mswift", "convert", "mcore-to-hf", "--mcore-dir",
                str(out), "--out", str(back)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_hf(back, src)


@pytest.mark.parametrize("family,dtype,flags", [
    ("qwen3_moe", "fp32", ["--tp", "2", "--ep", "2"]),
    ("llama", "bf16", ["--dtype", "fp32"]),  # stored as fp32, written back as bf16
    ("qwen2", "bf16", ["--pp", "2"]),  # bf16 parameters; tied embeddings
])
def test_command_lines_torch_dist(hf, tmp_path, family, dtype, flags):
    src, out, back = hf[(family, dtype)], tmp_path / "dist", tmp_path / "back"
    proc = run([sys.executable, "checkpoint_convert/hf_to_mcore.py", "--hf-dir", str(src),
                "--out", str(out), *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "iter_0000000" / "metadata.json").is_file()
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    proc = run([sys.executable, "checkpoint_convert/mcore_to_hf.py", "--mcore-dir", str(out),
                "--out", str(back)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_hf(back, src)


@pytest.mark.slow  # torchrun with 2 ranks
@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_mcore_to_hf_under_torchrun_shares_the_shards(hf, tmp_path, fmt):
    """Two ranks convert back to HF: each writes some of the shards, rank 0 the index."""
    src = hf[("qwen3_moe", "fp32")]
    ckpt = hf_to_mcore(src, tmp_path / "ckpt", fmt, tp=2, progress=False)
    back = tmp_path / "back"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "checkpoint_convert/mcore_to_hf.py",
                "--mcore-dir", str(ckpt), "--out", str(back), "--max-shard-size", "40000"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(list(back.glob("model-*.safetensors"))) > 4
    assert_same_hf(back, src)


# -- verify ---------------------------------------------------------------------------------


@pytest.mark.slow  # torchrun with 2 ranks
def test_verify_passes_under_torchrun_and_dumps_logits(hf, tmp_path):
    src = hf[("qwen3_moe", "fp32")]
    tokens = [[(7 * i + 3 * j) % 250 for j in range(12)] for i in range(2)]
    (tmp_path / "t.json").write_text(json.dumps(tokens))
    dump = tmp_path / "logits.pt"
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "mswift", "verify", "--hf-dir",
                str(src), "--tp", "2", "--pp", "1", "--ep", "1", "--tokens-file",
                str(tmp_path / "t.json"), "--dump-logits", str(dump)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "max abs logit diff" in proc.stdout
    logits = torch.load(dump)
    reference = hf_logits(src, torch.tensor(tokens))
    assert logits.shape == (2, 12, 250) and (logits - reference).abs().max() <= 1e-4
    # The model's own loss (vocab-parallel cross entropy over 256 rows at TP2) is transformers'
    # loss over the 250 real ids: the 6 padded rows stay out of the softmax.
    own = float(re.search(r"model's own loss ([0-9.]+)", proc.stdout).group(1))
    want = torch.nn.functional.cross_entropy(reference[:, :-1].reshape(-1, 250),
                                             torch.tensor(tokens)[:, 1:].reshape(-1)).item()
    assert abs(own - want) <= 1e-5 * want, (own, want)


def test_verify_fails_a_corrupted_checkpoint(hf, tmp_path):
    src = hf[("llama", "fp32")]
    legacy = hf_to_mcore(src, tmp_path / "legacy", "legacy", tp=2, progress=False)
    path = legacy / "iter_0000000" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.2.mlp.linear_fc2.weight"] *= 1.001  # a 0.1% error
    torch.save(state, path)
    proc = run([sys.executable, "-m", "mswift", "verify", "--hf-dir", str(src), "--mcore-dir",
                str(legacy), "--tp", "1", "--pp", "1", "--ep", "1"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "FAIL" in proc.stdout


class _RunsCommand:
    """Unpickling this runs ``command`` through os.system (what an attacker would ship)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_verify_refuses_a_poisoned_metadata_and_runs_nothing(hf, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from mswift.bridge.dist_bytes import torch_dist_dir

    src = hf[("llama", "fp32")]
    root = hf_to_mcore(src, tmp_path / "dist", "torch_dist", progress=False)
    ckpt = torch_dist_dir(root)  # the iteration folder holding .metadata
    marker = tmp_path / "ran"
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    metadata.planner_data = {"x": _RunsCommand(f"touch {marker}")}
    (ckpt / ".metadata").write_bytes(__import__("pickle").dumps(metadata))
    proc = run([sys.executable, "-m", "mswift", "verify", "--hf-dir", str(src), "--mcore-dir",
                str(root), "--tp", "1", "--pp", "1", "--ep", "1"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"{ckpt / '.metadata'}: names posix.system" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


# -- bad input ------------------------------------------------------------------------------


def broken_copy(src: Path, dst: Path, config=None, tensors=None) -> Path:
    """A copy of an HF dir with config.json values / tensors changed (None value = delete)."""
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        data.update(config)
        (dst / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = load_file(dst / "model.safetensors")
        for name, value in tensors.items():
            weights.pop(name) if value is None else weights.__setitem__(name, value)
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def convert_fails(src: Path, out: Path, *extra, fmt="legacy") -> None:
    code = hf_to_mcore_main(["--hf-dir", str(src), "--out", str(out), "--format", fmt, *extra])
    assert code == 2
    assert_no_output(out)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
@pytest.mark.parametrize("case", ["no_config", "model_type", "architecture", "missing",
                                  "unexpected", "shape", "truncated", "layout"])
def test_bad_input_is_refused_by_name_without_output(hf, tmp_path, capsys, case, fmt):
    src = hf[("qwen3", "fp32")]
    extra, named = [], None
    if case == "no_config":
        bad = broken_copy(src, tmp_path / "bad")
        (bad / "config.json").unlink()
        named = "config.json: not found"
    elif case == "model_type":
        bad, named = broken_copy(src, tmp_path / "bad", config={"model_type": "mamba"}), "mamba"
    elif case == "architecture":
        arch = {"architectures": ["Qwen3ForTokenClassification"]}
        bad = broken_copy(src, tmp_path / "bad", config=arch)
        named = "Qwen3ForTokenClassification"
    elif case == "missing":
        name = "model.layers.1.self_attn.k_norm.weight"
        bad, named = broken_copy(src, tmp_path / "bad", tensors={name: None}), name + ": missing"
    elif case == "unexpected":
        extra_t = {"model.layers.0.self_attn.rotary.bias": torch.zeros(3)}
        bad = broken_copy(src, tmp_path / "bad", tensors=extra_t)
        named = "model.layers.0.self_attn.rotary.bias: unexpected"
    elif case == "shape":
        bad = broken_copy(src, tmp_path / "bad", config={"intermediate_size": 128})
        named = "model.layers.0.mlp.gate_proj.weight: shape [96, 64]"
    elif case == "truncated":
        bad = broken_copy(src, tmp_path / "bad")
        data = (bad / "model.safetensors").read_bytes()
        (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
        named = "model.safetensors: not a readable safetensors file"
    else:
        bad, extra, named = src, ["--tp", "3"], "tensor_model_parallel_size=3"
    convert_fails(bad, tmp_path / "out", *extra, fmt=fmt)
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("fmt,dtype", [
    ("legacy", None), ("legacy", "bf16"),  # bytes copied; tensors made (fp32 -> bf16)
    ("torch_dist", None),  # bytes copied into .distcp items
])
def test_existing_output_and_failed_write_leave_nothing(hf, tmp_path, capsys, monkeypatch,
                                                        fmt, dtype):
    src = hf[("llama", "fp32")]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert hf_to_mcore_main(["--hf-dir", str(src), "--out", str(out), "--format", fmt]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").is_file()
    # A write that fails half way (disk full on the second rank file / checkpoint item)
    # removes the partial dir.
    import mswift.bridge.torch_file as torch_file

    calls = []
    real_write = torch_file._write_archive

    def failing_write(path, data_pkl, records, threads=1, fd=None, base=0):
        if fd != torch_file.DRY_RUN:  # a dry run only lays an archive out
            calls.append(path)
        if len(calls) == 2 and fd != torch_file.DRY_RUN:
            def full(fd, offset):
                raise OSError(28, "No space left on device")

            records = records[:1] + [(key, nbytes, full, phase)
                                     for key, nbytes, _, phase in records[1:]]
            if fmt == "torch_dist":  # one tensor per item
                records = [(key, nbytes, full, phase) for key, nbytes, _, phase in records]
        return real_write(path, data_pkl, records, threads, fd, base)

    monkeypatch.setattr(torch_file, "_write_archive", failing_write)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        hf_to_mcore(src, fresh, fmt, tp=2, dtype=dtype, progress=False)
    assert len(calls) >= 2
    assert_no_output(fresh)


@pytest.mark.parametrize("tool", ["hf-to-mcore", "mcore-to-hf", "reshard"])
def test_an_existing_out_or_a_stale_tmp_is_refused_and_left_as_it_is(hf, tmp_path, capsys,
                                                                       tool):
    src = hf[("llama", "bf16")]
    inputs = {"hf-to-mcore": ["--hf-dir", str(src), "--format", "legacy"],
              "mcore-to-hf": ["--mcore-dir", str(tmp_path / "ckpt")],
              "reshard": ["--mcore-dir", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "1",
                          "--ep", "1"]}[tool]
    hf_to_mcore(src, tmp_path / "ckpt", "legacy", progress=False)
    out, tmp = tmp_path / "out", tmp_path / "out.tmp"
    for case in ("full", "empty", "file", "stale tmp"):
        for path in (out, tmp):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        if case == "file":
            out.write_text("mine")
        else:
            target = tmp if case == "stale tmp" else out
            target.mkdir()
            if case != "empty":
                (target / "keep.txt").write_text("mine")
        before = snapshot(tmp_path)
        assert convert_main([tool, *inputs, "--out", str(out)]) == 2, case
        err = capsys.readouterr().err
        if case == "stale tmp":
            assert f"--out {out}: {tmp} exists" in err and "is not deleted" in err, err
        else:
            assert f"--out {out}: already exists and is not written over" in err, err
        assert snapshot(tmp_path) == before, case
    # The command line says so too (exit code 2), and the stale OUT.tmp is still there.
    proc = run([sys.executable, "-m", "mswift", "convert", tool, *inputs, "--out", str(out)])
    assert proc.returncode == 2 and f"{tmp} exists" in proc.stderr, proc.stderr[-3000:]
    assert snapshot(tmp_path) == before
    shutil.rmtree(tmp)  # once the user removed it, the conversion runs
    assert convert_main([tool, *inputs, "--out", str(out)]) == 0
    assert out.is_dir() and not tmp.exists()


def test_legacy_needs_expert_tp_equal_to_tp(hf, tmp_path, capsys):
    out = tmp_path / "out"
    assert hf_to_mcore_main(["--hf-dir", str(hf[("qwen3_moe", "fp32")]), "--out", str(out),
                             "--format", "legacy", "--tp", "2", "--etp", "1"]) == 2
    assert "--etp 1: the legacy format needs expert TP equal to --tp 2" in capsys.readouterr().err
    assert_no_output(out)


def test_reshard_refuses_a_layout_that_does_not_divide(hf, tmp_path, capsys):
    legacy = hf_to_mcore(hf[("qwen3_moe", "fp32")], tmp_path / "l", "legacy", progress=False)
    out = tmp_path / "out"
    assert reshard_main(["--mcore-dir", str(legacy), "--out", str(out), "--tp", "1",
                         "--pp", "3", "--ep", "3"]) == 2
    err = capsys.readouterr().err
    assert "expert_model_parallel_size=3: must divide num_experts=4" in err
    assert "pipeline_model_parallel_size=3: must divide num_layers=2" in err
    assert_no_output(out)
    assert mcore_to_hf_main(["--mcore-dir", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_missing_hf_config_is_named(hf, tmp_path, capsys):
    """A checkpoint that carries no HF config needs --hf-dir; an --hf-dir without config.json
    is named as such (not blamed on the checkpoint)."""
    ckpt = hf_to_mcore(hf[("llama", "fp32")], tmp_path / "td", "torch_dist", progress=False)
    shutil.rmtree(ckpt / "hf")  # as a training run's checkpoint: no HF files inside
    out = tmp_path / "out"
    assert mcore_to_hf_main(["--mcore-dir", str(ckpt), "--out", str(out)]) == 2
    assert f"{ckpt}: carries no hf/config.json" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert mcore_to_hf_main(["--mcore-dir", str(ckpt), "--hf-dir", str(empty), "--out",
                             str(out)]) == 2
    assert f"--hf-dir {empty}: no config.json there" in capsys.readouterr().err
    assert_no_output(out)
    assert mcore_to_hf_main(["--mcore-dir", str(ckpt), "--hf-dir", str(hf[("llama", "fp32")]),
                             "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
