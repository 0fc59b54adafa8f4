"""Checkpoints and HF folders from elsewhere run no code and leak no files: a ``.metadata``
pickle that would call ``os.system`` is refused (named, nothing run) by every reader, a real
one still reads as PyTorch reads it; an HF index naming files outside the folder and symlinked
tokenizer / config files are refused."""
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from mswift.bridge.convert import hf_to_mcore, mcore_to_hf
from mswift.bridge.dist_bytes import torch_dist_dir
from mswift.bridge.errors import BridgeError
from mswift.bridge.hf_io import HFCheckpoint
from mswift.bridge.safe_load import SafeTorchDistLoadStrategy, read_dcp_metadata
from mswift.testing.hf_models import read_safetensors_dir, save_tiny_hf_model


class RunsCommand:
    """Unpickling this runs ``command`` through os.system (what an attacker would ship)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def poison_metadata(ckpt: Path, marker: Path) -> Path:
    """Replace ckpt/.metadata by the real metadata with a command hidden in it."""
    metadata = FileSystemReader(str(ckpt)).read_metadata()
    metadata.planner_data = {"x": RunsCommand(f"touch {marker}")}
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    return ckpt / ".metadata"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    hf = save_tiny_hf_model("llama", root / "hf")
    return hf, hf_to_mcore(hf, root / "mcore", "torch_dist", progress=False)


def test_the_payload_runs_code_under_plain_pickle(tmp_path):
    """The test's own check: plain pickle.load of the file does run the command."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(RunsCommand(f"touch {marker}")))
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"],
                   check=True)
    assert marker.exists()


def test_a_real_metadata_reads_as_pytorch_reads_it(converted):
    ckpt = torch_dist_dir(converted[1])
    ours, theirs = read_dcp_metadata(ckpt), FileSystemReader(str(ckpt)).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data


def test_a_poisoned_metadata_is_refused_by_every_reader(converted, tmp_path):
    hf, mcore = converted
    poisoned = tmp_path / "mcore"
    shutil.copytree(mcore, poisoned)
    marker = tmp_path / "ran"
    path = poison_metadata(torch_dist_dir(poisoned), marker)
    pattern = rf"{path}: names posix\.system"
    with pytest.raises(BridgeError, match=pattern):  # the conversion (byte path)
        mcore_to_hf(poisoned, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()
    with pytest.raises(BridgeError, match=pattern):  # PyTorch's reader (dtype-cast fallback)
        read_dcp_metadata(path.parent)
    with pytest.raises(BridgeError, match=pattern):  # megatron-core's load (verify, training)
        SafeTorchDistLoadStrategy().load_sharded_metadata(path.parent)
    assert not marker.exists()
    # The untouched checkpoint still converts back, tensor for tensor.
    back = read_safetensors_dir(mcore_to_hf(mcore, tmp_path / "back", progress=False))
    original = read_safetensors_dir(hf)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_an_index_naming_files_outside_the_folder_is_refused(converted, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(converted[0], hf)
    shutil.copy(hf / "model.safetensors", tmp_path / "x.safetensors")
    names = HFCheckpoint(hf).names
    for outside in ("../x.safetensors", str(tmp_path / "x.safetensors")):
        index = {"metadata": {}, "weight_map": {name: outside for name in names}}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(BridgeError, match=rf"model.safetensors.index.json: lists the file "
                                              rf"'{outside}', outside"):
            HFCheckpoint(hf)


def test_a_symlinked_tokenizer_file_is_refused(converted, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(converted[0], hf)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the checkpoint")
    (hf / "tokenizer.json").unlink(missing_ok=True)
    (hf / "tokenizer.json").symlink_to(secret)
    with pytest.raises(BridgeError, match=rf"{hf / 'tokenizer.json'}: a symbolic link"):
        hf_to_mcore(hf, tmp_path / "mcore", "torch_dist", progress=False)
    assert not (tmp_path / "mcore").exists() and not (tmp_path / "mcore.tmp").exists()


def test_a_hugging_face_cache_snapshot_converts(converted, tmp_path):
    # The hub cache keeps each file once in blobs/ and links it from snapshots/<rev>/: those
    # links are the model's own files, so a snapshot folder converts (copies of the content).
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(converted[0].iterdir())):
        shutil.copy(path, blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    out = hf_to_mcore(snapshot, tmp_path / "mcore", "torch_dist", progress=False)
    back = mcore_to_hf(out, tmp_path / "back", progress=False)
    assert not (Path(back) / "config.json").is_symlink()
    assert (Path(back) / "config.json").read_bytes() == (converted[0] / "config.json").read_bytes()
    original, returned = read_safetensors_dir(converted[0]), read_safetensors_dir(Path(back))
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
