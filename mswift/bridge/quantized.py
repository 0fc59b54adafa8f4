"""Quantized HF checkpoints read as plain weights (FP8 blocks, AWQ 4-bit), and FP8 written back.

A checkpoint whose config.json has a ``quantization_config`` is opened as a
:class:`DequantizedCheckpoint` (:func:`open_checkpoint`): it shows each quantized linear
weight under its plain name (``...q_proj.weight``, ``[out, in]``, float32) and hides the
tensors it is stored as, so the weight maps, the checks and every loading path read it like
any checkpoint. A slice is dequantized when it is read, from only the bytes it needs: a
tensor-parallel slice reads its rows or columns of the quantized tensor and the scale blocks
or groups that cover them, never the whole model (nor, mostly, the whole tensor).

* FP8 blocks (DeepSeek-V3's release; transformers' ``FineGrainedFP8Config``):
  ``quant_method: fp8``, ``weight_block_size: [br, bc]``; a weight ``[R, C]`` is stored as
  ``float8_e4m3fn`` with ``weight_scale_inv`` float32 ``[ceil(R/br), ceil(C/bc)]``, and
  ``w = q.float() * scale`` block by block, the last blocks cropped where R or C is not a
  multiple of the block (transformers' own dequantizer refuses those shapes).
* AWQ GEMM (AutoAWQ ``version: gemm``, e.g. DeepSeek-V3-0324-AWQ): ``qweight`` int32
  ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]``, ``scales`` fp16 ``[in/g, out]``;
  ``W[out, in] = ((q - z) * s)^T``. Each int32 packs 8 nibbles along ``out``: nibble i (bits
  4i..4i+3) of word c is column ``8c + AWQ_ORDER[i]`` (AutoAWQ's pack order, as GPTQModel's
  and AutoAWQ's ``packing_utils`` unpack it). Computed in float32, where ``(q - z) * s`` is
  exact (a 5-bit integer times an fp16 scale).

Writing FP8 back (:class:`Fp8Encoder`): a weight is re-quantized block by block as
``q = fp8(w / scale)``. A block keeps its stored scale when that is lossless, i.e. when
dequantizing the result gives back ``w`` exactly in the training dtype: always so for weights
that were loaded from the FP8 source and not changed (``q * s`` rounded to float32 or bfloat16
is within 2^-8 of ``q * s``, far inside half of e4m3's relative step, 2^-4, so ``w / s`` rounds
back to ``q``), which makes HF(FP8) -> megatron -> HF bit for bit. Any other block (trained
weights) gets a fresh scale, ``amax / 448`` (1 for an all-zero block), as DeepSeek and
transformers quantize: stale scales are never used for weights they no longer fit.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from mswift.bridge import dtypes
from mswift.bridge.errors import BridgeError
from mswift.bridge.hf_io import HFCheckpoint
from mswift.bridge.safetensors_file import SafetensorsFile, bytes_of, encode_header
from mswift.lazy_import import lazy_module
from mswift.models.hf_config import read_hf_config

torch = lazy_module("torch")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed word holds column 8c + AWQ_ORDER[i]
FP8_MAX = 448.0  # largest float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
# FP8 scales a converted megatron checkpoint carries in its hf/ folder, for the way back.
SCALES_FILE = "mswift_fp8_scales.safetensors"


@dataclass(frozen=True)
class Fp8Blocks:
    """``quant_method: fp8``: float8_e4m3fn weights with per-block float32 scales."""

    block: tuple[int, int]


@dataclass(frozen=True)
class AwqGemm:
    """``quant_method: awq``, ``version: gemm``: 4-bit weights, zero points and fp16 scales
    per group of ``group`` input columns."""

    group: int


def quantization_of(config: dict, where: str = "config.json") -> Fp8Blocks | AwqGemm | None:
    """The quantization a config.json declares (None: plain weights); every setting mswift
    cannot read is refused in one error."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise BridgeError(f"{where}: quantization_config is not a JSON object")
    method = qc.get("quant_method")
    problems = []

    def expect(key, ok, what, default=None):
        if not ok(qc.get(key, default)):
            problems.append(f"{where}: quantization_config.{key} = {qc.get(key, default)!r}, "
                            f"expected {what}")

    if method == "fp8":
        block = qc.get("weight_block_size")
        expect("weight_block_size", lambda v: isinstance(v, list) and len(v) == 2 and all(
            isinstance(b, int) and b > 0 for b in v), "[rows, columns] of a scale block")
        expect("fmt", lambda v: v in (None, "e4m3"), "e4m3 (float8_e4m3fn weights)")
        expect("activation_scheme", lambda v: v in (None, "dynamic"),
               "dynamic (static activation scales are not read)")
        expect("scale_fmt", lambda v: v in (None, "float"), "float (float32 scales)")
        result = Fp8Blocks(tuple(block)) if not problems else None
    elif method == "awq":
        expect("version", lambda v: str(v).lower() == "gemm", "gemm (AutoAWQ's GEMM layout)")
        expect("bits", lambda v: v == 4, "4", default=4)
        expect("zero_point", lambda v: v is True, "true (qzeros stored)", default=True)
        expect("group_size", lambda v: isinstance(v, int) and v > 0, "a positive group size")
        result = AwqGemm(qc.get("group_size")) if not problems else None
    else:
        problems.append(f"{where}: quantization_config.quant_method = {method!r}; mswift reads "
                        "fp8 (block-scaled float8_e4m3fn) and awq (GEMM) checkpoints")
    if problems:
        raise BridgeError(problems, headline="quantized checkpoint not readable")
    return result


def open_checkpoint(directory: str | Path) -> HFCheckpoint:
    """An HF checkpoint for reading weights: a :class:`DequantizedCheckpoint` if its
    config.json declares a quantization, else a plain :class:`HFCheckpoint`."""
    quant = quantization_of(read_hf_config(Path(directory)),
                            str(Path(directory) / "config.json"))
    return HFCheckpoint(directory) if quant is None else DequantizedCheckpoint(directory, quant)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _blocks(start: int, stop: int, size: int) -> tuple[int, int, int]:
    """The blocks of ``size`` that cover ``start:stop``: (first, past last, offset of
    ``start`` in the first)."""
    first = start // size
    return first, max(first, _ceil(stop, size)), start - first * size


def expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int],
                  row0: int = 0, col0: int = 0) -> torch.Tensor:
    """Per-block ``scale`` as one value per element: ``rows x cols`` elements starting
    ``row0`` / ``col0`` elements into the first block row / column of ``scale``."""
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[row0:row0 + rows, col0:col0 + cols]


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 ``[r, c]`` -> the 4-bit values ``[r, 8c]`` (int32, 0..15) in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # [r, c, 8]: nibble i of each word
    out = torch.empty_like(nibbles)
    out[..., list(AWQ_ORDER)] = nibbles  # nibble i -> column 8c + AWQ_ORDER[i]
    return out.reshape(words.shape[0], -1)


class DequantizedCheckpoint(HFCheckpoint):
    """An FP8 or AWQ checkpoint seen as plain float32 weights (see the module docstring);
    :attr:`raw` keeps the stored tensors' names, shapes and dtypes."""

    def __init__(self, directory: str | Path, quant: Fp8Blocks | AwqGemm):
        super().__init__(directory)
        self.quant = quant
        self.raw = dict(self._meta)  # stored name -> (shape, kind)
        self._parts: dict[str, tuple[str, ...]] = {}  # plain weight name -> stored names
        if isinstance(quant, Fp8Blocks):
            self._view_fp8(quant)
        else:
            self._view_awq(quant)

    def _show(self, name: str, parts: tuple[str, ...], shape: tuple[int, ...]) -> None:
        for part in parts:
            del self._meta[part]
        self._meta[name] = (shape, dtypes.BY_NAME["float32"])
        self.files[name] = self.files[parts[0]]
        self._parts[name] = parts

    def _view_fp8(self, quant: Fp8Blocks) -> None:
        problems = []
        for scale in [n for n in self.raw if n.endswith(SCALE_SUFFIX)]:
            name = scale[: -len(SCALE_SUFFIX)]
            if name not in self.raw:
                problems.append(f"{scale}: no {name} beside it in {self.dir}")
                continue
            shape, kind = self.raw[name]
            want = tuple(_ceil(s, b) for s, b in zip(shape, quant.block))
            if kind.name != "float8_e4m3fn" or len(shape) != 2:
                problems.append(f"{name}: {kind.name} {list(shape)}, expected a float8_e4m3fn "
                                "matrix (it has a weight_scale_inv)")
            elif self.raw[scale][0] != want or self.raw[scale][1].name != "float32":
                problems.append(f"{scale}: {self.raw[scale][1].name} {list(self.raw[scale][0])}, "
                                f"expected float32 {list(want)} (blocks of {list(quant.block)} "
                                f"over {list(shape)})")
            else:
                self._show(name, (name, scale), shape)
        problems += [f"{n}: float8_e4m3fn without a {n}{SCALE_SUFFIX}" for n, (_, k) in
                     self.raw.items() if k.name == "float8_e4m3fn" and n not in self._parts]
        if problems:
            raise BridgeError(problems, headline=f"{self.dir}: FP8 checkpoint not readable")

    def _view_awq(self, quant: AwqGemm) -> None:
        problems = []
        for qweight in [n for n in self.raw if n.endswith(".qweight")]:
            prefix = qweight[: -len("qweight")]
            parts = (qweight, prefix + "qzeros", prefix + "scales")
            missing = [p for p in parts[1:] if p not in self.raw]
            if missing:
                problems.append(f"{qweight}: no {', '.join(missing)} beside it in {self.dir}")
                continue
            rows, out = self.raw[qweight][0][0], self.raw[parts[2]][0][-1]
            groups = _ceil(rows, quant.group)
            want = {qweight: ((rows, out // 8), ("int32",)),
                    parts[1]: ((groups, out // 8), ("int32",)),
                    parts[2]: ((groups, out), ("float16", "bfloat16", "float32"))}
            bad = [f"{p}: {self.raw[p][1].name} {list(self.raw[p][0])}, expected {kinds[0]} "
                   f"{list(shape)} (in {rows}, out {out} a multiple of 8, group {quant.group})"
                   for p, (shape, kinds) in want.items()
                   if out % 8 or self.raw[p][0] != shape or self.raw[p][1].name not in kinds]
            problems += bad
            if not bad:
                self._show(prefix + "weight", parts, (out, rows))
        if problems:
            raise BridgeError(problems, headline=f"{self.dir}: AWQ checkpoint not readable")

    # -- reading -------------------------------------------------------------------------------

    def _raw_read(self, name: str, dim=None, start: int = 0, stop: int = 0) -> torch.Tensor:
        return self._open(self.files[name]).read(name, dim, start, stop)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0
             ) -> torch.Tensor:
        parts = self._parts.get(name)
        if parts is None:
            return super().read(name, dim, start, stop)
        rows, cols = self.shape(name)
        if dim is None:
            dim, start, stop = 0, 0, rows
        if dim not in (0, 1) or not 0 <= start <= stop <= (rows, cols)[dim]:
            raise ValueError(f"{name}: slice {start}:{stop} of dim {dim} outside {[rows, cols]}")
        if isinstance(self.quant, Fp8Blocks):
            return self._read_fp8(parts, dim, start, stop)
        return self._read_awq(parts, dim, start, stop)

    def _read_fp8(self, parts, dim: int, start: int, stop: int) -> torch.Tensor:
        """``q.float() * scale`` of rows (dim 0) / columns (dim 1) ``start:stop``: reads them and
        the scale blocks that cover them."""
        weight, scale = parts
        block = self.quant.block
        first, last, skip = _blocks(start, stop, block[dim])
        q = self._raw_read(weight, dim, start, stop).float()
        s = self._raw_read(scale, dim, first, last)
        at = (skip, 0) if dim == 0 else (0, skip)
        return q * expand_blocks(s, q.shape[0], q.shape[1], block, *at)

    def _read_awq(self, parts, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``W`` are output columns of the packed tensors (whole words
        read, then cropped); columns of ``W`` are their input rows (and the groups over them)."""
        qweight, qzeros, scales = parts
        group = self.quant.group
        if dim == 0:  # output features: columns of qweight / qzeros (8 a word) and scales
            w0, w1, skip = _blocks(start, stop, 8)
            q = unpack_awq(self._raw_read(qweight, 1, w0, w1))[:, skip:skip + stop - start]
            z = unpack_awq(self._raw_read(qzeros, 1, w0, w1))[:, skip:skip + stop - start]
            s = self._raw_read(scales, 1, start, stop)
            g0, skip_in, n_in = 0, 0, q.shape[0]
        else:  # input features: rows of qweight, and the groups of qzeros / scales over them
            g0, g1, skip_in = _blocks(start, stop, group)
            q = unpack_awq(self._raw_read(qweight, 0, start, stop))
            z = unpack_awq(self._raw_read(qzeros, 0, g0, g1))
            s = self._raw_read(scales, 0, g0, g1)
            n_in = stop - start
        z = z.repeat_interleave(group, 0)[skip_in:skip_in + n_in]  # [in, out]
        s = s.float().repeat_interleave(group, 0)[skip_in:skip_in + n_in]
        return ((q - z).float() * s).t().contiguous()  # [in, out] -> [out, in]

    def read_rows_into(self, name, start, out):
        if name in self._parts:  # dequantized: read, then copy
            out.copy_(self.read(name, 0, start, start + out.shape[0]))
        else:
            super().read_rows_into(name, start, out)

    def location(self, name: str):
        raise BridgeError(f"{name}: stored quantized in {self.dir}; its bytes cannot be copied")

    def tensor_records(self) -> list[list]:
        """The stored tensors (FP8 weights and scales, AWQ's packed tensors), for the
        metadata a conversion carries: the way back writes FP8 weights as FP8."""
        return [[name, kind.name, list(shape)] for name, (shape, kind) in self.raw.items()]

    def scales(self) -> dict[str, str]:
        """FP8: plain weight name -> its stored scale's name."""
        return {name: parts[1] for name, parts in self._parts.items()} if isinstance(
            self.quant, Fp8Blocks) else {}


# -- FP8 scales carried by a megatron checkpoint --------------------------------------------------


def carry_fp8_scales(src_dir: str | Path, dst_dir: str | Path) -> bool:
    """Put the FP8 scales of the model in ``src_dir`` into ``dst_dir/SCALES_FILE`` (for the way
    back: :class:`Fp8Encoder`): copied from ``src_dir``'s own scales file (a converted
    checkpoint's ``hf/``) or written from its stored ``weight_scale_inv`` tensors, one at a
    time. False (nothing written) for a model that is not FP8."""
    src_dir, dst = Path(src_dir), Path(dst_dir) / SCALES_FILE
    if not isinstance(quantization_of(read_hf_config(src_dir)), Fp8Blocks):
        return False
    tmp = dst.with_name(dst.name + ".partial")
    if (src_dir / SCALES_FILE).is_file():
        shutil.copyfile(src_dir / SCALES_FILE, tmp)
    else:
        ckpt = open_checkpoint(src_dir)
        names = sorted(ckpt.scales().values())
        entries = [(n, ckpt.raw[n][1], ckpt.raw[n][0]) for n in names]
        with open(tmp, "wb") as f:
            f.write(encode_header(entries))
            for name in names:
                f.write(bytes_of(ckpt._raw_read(name).contiguous()))
        ckpt.close()
    os.replace(tmp, dst)
    return True


class StoredScales:
    """The FP8 scales an export re-quantizes with: a checkpoint's ``hf/`` scales file, or an
    FP8 model directory's own ``weight_scale_inv`` tensors."""

    def __init__(self, hf_dir: str | Path):
        hf_dir = Path(hf_dir)
        self._file = self._ckpt = None
        if (hf_dir / SCALES_FILE).is_file():
            self._file = SafetensorsFile(hf_dir / SCALES_FILE)
            self.names = set(self._file.tensors)
        elif any(hf_dir.glob("*.safetensors")):
            self._ckpt = open_checkpoint(hf_dir)
            self.names = set(self._ckpt.scales().values())
        else:
            self.names = set()

    def get(self, name: str):
        """The stored scale ``name`` (``x.weight_scale_inv``), or None."""
        if name not in self.names:
            return None
        return self._file.read(name) if self._file else self._ckpt._raw_read(name)


# -- writing FP8 ----------------------------------------------------------------------------------


def _per_block(x: torch.Tensor, block: tuple[int, int], reduce, fill=0) -> torch.Tensor:
    """``reduce`` (amax, all) of each block of ``x`` ``[R, C]`` -> ``[ceil(R/br), ceil(C/bc)]``;
    the ragged last blocks are padded with ``fill``, which must change no result."""
    rows, cols = x.shape
    pr, pc = _ceil(rows, block[0]) * block[0], _ceil(cols, block[1]) * block[1]
    pad = x.new_full((pr, pc), fill)
    pad[:rows, :cols] = x
    tiles = pad.reshape(pr // block[0], block[0], pc // block[1], block[1])
    return reduce(tiles)


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``fp8(w / scale)`` block by block (clamped to e4m3's range)."""
    s = expand_blocks(scale, w.shape[0], w.shape[1], block)
    return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def encode_fp8(w: torch.Tensor, stored: torch.Tensor | None, block: tuple[int, int]
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(FP8 weight, float32 scales, blocks given a fresh scale) for weight ``w`` (any float
    dtype): each block keeps its ``stored`` scale where that reproduces ``w`` exactly
    (``(q * scale).to(w.dtype) == w``), else gets ``amax / 448`` (1 when all zero)."""
    amax = _per_block(w.float().abs(), block, lambda t: t.amax(dim=(1, 3)))
    fresh = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if stored is None:
        scale = fresh
    else:
        q = quantize_fp8(w, stored, block)
        back = (q.float() * expand_blocks(stored, w.shape[0], w.shape[1], block)).to(w.dtype)
        same = (back == w) | (back.isnan() & w.isnan())
        keep = _per_block(same, block, lambda t: t.all(dim=3).all(dim=1), fill=True)
        scale = torch.where(keep, stored.float(), fresh)
    changed = int((scale != stored).sum()) if stored is not None else scale.numel()
    return quantize_fp8(w, scale, block), scale.float().contiguous(), changed


class Fp8Encoder:
    """An export's writer of FP8 weights: wraps an :class:`~mswift.bridge.hf_io.HFShardWriter`
    whose plan (:meth:`plan`) has each FP8 weight as ``float8_e4m3fn`` followed by its
    ``weight_scale_inv``; callers see the plain plan (each FP8 weight in ``dtypes[name]``, the
    model's dtype) and add plain weights, quantized here (:func:`encode_fp8`)."""

    def __init__(self, quant: Fp8Blocks, names: set[str], scales: StoredScales):
        self.block, self.fp8, self.scales = quant.block, set(names), scales
        self.fresh_blocks = 0  # blocks given a fresh scale (0 for an untouched model)
        self.writer = None

    def plan(self, plan: list) -> list:
        out = []
        for name, dtype, shape in plan:
            if name in self.fp8:
                out.append((name, torch.float8_e4m3fn, shape))
                out.append((name + SCALE_SUFFIX, torch.float32,
                            tuple(_ceil(s, b) for s, b in zip(shape, self.block))))
            else:
                out.append((name, dtype, shape))
        return out

    def wrap(self, writer, plain_plan: list) -> "Fp8Encoder":
        """Wrap ``writer`` (made with :meth:`plan` of ``plain_plan``); a writer of some shards
        may hold an FP8 weight without its scale, or the other way round."""
        self.writer, self._inner = writer, set(writer.names)
        self._plain = [e for e in plain_plan
                       if e[0] in self._inner or e[0] + SCALE_SUFFIX in self._inner]
        self.names = [name for name, _, _ in self._plain]
        return self

    def plan_entries(self) -> list:
        return list(self._plain)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.fp8:
            self.writer.add(name, tensor)
            return
        q, scale, fresh = encode_fp8(tensor, self.scales.get(name + SCALE_SUFFIX), self.block)
        if name in self._inner:
            self.fresh_blocks += fresh
            self.writer.add(name, q)
        if name + SCALE_SUFFIX in self._inner:
            self.writer.add(name + SCALE_SUFFIX, scale)

    def close(self):
        return self.writer.close()


def plain_config(hf_dir: str | Path, dtype: str) -> None:
    """Rewrite ``hf_dir/config.json`` for plain (unquantized) weights of ``dtype``: no
    ``quantization_config``, ``dtype`` / ``torch_dtype`` set."""
    path = Path(hf_dir) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = dtype
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def export_plan(hf_dir: str | Path, names, kinds: dict, dtype: str | None):
    """How an export writes the HF tensors ``names`` of a model whose config and tokenizer come
    from ``hf_dir``: ``(kinds, encoder, plain dtype)``. ``kinds`` in: the stored dtype of each
    HF tensor (the conversion's metadata); out: the dtype each plain tensor is written in
    (those left out keep the model's: FP8 weights, which ``encoder`` quantizes). ``encoder``
    None for a plain export; ``plain dtype``: the dtype name config.json is rewritten to (None:
    config.json as it is). An FP8 model is written as FP8 unless ``dtype`` is given; an AWQ
    model as bfloat16 (or ``dtype``): writing AWQ is not implemented (issue #19)."""
    quant = quantization_of(read_hf_config(Path(hf_dir)), str(Path(hf_dir) / "config.json"))
    if dtype is None and isinstance(quant, AwqGemm):
        dtype = "bfloat16"
    if dtype is not None:
        kind = dtypes.BY_NAME[dtypes.ALIASES.get(dtype, dtype)]
        return {name: kind for name in names}, None, kind.name
    if quant is None:
        return kinds, None, None
    fp8 = {n for n in names if n in kinds and kinds[n].name == "float8_e4m3fn"}
    plain = {n: kinds[n] for n in names if n in kinds and n not in fp8}
    return plain, Fp8Encoder(quant, fp8, StoredScales(hf_dir)), None
