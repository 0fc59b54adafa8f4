"""Tiny quantized HF checkpoints for tests, made with plain torch (independent of
``mswift.bridge.quantized``), and their dequantized twins.

``save_fp8_checkpoint(src, dst)`` stores every linear weight of the decoder layers of the plain
model ``src`` the way DeepSeek-V3 is released (float8_e4m3fn + float32 ``weight_scale_inv``
per 128 x 128 block, ragged last blocks included); ``save_awq_checkpoint`` the way AutoAWQ's
GEMM format does (``qweight`` / ``qzeros`` int32 with 8 nibbles in the order
[0, 2, 4, 6, 1, 3, 5, 7], fp16 ``scales``, group 128). ``save_twin`` writes the plain fp32
model of the dequantized weights (the reference the bridge must reproduce), dequantized here
by ``fp8_dequantize`` / ``awq_dequantize``: a repeat_interleave of the scales, and an
unpacking written column by column from the packing's definition.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from mswift.testing.hf_models import read_safetensors_dir

BLOCK = (128, 128)
GROUP = 128
PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of word c holds column 8c + PACK_ORDER[i]
# Matrices of the decoder layers that DeepSeek-V3's release keeps in bf16: the MoE router, and
# in the MTP layer the projection and the copies of the embedding and the output layer.
NOT_QUANTIZED = ("mlp.gate.weight", "eh_proj.weight", "embed_tokens.weight",
                 "shared_head.head.weight")


def quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    return (name.startswith("model.layers.") and name.endswith(".weight") and tensor.dim() == 2
            and not name.endswith(NOT_QUANTIZED))


def _copy_folder(src: Path, dst: Path, quantization: dict) -> None:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, dst / path.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config, indent=2))


# -- FP8 --------------------------------------------------------------------------------------


def fp8_quantize(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale_inv): each block's scale is its amax / 448, loop by loop."""
    rows, cols = w.shape
    nr, nc = -(-rows // block[0]), -(-cols // block[1])
    scale = torch.ones(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            tile = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]].float()
            amax = tile.abs().max()
            scale[i, j] = amax / 448 if amax > 0 else 1.0
            q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (
                tile / scale[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, block=BLOCK) -> torch.Tensor:
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * full[: q.shape[0], : q.shape[1]]


def save_fp8_checkpoint(src, dst) -> Path:
    src, dst = Path(src), Path(dst)
    _copy_folder(src, dst, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": list(BLOCK)})
    out = {}
    for name, tensor in read_safetensors_dir(src).items():
        if quantized_linear(name, tensor):
            out[name], out[name + "_scale_inv"] = fp8_quantize(tensor)
        else:
            out[name] = tensor
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# -- AWQ --------------------------------------------------------------------------------------


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int ``[r, 8c]`` (0..15) -> int32 ``[r, c]``, nibble i of word c = column 8c + order[i]."""
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i, column in enumerate(PACK_ORDER):
            words[:, c] |= values[:, 8 * c + column].long() << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    """The inverse, column by column: column j is nibble ``PACK_ORDER.index(j % 8)`` of word j//8."""
    rows, n = words.shape
    out = torch.empty(rows, 8 * n, dtype=torch.int64)
    wide = words.long() & 0xFFFFFFFF
    for j in range(8 * n):
        out[:, j] = (wide[:, j // 8] >> (4 * PACK_ORDER.index(j % 8))) & 0xF
    return out


def awq_quantize(w: torch.Tensor, group=GROUP):
    """(qweight, qzeros, scales) of ``w`` ``[out, in]``: asymmetric 4-bit per group of input
    columns (the last group ragged), fp16 scales."""
    wt = w.t().float()  # [in, out]
    n_in, n_out = wt.shape
    groups = -(-n_in // group)
    scales = torch.empty(groups, n_out, dtype=torch.float16)
    zeros = torch.empty(groups, n_out, dtype=torch.int64)
    q = torch.empty(n_in, n_out, dtype=torch.int64)
    for g in range(groups):
        rows = wt[g * group:(g + 1) * group]
        lo, hi = rows.min(0).values, rows.max(0).values
        scale = ((hi - lo).clamp(min=1e-5) / 15).half()
        zero = (-lo / scale.float()).round().clamp(0, 15).long()
        scales[g], zeros[g] = scale, zero
        q[g * group:(g + 1) * group] = (rows / scale.float()).round().long().add(zero).clamp(0, 15)
    return pack_nibbles(q), pack_nibbles(zeros), scales


def awq_dequantize(qweight, qzeros, scales, group=GROUP) -> torch.Tensor:
    q = unpack_nibbles(qweight)
    z = unpack_nibbles(qzeros).repeat_interleave(group, 0)[: q.shape[0]]
    s = scales.float().repeat_interleave(group, 0)[: q.shape[0]]
    return ((q - z).float() * s).t()  # [in, out] -> [out, in]


def save_awq_checkpoint(src, dst) -> Path:
    src, dst = Path(src), Path(dst)
    _copy_folder(src, dst, {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                            "zero_point": True, "version": "gemm",
                            "modules_to_not_convert": ["gate"]})
    out = {}
    for name, tensor in read_safetensors_dir(src).items():
        if quantized_linear(name, tensor):
            prefix = name[: -len("weight")]
            out[prefix + "qweight"], out[prefix + "qzeros"], out[prefix + "scales"] = (
                awq_quantize(tensor))
        else:
            out[name] = tensor
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# -- the dequantized twin -----------------------------------------------------------------------


def dequantized_tensors(quantized_dir) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint written above, dequantized in fp32 (others as stored)."""
    stored = read_safetensors_dir(quantized_dir)
    out = {}
    for name, tensor in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if name + "_scale_inv" in stored:
            out[name] = fp8_dequantize(tensor, stored[name + "_scale_inv"])
        elif name.endswith(".qweight"):
            prefix = name[: -len("qweight")]
            out[prefix + "weight"] = awq_dequantize(tensor, stored[prefix + "qzeros"],
                                                    stored[prefix + "scales"]).contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            out[name] = tensor
    return out


def save_twin(quantized_dir, dst) -> Path:
    """The plain fp32 model of the dequantized weights, beside the same tokenizer files."""
    quantized_dir, dst = Path(quantized_dir), Path(dst)
    dst.mkdir(parents=True)
    for path in quantized_dir.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, dst / path.name)
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config")
    config["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.float().contiguous() for k, v in dequantized_tensors(quantized_dir).items()},
              dst / "model.safetensors", metadata={"format": "pt"})
    return dst
