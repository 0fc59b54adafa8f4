"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales before quantizing.

Input channels that carry large activations matter most for a linear's output, yet grouped
RTN gives them the same relative error as the rest. AWQ multiplies those weight columns by
``s > 1`` before quantizing (their relative rounding error shrinks) and divides the input by
``s`` where it is produced, so the 16-bit model is unchanged: the preceding RMSNorm's weight,
or the output rows of the preceding linear when the two are connected by an elementwise
operation only (``up_proj`` -> ``down_proj`` through ``act(gate) * up``; ``v_proj`` ->
``o_proj`` through attention, which mixes tokens but not channels, when every query head
has its own value head, as AutoAWQ requires). ``s = mean|x| ** alpha`` (normalised) with
``alpha`` searched on a grid to minimise the quantized output error on a token sample.
Then, as AutoAWQ's ``auto_clip``, every scaled linear but ``q_proj`` / ``k_proj`` (whose errors
act through the attention scores) gets its weights clipped per output row and group of input
columns: ``max|w|`` shrunk by the ratio of ``1, 0.95, .., 0.55`` whose quantized group has the
least output error ``e^T H_g e`` on the calibration inputs (``H_g`` the group's block of the
linear's Hessian over all calibration tokens, in the scaled input's coordinates). The clipped
weights are then quantized on the shared grid of :mod:`mswift.export.qweight`: a clipped group's
scale is ``clip / 7.5`` and its largest weights round to the grid's ends.

Everything here works on Hugging Face tensors keyed by HF names: one decoder layer's in
memory, or an HF checkpoint's files (the export's 16-bit staging copy) rewritten in place.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mswift.export.qweight import dequantize, quantize_to_grid, rtn_quantize, symmetric_scale

N_GRID = 20  # alphas 0, 0.05, ..., 0.95, as AutoAWQ; alpha 0 is plain RTN
MIN_SCALE = 1e-4  # floor of mean|x| ** alpha, so channels that never fire stay finite
CLIP_RATIOS = tuple(1 - i / 20 for i in range(10))  # AutoAWQ's auto_clip: 1, 0.95, .., 0.55
NO_CLIP = ("q_proj.weight", "k_proj.weight")  # AutoAWQ does not clip q and k either


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the tensor that produces that input.

    ``previous`` is an RMSNorm weight [in] or a linear's weight [in, *] whose output rows
    are this group's input channels; ``previous_bias`` its bias, if it has one.
    """

    previous: str
    linears: tuple[str, ...]
    previous_bias: str | None = None


def llama_scale_groups(tensors: Mapping[str, torch.Tensor], layer: str) -> list[ScaleGroup]:
    """AWQ's groups in one Llama-style decoder layer (Llama, Qwen2, Qwen3, Qwen3-MoE).

    ``layer`` is the HF prefix, e.g. ``"model.layers.3."``; ``tensors`` holds (at least) the
    layer's tensors. v_proj -> o_proj only when v_proj's outputs are o_proj's inputs one to
    one (no grouped-query attention). In an MoE layer the post-attention norm also feeds
    the router and every expert, so only each expert's up_proj -> down_proj is folded.
    Linears in no group are quantized as they are.
    """
    attn, mlp = layer + "self_attn.", layer + "mlp."
    groups = [ScaleGroup(layer + "input_layernorm.weight",
                         tuple(f"{attn}{p}_proj.weight" for p in "qkv"))]
    v, o = tensors[attn + "v_proj.weight"], tensors[attn + "o_proj.weight"]
    if v.shape[0] == o.shape[1]:
        groups.append(ScaleGroup(attn + "v_proj.weight", (attn + "o_proj.weight",),
                                 _bias_name(tensors, attn + "v_proj.weight")))
    if mlp + "gate_proj.weight" in tensors:
        groups.append(ScaleGroup(layer + "post_attention_layernorm.weight",
                                 (mlp + "gate_proj.weight", mlp + "up_proj.weight")))
    ups = [n for n in tensors if n.startswith(mlp) and n.endswith("up_proj.weight")]
    for up in sorted(ups):
        groups.append(ScaleGroup(up, (up.replace("up_proj", "down_proj"),),
                                 _bias_name(tensors, up)))
    return groups


def _bias_name(tensors: Mapping[str, torch.Tensor], weight_name: str) -> str | None:
    bias = weight_name.removesuffix("weight") + "bias"
    return bias if bias in tensors else None


def search_scale(weights: Sequence[torch.Tensor], act_abs_mean: torch.Tensor,
                 act_sample: torch.Tensor, *, bits: int, group_size: int,
                 scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The AWQ scale [in] for linears ``weights`` ([out_i, in] each) that read one input.

    ``act_abs_mean`` [in] is mean |x| per input channel over the calibration tokens,
    ``act_sample`` [tokens, in] a sample of those inputs. Minimises
    ``sum_i || Q(W_i diag(s)) (x / s) - W_i x ||^2`` over ``s = m**alpha / sqrt(max * min)``
    for ``alpha`` in ``0, 1/N_GRID, ..``; ``alpha = 0`` (``s = 1``, plain RTN) is always a
    candidate, so on the sample AWQ is never worse than RTN. ``group_size`` -1: one scale
    per output channel.
    """
    if group_size == -1:
        group_size = act_abs_mean.shape[0]
    x = act_sample.float()
    references = [x @ w.float().T for w in weights]  # [tokens, out_i]
    best_loss, best = float("inf"), None
    for k in range(N_GRID):
        s = act_abs_mean.float().pow(k / N_GRID).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, ref in zip(weights, references):
            qw = rtn_quantize(w.float() * s, bits=bits, group_size=group_size,
                              scale_dtype=scale_dtype)
            loss += ((x / s) @ dequantize(qw).T - ref).pow(2).sum().item()
        if loss < best_loss:
            best_loss, best = loss, s
    return best


def search_clip(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int,
                scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Per output row and group of ``group_size`` input columns of ``weight`` [out, in], the
    clip ratio ``r`` of :data:`CLIP_RATIOS` [out, groups] (fp32) whose clipped group
    (:func:`clip_weight`: clamped to ``max|w| * r``) has the least quantized output error
    ``e^T H_g e``: ``e`` the group's weights minus their quantization after clipping, ``H_g``
    the group's diagonal block of ``hessian`` [in, in] (``sum_t x_t x_t^T`` of the linear's
    inputs). Ratio 1 (no clipping) wins ties, so a linear no token reached is left as it is.
    A ratio, not a clip value: it chooses the same for a row scaled by any factor, so a fold
    into the rows (``up_proj``'s, from another rank's ``down_proj``) may come after.
    ``group_size`` -1: one group per row."""
    out_features, in_features = weight.shape
    if group_size == -1:
        group_size = in_features
    groups = in_features // group_size
    w = weight.float().reshape(out_features, groups, group_size)
    blocks = hessian.float().reshape(groups, group_size, groups, group_size)
    blocks = blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [groups, g, g]
    best_err = torch.full((out_features, groups), float("inf"))
    best = torch.ones(out_features, groups)
    for ratio in CLIP_RATIOS:
        limit = _clip_limit(weight, torch.full_like(best, ratio))
        clipped = torch.minimum(torch.maximum(w, -limit[..., None]), limit[..., None])
        scale = symmetric_scale(limit, bits, scale_dtype)[..., None]
        e = quantize_to_grid(clipped, scale, bits).float() * scale - w
        err = torch.einsum("ogi,gij,ogj->og", e, blocks, e)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, ratio), best)
    return best


def _clip_limit(weight: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``max|w| * ratio`` per row and group [out, groups], rounded to ``weight``'s dtype (the
    clamped weights are stored in it, so this is the group's max the quantizer sees), fp32."""
    out_features, in_features = weight.shape
    groups = ratio.shape[1]
    amax = weight.float().reshape(out_features, groups, in_features // groups).abs().amax(-1)
    return (amax * ratio).to(weight.dtype).float()


def clip_weight(weight: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] clamped to ``[-max|w| * ratio, max|w| * ratio]`` per row and group
    of columns (``ratio`` [out, groups], as :func:`search_clip` returns), in ``weight``'s dtype;
    a clipped group's largest magnitude is then exactly its clip."""
    out_features, in_features = weight.shape
    groups = ratio.shape[1]
    bound = _clip_limit(weight, ratio)[..., None]
    w = weight.float().reshape(out_features, groups, in_features // groups)
    return torch.minimum(torch.maximum(w, -bound), bound).reshape(weight.shape).to(weight.dtype)


Fold = tuple[torch.Tensor | None, torch.Tensor | None]  # (multiply columns by, divide rows by)


def layer_folds(tensors: Mapping[str, torch.Tensor], stats: Mapping[str, object],
                groups: Sequence[ScaleGroup], *, bits: int, group_size: int,
                scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, Fold]:
    """Search the scale of every group of one layer on its original weights and fold them:
    per tensor name, what to multiply its input columns by and divide its rows by.

    ``stats`` maps each linear's HF weight name to its input statistics (``act_abs_mean``
    [in], ``act_sample`` [tokens, in], as :mod:`mswift.export.calibration` collects them).
    All scales come from the unfolded weights (as AutoAWQ); ``up_proj`` gets both a column
    and a row factor, which commute.
    """
    folds: dict[str, Fold] = {}
    for group in groups:
        if group.previous is None or group.linears[0] not in stats:
            continue  # (statistics held by another rank, which folds this group)
        first = stats[group.linears[0]]
        s = search_scale([tensors[n] for n in group.linears], first.act_abs_mean,
                         first.act_sample, bits=bits, group_size=group_size,
                         scale_dtype=scale_dtype)
        for name in group.linears:
            folds[name] = (s, folds.get(name, (None, None))[1])
        for name in (group.previous, group.previous_bias):
            if name is not None:
                folds[name] = (folds.get(name, (None, None))[0], s)
    return folds


def apply_fold(tensor: torch.Tensor, fold: Fold) -> torch.Tensor:
    """``tensor`` with its columns multiplied and rows (the entries of a 1-D norm weight or
    bias) divided by ``fold``'s factors, computed in fp32 and returned in its own dtype."""
    columns, rows = fold
    t = tensor.float()
    if columns is not None:
        t = t * columns
    if rows is not None:
        t = t / rows.reshape(-1, *[1] * (t.dim() - 1))
    return t.to(tensor.dtype)


def fold_scale(tensors: MutableMapping[str, torch.Tensor], group: ScaleGroup,
               s: torch.Tensor) -> None:
    """Fold one group's scale ``s`` in place: its linears' input columns times ``s``, its
    ``previous`` (norm weight, or linear output rows and bias) divided by ``s``."""
    for name in group.linears:
        tensors[name] = apply_fold(tensors[name], (s, None))
    for name in (group.previous, group.previous_bias):
        if name is not None:
            tensors[name] = apply_fold(tensors[name], (None, s))


def layer_clips(tensors: Mapping[str, torch.Tensor], stats: Mapping[str, object],
                folds: Mapping[str, Fold], *, bits: int, group_size: int,
                scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """AWQ's clipping of one layer: per quantized linear in ``stats`` but ``q_proj`` /
    ``k_proj``, the :func:`search_clip` ratios of its weight with its columns folded (the
    column factor comes from the linear's own group, searched where its statistics are; a
    row factor does not change the ratio), in the weight's own dtype, the one the files hold,
    its Hessian taken in the folded input's coordinates (the input divided by ``s``)."""
    clips: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name not in stats or name.endswith(NO_CLIP):
            continue
        columns = folds.get(name, (None, None))[0]
        hessian = stats[name].hessian.float()
        if columns is not None:
            hessian = hessian / (columns[:, None] * columns[None, :])
        clips[name] = search_clip(apply_fold(tensor, (columns, None)), hessian, bits=bits,
                                  group_size=group_size, scale_dtype=scale_dtype)
    return clips


_LAYER = re.compile(r"(.*\.layers\.\d+\.)input_layernorm\.weight$")


def checkpoint_folds(ckpt, stats: Mapping[str, object], group_size: int, *, clip: bool = True,
                     progress: bool = True) -> tuple[dict[str, Fold], dict[str, torch.Tensor]]:
    """The AWQ folds and (``clip``) clip ratios of every decoder layer of ``ckpt`` (an
    :class:`~mswift.bridge.hf_io.HFCheckpoint`), one layer's tensors in memory at a time."""
    layers = [m.group(1) for m in map(_LAYER.match, ckpt.names) if m]
    if progress:
        from tqdm import tqdm

        layers = tqdm(layers, desc="AWQ scales", unit="layer", file=sys.stderr)
    folds: dict[str, Fold] = {}
    clips: dict[str, torch.Tensor] = {}
    for layer in layers:
        if not any(n.startswith(layer) for n in stats):
            continue  # another rank's linears
        tensors = {n: ckpt.read(n) for n in ckpt.names if n.startswith(layer)}
        found = layer_folds(tensors, stats, llama_scale_groups(tensors, layer), bits=4,
                            group_size=group_size)
        folds.update(found)
        if clip:
            clips.update(layer_clips(tensors, stats, found, bits=4, group_size=group_size))
    return folds, clips


def fold_checkpoint(directory: Path, folds: Mapping[str, Fold],
                    clips: Mapping[str, torch.Tensor] | None = None) -> None:
    """Apply ``folds``, then ``clips`` (:func:`clip_weight`), to the safetensors files of the
    HF checkpoint in ``directory``, one file at a time; a rewritten file is saved under a
    temporary name and renamed."""
    clips = clips or {}
    from safetensors.torch import load_file, save_file

    for path in sorted(Path(directory).glob("*.safetensors")):
        tensors = load_file(path)
        hit = (folds.keys() | clips.keys()) & tensors.keys()
        if not hit:
            continue
        for name in hit:
            if name in folds:
                tensors[name] = apply_fold(tensors[name], folds[name])
            if name in clips:
                tensors[name] = clip_weight(tensors[name], clips[name])
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)


def prepare_export(staging: Path, stats, group_size: int, progress: bool = True,
                   clip: bool = True) -> None:
    """``mswift export --quant w4a16-awq``'s step before quantizing: fold the AWQ scales into
    the 16-bit staging export in place and (``clip``) clip its linears' weights, so that RTN
    of its (scaled, clipped) linears is AWQ and the quality report reads the folded norms.
    ``stats``: this rank's statistics, or an iterable of windows of them
    (:func:`mswift.export.calibration.stats_windows`)."""
    from mswift.bridge.hf_io import HFCheckpoint

    from mswift.bridge.convert import barrier, rank
    from mswift.export.calibration import all_ranks

    ckpt = HFCheckpoint(staging)
    folds: dict[str, Fold] = {}
    clips: dict[str, torch.Tensor] = {}
    try:  # a window of decoder layers at a time (whole layers: a layer's folds come together)
        for window in ([stats] if isinstance(stats, Mapping) else stats):
            found, ratios = checkpoint_folds(ckpt, window, group_size, clip=clip,
                                             progress=progress)
            folds.update(found)
            clips.update(ratios)
    finally:
        ckpt.close()
    # under several ranks each folds the groups whose statistics it owns; rank 0 rewrites
    merged: dict[str, Fold] = {}
    for part in all_ranks(folds):
        for name, (columns, rows) in part.items():
            have = merged.get(name, (None, None))
            merged[name] = (have[0] if columns is None else columns,
                            have[1] if rows is None else rows)
    merged_clips = {n: r for part in all_ranks(clips) for n, r in part.items()}
    if rank() == 0:
        fold_checkpoint(staging, merged, merged_clips)
    barrier()
