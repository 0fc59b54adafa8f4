"""Reading an export back with compressed-tensors' own decompression (the independent side of
the export tests)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mswift.testing.hf_models import read_safetensors_dir


def ct_decompressed(folder: str | Path, scale_dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """Every quantized weight of a compressed-tensors folder, by compressed-tensors' own
    decompression of the stored tensors (which computes in the scale's dtype: the stored
    one, or ``scale_dtype`` as a model of that dtype loads it)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    stored = read_safetensors_dir(folder)
    out = {}
    for name in stored:
        if name.endswith(".weight_scale"):
            prefix = name[: -len("weight_scale")]
            local = {n[len(prefix):]: t for n, t in stored.items()
                     if n.startswith(prefix) and "." not in n[len(prefix):]}
            if scale_dtype is not None:
                local["weight_scale"] = local["weight_scale"].to(scale_dtype)
            out[prefix + "weight"] = compressor.decompress(local, scheme)["weight"]
    return out
