"""The byte-copy conversions (``mswift.bridge.byte_copy``) against the tensor path: the same
rank files (every tensor, args included) and the same HF files, for every family at TP / PP /
EP / VPP layouts; column slices gathered in several bands; the buffered fallback where
``copy_file_range`` is refused; and no torch import on the command line."""
import argparse
import enum
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mswift.bridge import byte_copy, dtypes
from mswift.bridge.convert import hf_to_mcore, mcore_to_hf, reshard
from mswift.bridge.hf_io import HFCheckpoint
from mswift.bridge.layout import HFModel, Layout
from mswift.bridge.legacy import FILE, megatron_args, write_legacy
from mswift.bridge.model_io import HFSource
from mswift.bridge.torch_file import load_index
from mswift.bridge.torch_zip import PAGE
from mswift.models.registry import families
from mswift.testing.hf_models import save_tiny_hf_model

ROOT = Path(__file__).resolve().parents[3]
FAMILIES = [f.name for f in families()]
LAYOUTS = {"tp1": Layout(), "tp2_pp2": Layout(tp=2, pp=2),
           "pp2_vpp2": Layout(pp=2, vpp=2)}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {(name, dtype): save_tiny_hf_model(name, root / f"{name}-{dtype}",
                                              dtype=getattr(torch, dtype))
            for name in FAMILIES for dtype in ("bfloat16", "float32")}


def assert_same_files(a: Path, b: Path) -> None:
    """Two rank files hold the same object: keys, tensors bit for bit, args."""
    x, y = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert x.keys() == y.keys()
    for key in x:
        if isinstance(x[key], dict):
            assert list(x[key]) == list(y[key]), key
            for name, t in x[key].items():
                u = y[key][name]
                if t is None:
                    assert u is None, name
                else:
                    assert t.dtype == u.dtype and t.shape == u.shape, name
                    assert torch.equal(t.view(torch.uint8), u.view(torch.uint8)), name
        elif isinstance(x[key], argparse.Namespace):
            assert vars(x[key]) == vars(y[key])
        else:
            assert x[key] == y[key], key


def write_both(src: Path, tmp_path: Path, layout: Layout) -> tuple[Path, Path]:
    """Rank files of ``layout`` written by copying bytes and by making tensors."""
    model = HFModel.open(src)
    ckpt = HFCheckpoint(src)
    wmap = model.weight_map(model.padded_vocab(layout.tp))
    kind = ckpt.model_kind()
    assert byte_copy.hf_copy_applies(ckpt, wmap, kind)
    copied, made = tmp_path / "copied", tmp_path / "made"
    args = megatron_args(model.model, layout, wmap.dims.padded_vocab, kind, 0)
    byte_copy.write_legacy_copying(byte_copy.HFBytes(ckpt, wmap), wmap, layout, copied, args)
    dtype = dtypes.torch_dtype(kind)
    args = megatron_args(model.model, layout, wmap.dims.padded_vocab, dtype, 0)
    write_legacy(HFSource(ckpt, wmap), wmap, layout, made, dtype, args)
    return copied, made


def rank_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob(FILE))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_copied_rank_files_equal_made_ones(hf, tmp_path, family, dtype):
    layouts = dict(LAYOUTS)
    if family == "qwen3_moe":
        layouts["ep2_tp2"] = Layout(tp=2, ep=2)
    for name, layout in layouts.items():
        copied, made = write_both(hf[(family, dtype)], tmp_path / name, layout)
        files = rank_files(made)
        assert rank_files(copied) == files and len(files) == layout.tp * layout.pp * layout.ep
        for rel in files:
            assert_same_files(copied / rel, made / rel)


def safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed: its padding aside) and data bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.mark.parametrize("family", FAMILIES)
def test_copied_hf_files_equal_made_ones(hf, tmp_path, family, monkeypatch):
    """legacy (TP2 x PP2: column slices merged) -> HF, both paths, the same files (safetensors:
    the same header, but for its padding, and the same data bytes); and the copy is the
    original checkpoint's tensors."""
    src = hf[(family, "bfloat16")]
    leg = hf_to_mcore(src, tmp_path / "leg", "legacy", tp=2, pp=2, progress=False)
    copied = mcore_to_hf(leg, tmp_path / "copied", progress=False)
    monkeypatch.setattr(byte_copy, "legacy_to_hf_applies", lambda source, kinds: False)
    made = mcore_to_hf(leg, tmp_path / "made", progress=False)
    names = sorted(p.name for p in made.iterdir())
    assert sorted(p.name for p in copied.iterdir()) == names
    for name in names:
        if name.endswith(".safetensors"):
            assert safetensors_parts(copied / name) == safetensors_parts(made / name), name
        else:
            assert (copied / name).read_bytes() == (made / name).read_bytes(), name
    original, back = HFCheckpoint(src), HFCheckpoint(copied)
    assert sorted(original.names) == sorted(back.names)
    for name in original.names:
        assert torch.equal(original.read(name).view(torch.uint8),
                           back.read(name).view(torch.uint8)), name


def test_copies_line_pages_up(hf, tmp_path):
    """Each tensor copied into a rank file starts as far into a page as its HF source (so that
    ``copy_file_range`` moves whole pages); back to HF, each shard's data starts where the
    most tensor bytes line up with their stored pieces. The HF files here are not on pages
    (safetensors aligns to 8 bytes), so the offsets differ from tensor to tensor."""
    src = hf[("llama", "bfloat16")]
    leg = hf_to_mcore(src, tmp_path / "leg", "legacy", progress=False)
    ckpt = HFCheckpoint(src)
    wmap = HFModel.open(src).weight_map(HFModel.open(src).padded_vocab(1))
    stored = load_index(leg / "iter_0000000" / "mp_rank_00" / FILE)["model"]
    phases = {}
    for name, tensor in stored.items():
        _, hf_names = wmap.lookup(name) if tensor is not None else (None, [])
        if len(hf_names) == 1:  # one HF tensor: its rows copied as they are
            phases[hf_names[0]] = tensor.offset % PAGE
            assert phases[hf_names[0]] == ckpt.location(hf_names[0])[1] % PAGE, name
    assert len(phases) > 10 and len(set(phases.values())) > 1

    back = mcore_to_hf(leg, tmp_path / "back", progress=False)
    for shard in sorted(back.glob("*.safetensors")):
        header, _ = safetensors_parts(shard)
        start = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
        lined_up = {}  # data start in a page -> bytes of tensors lined up with their source
        for name, entry in header.items():
            if name in phases:
                begin, end = entry["data_offsets"]
                key = (phases[name] - begin) % PAGE
                lined_up[key] = lined_up.get(key, 0) + end - begin
        assert lined_up and lined_up.get(start % PAGE, 0) == max(lined_up.values()), shard


def test_slow_copies_into_several_shards(hf, tmp_path, monkeypatch):
    """Shards are filled on threads while the next ones are laid out: slow fills into many
    shards still finish before their source files are closed (no descriptor is opened again
    after, and left open), and the files are exact."""
    import time

    src = hf[("qwen3", "bfloat16")]
    leg = hf_to_mcore(src, tmp_path / "leg", "legacy", progress=False)
    real = byte_copy.copy_blocks

    def slow(*args):
        time.sleep(0.02)
        real(*args)

    monkeypatch.setattr(byte_copy, "copy_blocks", slow)
    open_fds = set(os.listdir("/proc/self/fd"))
    back = mcore_to_hf(leg, tmp_path / "back", max_shard_bytes=20000, progress=False)
    assert set(os.listdir("/proc/self/fd")) == open_fds
    assert len(list(back.glob("*.safetensors"))) > 3
    original, copied = HFCheckpoint(src), HFCheckpoint(back)
    assert sorted(original.names) == sorted(copied.names)
    for name in original.names:
        assert torch.equal(original.read(name).view(torch.uint8),
                           copied.read(name).view(torch.uint8)), name


def test_small_bands_and_refused_copy_file_range(hf, tmp_path, monkeypatch):
    """Column slices gathered a few rows at a time, and copies through a buffer where the
    kernel refuses ``copy_file_range`` (another file system), give the same files."""
    src = hf[("qwen2", "float32")]
    layout = Layout(tp=2)
    expected, _ = write_both(src, tmp_path / "plain", layout)

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(byte_copy, "BUFFER_BYTES", 3 * 64 * 4 + 12)  # a few rows per band
    monkeypatch.setattr(os, "copy_file_range", refuse)
    copied, made = write_both(src, tmp_path / "small", layout)
    for rel in rank_files(expected):
        assert_same_files(copied / rel, expected / rel)
        assert_same_files(made / rel, expected / rel)


@pytest.mark.parametrize("src_dtype,dtype", [("float32", "bf16"), ("bfloat16", "fp32")])
def test_a_changed_dtype_is_cast_as_the_tensor_path_does(hf, tmp_path, monkeypatch, src_dtype,
                                                         dtype):
    """--dtype other than the weights': HF -> legacy (TP2 x PP2: column slices too) casts the
    bytes; the rank files equal the tensor path's (torch's ``.to``). Back to HF, the tensors
    are cast to their original dtype; the files equal the tensor path's."""
    src = hf[("qwen2", src_dtype)]
    kind = dtypes.BY_NAME[dtypes.ALIASES[dtype]]
    model, ckpt = HFModel.open(src), HFCheckpoint(src)
    assert byte_copy.hf_copy_applies(ckpt, model.weight_map(model.padded_vocab(2)), kind)
    copied = hf_to_mcore(src, tmp_path / "copied", "legacy", tp=2, pp=2, dtype=dtype,
                         progress=False)
    back = mcore_to_hf(copied, tmp_path / "back", progress=False)
    with monkeypatch.context() as patch:
        patch.setattr(byte_copy, "hf_copy_applies", lambda *args: False)
        made = hf_to_mcore(src, tmp_path / "made", "legacy", tp=2, pp=2, dtype=dtype,
                           progress=False)
    files = rank_files(made)
    assert rank_files(copied) == files and len(files) == 4
    for rel in files:
        assert_same_files(copied / rel, made / rel)
    state = torch.load(copied / files[0], weights_only=False)
    assert all(t.dtype == dtypes.torch_dtype(kind) for t in state["model"].values()
               if t is not None)
    monkeypatch.setattr(byte_copy, "legacy_to_hf_applies", lambda source, kinds: False)
    made_back = mcore_to_hf(copied, tmp_path / "made_back", progress=False)
    original, a, b = HFCheckpoint(src), HFCheckpoint(back), HFCheckpoint(made_back)
    assert sorted(a.names) == sorted(b.names) == sorted(original.names)
    for name in original.names:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype == original.read(name).dtype, name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
    if src_dtype == "bfloat16":  # bf16 -> fp32 -> bf16 is exact
        for name in original.names:
            assert torch.equal(original.read(name).view(torch.uint8),
                               a.read(name).view(torch.uint8)), name


@pytest.mark.parametrize("fmt,flags", [("legacy", ["--tp", "2"]), ("torch_dist", []),
                                       ("torch_dist", ["--dtype", "fp32"])])
def test_command_lines_do_not_import_torch(hf, tmp_path, fmt, flags):
    """HF -> legacy / torch_dist -> HF from the command line, dtype kept or changed (and cast
    back): torch is never imported."""
    src = hf[("qwen3_moe" if fmt == "torch_dist" else "qwen3", "bfloat16")]
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    to_mcore = ["--hf-dir", str(src), "--out", str(ckpt), "--format", fmt, *flags]
    script = (
        "import json, runpy, sys\n"
        "for tool, args in [('hf_to_mcore', json.loads(sys.argv[1])), ('mcore_to_hf', "
        "['--mcore-dir', sys.argv[2], '--out', sys.argv[3]])]:\n"
        "    sys.argv = [tool] + args\n"
        "    try:\n"
        "        runpy.run_path(f'checkpoint_convert/{tool}.py', run_name='__main__')\n"
        "    except SystemExit as done:\n"
        "        assert not done.code, done.code\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, json.dumps(to_mcore), str(ckpt),
                           str(back)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    original, copied = HFCheckpoint(src), HFCheckpoint(back)
    assert sorted(original.names) == sorted(copied.names)
    for name in original.names:
        assert torch.equal(original.read(name).view(torch.uint8),
                           copied.read(name).view(torch.uint8)), name


RESHARDS = [((2, 2, 1), (1, 1, 1)), ((1, 1, 1), (2, 1, 1)), ((2, 1, 1), (1, 2, 1))]


@pytest.mark.parametrize("family", FAMILIES)
def test_copied_reshard_equals_made_one(hf, tmp_path, family, monkeypatch):
    """legacy layout A -> B by cutting the stored pieces (TP merges and splits, column slices,
    vocabulary padded for another TP size, experts over EP) equals the tensor path's."""
    src = hf[(family, "bfloat16")]
    cases = RESHARDS + ([((2, 1, 2), (1, 1, 1)), ((1, 1, 1), (2, 1, 2))]
                        if family == "qwen3_moe" else [])
    for i, ((tp, pp, ep), (tp2, pp2, ep2)) in enumerate(cases):
        leg = hf_to_mcore(src, tmp_path / f"leg{i}", "legacy", tp=tp, pp=pp, ep=ep,
                          progress=False)
        copied = reshard(leg, tmp_path / f"copied{i}", tp2, pp2, ep2, progress=False)
        with monkeypatch.context() as patch:
            patch.setattr(byte_copy, "reshard_applies", lambda source: False)
            made = reshard(leg, tmp_path / f"made{i}", tp2, pp2, ep2, progress=False)
        files = rank_files(made)
        assert rank_files(copied) == files and len(files) == tp2 * pp2 * ep2
        for rel in files:
            assert_same_files(copied / rel, made / rel)


class AttnBackend(enum.Enum):  # Megatron-LM keeps enums like this in its args
    auto = 5


@pytest.mark.parametrize("copy", [True, False])
def test_megatron_lm_rank_files_convert_back(hf, tmp_path, monkeypatch, copy):
    """Rank files as Megatron-LM's training writes them (torch.save itself; optimizer state,
    scheduler, RNG state with numpy arrays, an enum in args) convert back to the original HF
    tensors, by copying bytes and by making tensors."""
    import numpy as np

    src = hf[("llama", "bfloat16")]
    leg = hf_to_mcore(src, tmp_path / "leg", "legacy", tp=2, pp=2, progress=False)
    for path in leg.rglob(FILE):
        state = torch.load(path, weights_only=False)
        state["args"].attention_backend = AttnBackend.auto
        weights = {k: t for k, t in state["model"].items() if t is not None}
        state["optimizer"] = {"state": {i: {"exp_avg": torch.zeros_like(t, dtype=torch.float32)}
                                        for i, t in enumerate(weights.values())},
                              "param_groups": [{"lr": 1e-4, "params": list(range(len(weights)))}]}
        state["opt_param_scheduler"] = {"num_steps": 10, "decay_style": "cosine"}
        state["rng_state"] = [{"random_rng_state": (3, tuple(range(5)), None),
                               "np_rng_state": np.random.get_state(),
                               "torch_rng_state": torch.get_rng_state(),
                               "rng_tracker_states": {"model-parallel-rng": torch.ones(8)}}]
        torch.save(state, path)
    if not copy:
        monkeypatch.setattr(byte_copy, "legacy_to_hf_applies", lambda source, kinds: False)
    back = mcore_to_hf(leg, tmp_path / "back", progress=False)
    original, copied = HFCheckpoint(src), HFCheckpoint(back)
    assert sorted(original.names) == sorted(copied.names)
    for name in original.names:
        assert torch.equal(original.read(name).view(torch.uint8),
                           copied.read(name).view(torch.uint8)), name
