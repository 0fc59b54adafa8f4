"""torch.save's format written and read one tensor at a time: files torch.load reads as it reads
its own, LazyTensors made once each, in file order, one at a time, and torch.save files read
back tensor by tensor (views and shared storages included)."""
import argparse
import collections
import enum
import gc
import io
import os
import weakref
import zipfile

import pytest
import torch

from mswift.bridge.torch_file import (
    LazyTensor,
    Opaque,
    StoredTensor,
    TorchFileError,
    TorchGlobal,
    load_index,
    save_streaming,
)


def sample():
    """Tensors of every kind a checkpoint may hold, nested the way Megatron nests them."""
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    return {
        "model": collections.OrderedDict([
            ("bf16", torch.randn(5, 3).to(torch.bfloat16)),
            ("fp16", torch.randn(4).to(torch.float16)),
            ("int64", torch.arange(7)),
            ("bool", torch.tensor([True, False, True])),
            ("scalar", torch.tensor(2.5)),
            ("empty", torch.empty(0, 4)),
            ("transposed", base.t()),  # not contiguous
            ("rows", base[2:4]),  # two views of one storage
            ("cols", base[:, 1:3]),
            ("whole", base),
            ("again", base),  # the same tensor twice
            ("float8", torch.ones(3).to(torch.float8_e4m3fn)),
            ("layer._extra_state", None),
        ]),
        "checkpoint_version": 3.0,
        "iteration": 7,
        "args": argparse.Namespace(tensor_model_parallel_size=2, params_dtype=torch.bfloat16,
                                   vpp=None, names=["a", "b"], pair=(1, 2)),
        "nested": {"inner": {"t": torch.ones(2, 2, dtype=torch.float64)}},
    }


def load(path, **kwargs):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True, **kwargs)


def assert_same(a, b):
    """Equal structure; tensors equal in shape, dtype and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.dim() else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 and b.dim() else b)
    elif isinstance(a, dict):
        assert type(a) is type(b) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, argparse.Namespace):
        assert isinstance(b, argparse.Namespace)
        assert_same(vars(a), vars(b))
    else:
        assert a == b


def read_all(obj):
    """The object of load_index with every StoredTensor read (and torch globals resolved)."""
    if isinstance(obj, StoredTensor):
        return obj.read()
    if isinstance(obj, TorchGlobal):
        return obj.resolve()
    if isinstance(obj, dict):
        return type(obj)((k, read_all(v)) for k, v in obj.items())
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**read_all(vars(obj)))
    return obj


@pytest.mark.parametrize("mmap", [False, True])
def test_streamed_file_is_what_torch_load_reads(tmp_path, mmap):
    obj = sample()
    save_streaming(tmp_path / "x.pt", obj)
    assert_same(obj, load(tmp_path / "x.pt", mmap=mmap))
    assert_same(obj, torch.load(tmp_path / "x.pt", weights_only=False))


def test_views_are_written_without_their_base(tmp_path):
    big = torch.zeros(1000, 100)
    save_streaming(tmp_path / "x.pt", {"row": big[7], "col": big[:, 3]})
    sizes = [i.file_size for i in zipfile.ZipFile(tmp_path / "x.pt").infolist()
             if "/data/" in i.filename]
    assert sorted(sizes) == [400, 4000]


def test_lazy_tensors_made_once_each_in_file_order_one_at_a_time(tmp_path):
    made, alive = [], []

    def lazy(name, shape):
        def produce():
            assert all(ref() is None for ref in alive), "an earlier tensor is still in memory"
            made.append(name)
            tensor = torch.full(shape, float(len(made)), dtype=torch.bfloat16)
            alive.append(weakref.ref(tensor))
            return tensor
        return LazyTensor(shape, torch.bfloat16, produce)

    obj = {"b": lazy("b", (3, 2)), "inner": {"a": lazy("a", (4,))}, "c": lazy("c", ()),
           "real": torch.ones(2)}
    save_streaming(tmp_path / "x.pt", obj)
    gc.collect()
    assert made == ["b", "a", "c"]
    records = [i for i in zipfile.ZipFile(tmp_path / "x.pt").infolist() if "/data/" in i.filename]
    assert [r.filename.rsplit("/", 1)[1] for r in records] == ["0", "1", "2", "3"]
    assert [r.header_offset for r in records] == sorted(r.header_offset for r in records)
    loaded = load(tmp_path / "x.pt")
    assert torch.equal(loaded["b"], torch.full((3, 2), 1.0, dtype=torch.bfloat16))
    assert torch.equal(loaded["inner"]["a"], torch.full((4,), 2.0, dtype=torch.bfloat16))
    assert loaded["c"].shape == () and loaded["c"].item() == 3.0


def test_lazy_tensor_of_the_wrong_shape_is_refused_and_no_file_is_left(tmp_path):
    obj = {"w": LazyTensor((2, 3), torch.float32, lambda: torch.zeros(3, 2))}
    with pytest.raises(ValueError, match=r"announced as \[2, 3\] torch.float32, produced \[3, 2\]"):
        save_streaming(tmp_path / "x.pt", obj)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("writer", ["torch.save", "save_streaming"])
def test_index_reads_each_tensor_on_demand(tmp_path, writer):
    obj = sample()
    (torch.save if writer == "torch.save" else save_streaming)(
        *((obj, tmp_path / "x.pt") if writer == "torch.save" else (tmp_path / "x.pt", obj)))
    index = load_index(tmp_path / "x.pt")
    handle = index["model"]["bf16"]
    assert isinstance(handle, StoredTensor)
    assert handle.shape == (5, 3) and handle.dtype == torch.bfloat16 and handle.nbytes == 30
    assert isinstance(index["model"], collections.OrderedDict)
    assert index["args"].params_dtype == TorchGlobal("torch", "bfloat16")
    assert_same(obj, read_all(index))
    first, second = handle.read(), handle.read()
    first.zero_()  # each read is a fresh tensor
    assert torch.equal(second, obj["model"]["bf16"])


def test_index_of_views_sharing_one_storage(tmp_path):
    base = torch.arange(60, dtype=torch.int64).reshape(6, 10)
    views = {"a": base[1:3, 2:7], "b": base.t()[3:], "c": base[4], "d": base[:, 9],
             "e": base[2].expand(3, 10), "f": base.flatten()[5:6].reshape(())}
    torch.save(views, tmp_path / "x.pt")
    records = [i for i in zipfile.ZipFile(tmp_path / "x.pt").infolist() if "/data/" in i.filename]
    assert len(records) == 1  # torch.save keeps the one storage they share
    index = load_index(tmp_path / "x.pt")
    assert index["e"].stride == (0, 1) and index["b"].stride == (1, 10)
    for name, view in views.items():
        got = index[name].read()
        assert got.is_contiguous() and torch.equal(got, view), name


def test_truncated_or_foreign_files_are_refused_by_name(tmp_path):
    save_streaming(tmp_path / "x.pt", sample())
    data = (tmp_path / "x.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TorchFileError, match=r"cut\.pt: not a readable torch.save file"):
        load_index(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(TorchFileError, match=r"text\.pt: not a readable"):
        load_index(tmp_path / "text.pt")
    with pytest.raises(TorchFileError, match=r"missing\.pt"):
        load_index(tmp_path / "missing.pt")


class Backend(enum.Enum):  # like the enums Megatron-LM keeps in its args
    auto = 1
    local = 2


def test_other_classes_are_read_as_inert_records(tmp_path):
    """Anything but tensors, dicts and Namespaces is an Opaque record: a Megatron-LM file's
    numpy RNG state and enums load, and a pickle that would run code runs nothing."""
    import numpy as np

    state = {"t": torch.ones(1), "f": collections.Counter("ab"),
             "rng": {"np_rng_state": np.random.get_state(), "torch": torch.get_rng_state()},
             "mode": Backend.auto}
    torch.save(state, tmp_path / "x.pt")
    index = load_index(tmp_path / "x.pt")
    assert torch.equal(index["t"].read(), torch.ones(1))
    assert isinstance(index["f"], Opaque) and index["f"].qualname == "Counter"
    np_state = index["rng"]["np_rng_state"]
    assert isinstance(np_state, tuple) and np_state[0] == "MT19937"
    assert isinstance(np_state[1], Opaque) and np_state[1].module.startswith("numpy")
    assert torch.equal(index["rng"]["torch"].read(), state["rng"]["torch"])
    assert isinstance(index["mode"], Opaque)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    got = load_index(tmp_path / "evil.pt")["x"]
    assert isinstance(got, Opaque) and got.qualname == "system"
    assert not (tmp_path / "pwned").exists()


def test_read_of_a_file_cut_after_indexing(tmp_path):
    save_streaming(tmp_path / "x.pt", {"t": torch.ones(1000)})
    handle = load_index(tmp_path / "x.pt")["t"]
    with open(tmp_path / "x.pt", "r+b") as f:
        f.truncate(handle.offset + 100)
    with pytest.raises(TorchFileError, match=r"x\.pt: truncated"):
        handle.read()


@pytest.mark.parametrize("threads", [1, 3])
def test_write_torch_file_without_torch_objects(tmp_path, threads):
    """TensorRecords (typed and untyped storages, an empty one) filled by callbacks, one at a
    time or several at once, each at its phase in a page, and a TorchGlobal dtype: torch.load
    (also mmap) reads what torch.save of the same tensors would give, and onto the meta device
    it finds each storage where it is; load_index reads it back."""
    from mswift.bridge import dtypes
    from mswift.bridge.torch_file import TensorRecord, write_torch_file
    from mswift.bridge.torch_zip import PAGE

    tensors = {"bf16": torch.randn(7, 5).to(torch.bfloat16), "f32": torch.randn(3),
               "u16": torch.arange(6, dtype=torch.int32).to(torch.uint16).reshape(2, 3),
               "f8": torch.randn(4).to(torch.float8_e4m3fn), "empty": torch.empty(0, 4)}
    phases = {"bf16": 1688, "f32": 0, "u16": 8, "f8": 4088, "empty": 64}

    def record(t, phase):
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return TensorRecord(tuple(t.shape), dtypes.of_torch(t.dtype),
                            lambda fd, offset: os.pwrite(fd, data, offset), phase)

    obj = {"model": {k: record(t, phases[k]) for k, t in tensors.items()}, "none": None,
           "args": argparse.Namespace(params_dtype=TorchGlobal("torch", "bfloat16"), tp=2)}
    write_torch_file(tmp_path / "x.pt", obj, threads=threads)
    for weights_only, mmap in ((True, False), (False, False), (True, True)):
        with torch.serialization.safe_globals([argparse.Namespace]):
            got = torch.load(tmp_path / "x.pt", weights_only=weights_only, mmap=mmap)
        assert got["args"].params_dtype is torch.bfloat16 and got["none"] is None
        for k, t in tensors.items():
            u = got["model"][k]
            assert u.dtype == t.dtype and u.shape == t.shape, k
            assert torch.equal(u.view(torch.uint8), t.view(torch.uint8)), k
    index = load_index(tmp_path / "x.pt")
    with torch.serialization.safe_globals([argparse.Namespace]):
        meta = torch.load(tmp_path / "x.pt", weights_only=True, map_location="meta")
    for k, t in tensors.items():
        assert torch.equal(index["model"][k].read().view(torch.uint8), t.view(torch.uint8)), k
        assert index["model"][k].offset % PAGE == phases[k], k
        assert meta["model"][k].untyped_storage()._checkpoint_offset == index["model"][k].offset


def test_archives_embedded_in_one_file(tmp_path):
    """Several archives written into one file at offsets laid out by a dry run (how a
    torch_dist .distcp file holds its items): each byte range is what torch.load reads,
    load_index reads each range, and the dry run's lengths are the lengths written."""
    from mswift.bridge import dtypes
    from mswift.bridge.torch_file import TensorRecord, write_torch_file
    from mswift.bridge.torch_zip import DRY_RUN

    tensors = [torch.randn(3, 4).to(torch.bfloat16), torch.randn(5), torch.randn(2, 2, 3)]

    def record(t):
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return TensorRecord(tuple(t.shape), dtypes.of_torch(t.dtype),
                            lambda fd, offset: os.pwrite(fd, data, offset))

    objects = [record(t) for t in tensors] + [[None]]
    lengths = [write_torch_file("x", obj, fd=DRY_RUN) for obj in objects]
    starts = [sum(lengths[:i]) + 7 for i in range(len(objects))]  # not aligned on purpose
    path = tmp_path / "items.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for obj, start, length in reversed(list(zip(objects, starts, lengths))):
            assert write_torch_file(path, obj, fd=fd, base=start) == length
    finally:
        os.close(fd)
    raw = path.read_bytes()
    assert len(raw) == starts[-1] + lengths[-1]
    for t, start, length in zip(tensors, starts, lengths):
        got = torch.load(io.BytesIO(raw[start:start + length]), weights_only=True)
        assert got.dtype == t.dtype and torch.equal(got, t)
        assert torch.equal(load_index(path, start, length).read(), t)
    assert torch.load(io.BytesIO(raw[starts[-1]:]), weights_only=True) == [None]
    with pytest.raises(TorchFileError, match="items.bin"):
        load_index(path, starts[1], lengths[1] - 10)  # cut: no end record
