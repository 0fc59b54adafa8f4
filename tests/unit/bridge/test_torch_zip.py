"""torch.save's zip container written and read without torch: files torch.load reads (plain,
weights_only, mmap), zip64 forced with a small threshold, torch's own files indexed, and clear
errors for files that are not torch.save archives."""
import ctypes
import io
import os
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from mswift.bridge.torch_zip import (
    ALIGNMENT,
    TorchZipWriter,
    read_record,
    read_zip_directory,
)


def sample():
    return {"weight": torch.randn(5, 7).to(torch.bfloat16), "bias": torch.randn(3)}


def raw_bytes(tensor):
    return ctypes.string_at(tensor.data_ptr(), tensor.nbytes)


def torch_records(obj):
    """(name without the archive folder, bytes) of each record torch.save writes, in order."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return [(info.filename.partition("/")[2], archive.read(info))
                for info in archive.infolist()]


def write_like_torch(path, obj, archive="archive", zip64_threshold=None, hole=False):
    """torch.save's record set for ``obj`` (a dict of tensors, storages in dict order) written
    with TorchZipWriter: data/0 by os.pwrite, the others by os.copy_file_range from a file
    (or, with ``hole``, data/1 left unwritten)."""
    tensors = list(obj.values())
    kwargs = {} if zip64_threshold is None else {"zip64_threshold": zip64_threshold}
    source = f"{path}.source"
    with open(source, "wb") as file:
        file.write(b"".join(raw_bytes(t) for t in tensors))
    source_offsets = [sum(t.nbytes for t in tensors[:key]) for key in range(len(tensors))]
    with TorchZipWriter(path, archive, **kwargs) as writer, open(source, "rb") as src:
        for name, data in torch_records(obj):
            if not name.startswith("data/"):
                writer.add_bytes(name, data)
                continue
            key = int(name.removeprefix("data/"))
            assert data == raw_bytes(tensors[key])  # storage keys follow the dict's order
            offset = writer.reserve(name, len(data))
            assert offset % ALIGNMENT == 0
            if key == 0:
                assert os.pwrite(writer.fd, data, offset) == len(data)
            elif not hole:
                copied = os.copy_file_range(src.fileno(), writer.fd, len(data),
                                            source_offsets[key], offset)
                assert copied == len(data)
    os.unlink(source)


def assert_loads(path, obj):
    for kwargs in ({}, {"weights_only": True}, {"weights_only": False}, {"mmap": True}):
        loaded = torch.load(path, **kwargs)
        assert list(loaded) == list(obj)
        for key, tensor in obj.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), kwargs


@pytest.mark.parametrize("archive", ["archive", "model_optim_rng"])
def test_torch_load_reads_our_file(tmp_path, archive):
    obj = sample()
    path = tmp_path / "model.pt"
    write_like_torch(path, obj, archive)
    assert_loads(path, obj)
    with zipfile.ZipFile(path) as ours:
        names = [info.filename for info in ours.infolist()]
        assert ours.read(f"{archive}/data.pkl") == dict(torch_records(obj))["data.pkl"]
    assert names == [f"{archive}/{name}" for name, _ in torch_records(obj)]


def test_unwritten_reserved_range_reads_as_zeros(tmp_path):
    obj = sample()
    path = tmp_path / "hole.pt"
    write_like_torch(path, obj, hole=True)  # data/1 (the last data record) never written
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["weight"], obj["weight"])
    assert torch.equal(loaded["bias"], torch.zeros(3))
    offset, size = read_zip_directory(path)["data/1"]
    assert os.path.getsize(path) > offset + size


def test_read_zip_directory_on_torch_save_and_our_files(tmp_path):
    obj = sample()
    theirs, ours = tmp_path / "theirs.pt", tmp_path / "ours.pt"
    torch.save(obj, theirs)
    write_like_torch(ours, obj)
    for path in (theirs, ours):
        records = read_zip_directory(path)
        assert list(records) == [name for name, _ in torch_records(obj)]
        with open(path, "rb") as file:
            for key, tensor in enumerate(obj.values()):
                offset, size = records[f"data/{key}"]
                assert offset % ALIGNMENT == 0 and size == tensor.nbytes
                assert os.pread(file.fileno(), size, offset) == raw_bytes(tensor)
        assert all(offset % ALIGNMENT == 0 for offset, _ in records.values())
        assert read_record(path, "version") == b"3\n"
        assert read_record(path, "byteorder") == b"little"
        assert read_record(path, "data.pkl") == dict(torch_records(obj))["data.pkl"]


def zip64_end_record_used(path):
    """Whether the plain end record points to the zip64 one (its offset field is 0xFFFFFFFF)."""
    with open(path, "rb") as file:
        end = file.read()[-22:]
    assert end[:4] == b"PK\x05\x06"
    return struct.unpack("<I", end[16:20])[0] == 0xFFFF_FFFF


@pytest.mark.parametrize("threshold", [0, "middle", None])
def test_zip64_fields(tmp_path, threshold):
    """threshold 0: zip64 everywhere; "middle" (above every record's size): only the records
    whose header starts past it, and the end records; None: no zip64 fields."""
    obj = sample()
    if threshold == "middle":
        threshold = max(len(data) for _, data in torch_records(obj)) + 1
    path = tmp_path / "zip64.pt"
    write_like_torch(path, obj, zip64_threshold=threshold)
    assert_loads(path, obj)
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        assert [info.filename.partition("/")[2] for info in infos] == [
            name for name, _ in torch_records(obj)]
        assert archive.read("archive/data.pkl") == dict(torch_records(obj))["data.pkl"]
        assert archive.read("archive/version") == b"3\n"  # CRC checked by zipfile
    with_zip64 = [info.extra[:2] == b"\x01\x00" for info in infos]
    if threshold is None:
        assert not any(with_zip64) and not zip64_end_record_used(path)
    elif threshold == 0:
        assert all(with_zip64) and zip64_end_record_used(path)
    else:
        assert with_zip64 == [info.header_offset >= threshold for info in infos]
        assert all(info.file_size < threshold for info in infos)
        assert not with_zip64[0] and with_zip64[-1] and zip64_end_record_used(path)
    assert all(offset % ALIGNMENT == 0 for offset, _ in read_zip_directory(path).values())


def test_errors_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(sample(), good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:-30])
    with pytest.raises(ValueError, match=r"truncated\.pt: truncated or corrupt zip"):
        read_zip_directory(truncated)

    too_long = tmp_path / "too_long.pt"  # a directory whose record runs past the file's end
    entry = data.rindex(b"/data/1") - 46 - len(b"good")
    assert data[entry:entry + 4] == b"PK\x01\x02"
    too_long.write_bytes(data[:entry + 20] + struct.pack("<II", 10**6, 10**6) + data[entry + 28:])
    with pytest.raises(ValueError, match=r"too_long\.pt: truncated: record 'good/data/1' ends"):
        read_zip_directory(too_long)

    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello " * 100)
    with pytest.raises(ValueError, match=r"notes\.txt: not a zip archive"):
        read_zip_directory(not_zip)

    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"x" * 1000)
    with pytest.raises(ValueError, match=r"deflated\.pt: record 'archive/data.pkl' is compressed"):
        read_zip_directory(deflated)

    loose = tmp_path / "loose.zip"
    with zipfile.ZipFile(loose, "w") as archive:
        archive.writestr("data.pkl", b"x")
    with pytest.raises(ValueError, match=r"loose\.zip: record 'data.pkl' is not in a folder"):
        read_zip_directory(loose)

    with pytest.raises(ValueError, match=r"good\.pt: no record 'missing'"):
        read_record(good, "missing")


def test_writer_checks_and_abort(tmp_path):
    path = tmp_path / "aborted.pt"
    writer = TorchZipWriter(path)
    writer.add_bytes("data.pkl", b"pickle")
    with pytest.raises(ValueError, match="repeated record name"):
        writer.add_bytes("data.pkl", b"again")
    offset = writer.reserve("data/0", 8)
    os.pwrite(writer.fd, b"x" * 9, offset)  # one byte past the reserved range
    with pytest.raises(ValueError, match=r"aborted\.pt: .*outside a reserved range"):
        writer.reserve("data/1", 8)
    writer.abort()
    assert not path.exists()

    with pytest.raises(RuntimeError), TorchZipWriter(path) as writer:
        writer.add_bytes("data.pkl", b"pickle")
        raise RuntimeError("conversion failed")
    assert not path.exists()

    with pytest.raises(ValueError, match="outside a reserved range"), \
            TorchZipWriter(path) as writer:  # close fails: the file is removed
        os.pwrite(writer.fd, b"x", writer.reserve("data/0", 0))
    assert not path.exists()

    writer = TorchZipWriter(path)
    writer.close()
    with pytest.raises(ValueError, match="writer is closed"):
        writer.add_bytes("data.pkl", b"late")
    assert read_zip_directory(path) == {}


def test_module_imports_without_torch():
    code = ("import sys, mswift.bridge.torch_zip; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_records_reserved_on_a_page(tmp_path):
    """Storages reserved on a page, or some bytes into one (what the byte-copy writers do, to
    line up with their source) start there and torch.load (also mmap, also onto the meta
    device) reads them; an alignment that breaks torch's 64 bytes, or a phase outside the
    alignment, is refused."""
    from mswift.bridge.torch_zip import PAGE

    obj = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
           "c": torch.randn(2, 2)}
    phases = {"data/0": 0, "data/1": 1688, "data/2": 8}
    records = torch_records(obj)
    path = tmp_path / "paged.pt"
    with TorchZipWriter(path, archive="paged") as writer:
        for name, data in records:
            if name.startswith("data/"):
                offset = writer.reserve(name, len(data), PAGE, phases[name])
                assert offset % PAGE == phases[name]
                os.pwrite(writer.fd, data, offset)
            elif name != ".format_version":  # see torch_file._write_archive
                writer.add_bytes(name, data)
        with pytest.raises(ValueError, match="alignment 100"):
            writer.reserve("data/9", 4, 100)
        with pytest.raises(ValueError, match="phase 4096"):
            writer.reserve("data/9", 4, PAGE, PAGE)
    for mmap in (False, True):
        got = torch.load(path, weights_only=True, mmap=mmap)
        assert all(torch.equal(got[k], obj[k]) for k in obj)
    directory = read_zip_directory(path)
    assert {name: directory[name][0] % PAGE for name in phases} == phases
    meta = torch.load(path, weights_only=True, map_location="meta")
    assert {k: t.untyped_storage()._checkpoint_offset for k, t in meta.items()} == {
        "a": directory["data/0"][0], "b": directory["data/1"][0], "c": directory["data/2"][0]}
