"""Writing a quantized HF checkpoint from a 16-bit one, one weight at a time.

compressed-tensors formats (what llm-compressor writes; vLLM, SGLang and transformers load
them): each quantized linear ``x.weight`` becomes the tensors compressed-tensors' own
compressor makes of it (``x.weight_packed`` int32 + ``x.weight_shape`` for
``pack-quantized``, ``x.weight`` int8 / float8_e4m3fn for ``int-quantized`` /
``float-quantized``, and ``x.weight_scale``), and config.json gets the
``quantization_config`` (one config group targeting ``Linear``, an ``ignore`` list of the linears
kept in 16 bits: lm_head, MoE routers). The compressor is handed ``q * scale`` (exact in fp32)
and the scale, so the integers it computes are the quantizer's.

DeepSeek-V3 ``fp8-block`` is written in DeepSeek's own layout instead (the release's:
``quant_method: fp8``, ``weight_block_size: [128, 128]``, float8_e4m3fn ``x.weight`` with fp32
``x.weight_scale_inv``), encoded as :mod:`mswift.bridge.quantized` encodes FP8 exports.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mswift.bridge.hf_io import HFCheckpoint, copy_aux_files, shard_file_name, write_index
from mswift.export.qweight import Fp8Weight, dequantize, dequantize_fp8
from mswift.export.schemes import FP8_BLOCK, Scheme, is_quantizable
from mswift.export.stacked import expert_names, expert_weight, is_stacked, source

MAX_SHARD_BYTES = 2 * 1024 ** 3
FORMATS = {"W4A16": "pack-quantized", "W8A8": "int-quantized",
           "FP8_DYNAMIC": "float-quantized", "FP8_BLOCK": "float-quantized"}
DEEPSEEK_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": list(FP8_BLOCK)}


def deepseek_layout(scheme: Scheme, config: dict) -> bool:
    """``fp8-block`` on DeepSeek-V3 is written in the layout DeepSeek ships."""
    return scheme.name == "fp8-block" and config.get("model_type") == "deepseek_v3"


def ct_scheme(scheme: Scheme, group_size: int):
    """compressed-tensors' QuantizationScheme of ``scheme`` (targets ``Linear``)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    qs = preset_name_to_scheme(scheme.preset, ["Linear"])
    if scheme.grouped:
        if group_size == -1:
            qs.weights.strategy, qs.weights.group_size = "channel", None
        else:
            qs.weights.group_size = group_size
    return qs


def compress(qs, fmt: str, qw) -> dict[str, torch.Tensor]:
    """compressed-tensors' compressed tensors (local names: ``weight_packed``, ...) of one
    quantized weight."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(fmt)
    weight = dequantize_fp8(qw) if isinstance(qw, Fp8Weight) else dequantize(qw)
    state = {"weight": weight, "weight_scale": qw.scale}
    if getattr(qw, "g_idx", None) is not None:
        state["weight_g_idx"] = qw.g_idx
    return compressor.compress(state, qs)


class _Shards:
    """safetensors shards of at most ``MAX_SHARD_BYTES`` (one tensor may exceed it), written
    by this rank under temporary names; :func:`_name_shards` names and indexes every rank's
    once all are written."""

    def __init__(self, out: Path, rank: int = 0):
        self.out, self.rank, self.tensors, self.bytes, self.files = out, rank, {}, 0, []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.tensors and self.bytes + size > MAX_SHARD_BYTES:
            self._flush()
        self.tensors[name] = tensor.contiguous()
        self.bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out / f"part-{self.rank}-{len(self.files)}.safetensors"
        save_file(self.tensors, str(path), metadata={"format": "pt"})
        self.files.append((path.name, [(n, t.dtype, tuple(t.shape))
                                       for n, t in self.tensors.items()]))
        self.tensors, self.bytes = {}, 0

    def close(self) -> None:
        if self.tensors:
            self._flush()


def _name_shards(out: Path, files: list) -> None:
    """Give every rank's shards (``files``, in rank order) transformers' names and index."""
    for i, (name, _) in enumerate(files):
        (out / name).rename(out / shard_file_name(i, len(files)))
    write_index(out, [entries for _, entries in files])


def write_quantized(src: Path, out: Path, scheme: Scheme, group_size: int, stats=None,
                    progress: bool = True) -> list[str]:
    """Write the quantized checkpoint of the 16-bit HF checkpoint ``src`` into ``out`` (which
    exists and is empty); returns the quantized weights' names (all ranks').

    ``stats``: None (a scheme without statistics), the
    :class:`~mswift.export.calibration.CalibrationStats` of this rank's linears, or an
    iterable of them (:func:`~mswift.export.calibration.stats_windows`: each window's
    weights are quantized as it comes, then its statistics dropped). Under several ranks
    each quantizes the weights whose statistics it holds (without statistics: a share of
    every quantizable weight), rank 0 copies the rest and writes the index and config.json
    once every rank's shards are written."""
    from mswift.bridge.convert import barrier, rank
    from mswift.export.calibration import all_ranks, assign_owners

    ckpt = HFCheckpoint(src)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    deepseek = deepseek_layout(scheme, config)
    qs = None if deepseek else ct_scheme(scheme, group_size)
    fmt = None if deepseek else FORMATS[scheme.preset]
    me = rank()
    quantizable = quantized_names(ckpt)
    shards = _Shards(out, me)
    quantized, ignored = [], []
    if me == 0:  # the tensors kept in 16 bits
        for name in ckpt.names:
            shape = ckpt.shape(name)
            if name in quantizable or is_stacked(name, shape):
                continue
            if len(shape) == 2 and not name.endswith("embed_tokens.weight"):
                ignored.append(name.removesuffix(".weight"))  # a Linear kept 16-bit
            shards.add(name, ckpt.read(name))
    windows = [stats] if stats is None or isinstance(stats, dict) else stats
    for window in windows:
        owned = (assign_owners([[n] for n in quantizable]) if window is None
                 else window.keys())
        names = [n for n in quantizable if n in owned]
        if progress:
            from tqdm import tqdm

            names = tqdm(names, desc=f"quantizing ({scheme.name})", unit="tensor",
                         file=sys.stderr)
        for name in names:
            weight = read_weight(ckpt, name).float()
            size = group_size if group_size != -1 else weight.shape[1]
            qw = scheme.quantize(name, weight, None if window is None else window[name], size)
            prefix = name.removesuffix("weight")
            if deepseek:
                shards.add(name, qw.q)
                shards.add(name + "_scale_inv", qw.scale.float())
            else:
                for local, tensor in compress(qs, fmt, qw).items():
                    shards.add(prefix + local, tensor)
            quantized.append(name)
    shards.close()
    everyone = all_ranks((shards.files, quantized))
    done = sorted(n for _, names in everyone for n in names)
    if len(done) != len(quantizable):
        missing = sorted(set(quantizable) - set(done))
        raise ValueError(f"{missing[0]}: no calibration statistics (no rank's megatron model "
                         "holds a linear of that name)")
    barrier()
    if me == 0:
        _name_shards(out, [f for files, _ in everyone for f in files])
        copy_aux_files(src, out)
        # lm_head always: a model with tied embeddings stores none, yet transformers builds
        # it as a Linear, which the "Linear" target would otherwise quantize (and break the tie)
        config["quantization_config"] = dict(DEEPSEEK_FP8) if deepseek else _ct_config(
            qs, fmt, sorted({"lm_head", *ignored}))
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    barrier()
    return done


def quantized_names(ckpt: HFCheckpoint) -> list[str]:
    """The weights a quantized export of ``ckpt`` quantizes, in file order: its quantizable
    linears', and for stacked experts (:mod:`mswift.export.stacked`) each expert's."""
    names: list[str] = []
    for name in ckpt.names:
        shape = ckpt.shape(name)
        if is_stacked(name, shape):
            names.extend(expert_names(name, shape))
        elif is_quantizable(name, shape):
            names.append(name)
    return names


def read_weight(ckpt: HFCheckpoint, name: str) -> torch.Tensor:
    """A quantizable weight of ``ckpt`` [out, in]: a tensor, or one expert's of a stacked one."""
    if name in ckpt.names:
        return ckpt.read(name)
    stacked, expert, part = source(name)
    return expert_weight(ckpt.read(stacked, 0, expert, expert + 1)[0], part)


def _ct_config(qs, fmt: str, ignored: list[str]) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups={"group_0": qs}, format=fmt,
                                quantization_status="compressed", ignore=sorted(ignored))
    return json.loads(json.dumps(config.model_dump(mode="json")))
