"""AWQ (Lin et al., 2023): activation-aware per-input-channel scales before quantizing.

Input channels that carry large activations matter most for a linear's output, yet grouped
RTN gives them the same relative error as the rest. AWQ multiplies those weight columns by
``s > 1`` before quantizing (their relative rounding error shrinks) and divides the input by
``s`` where it is produced, so the 16-bit model is unchanged: the preceding RMSNorm's weight,
or the output rows of the preceding linear when the two are connected by an elementwise
operation only (``up_proj`` -> ``down_proj`` through ``act(gate) * up``; ``v_proj`` ->
``o_proj`` through attention, which mixes tokens but not channels, when every query head
has its own value head, as AutoAWQ requires). ``s = mean|x| ** alpha`` (normalised) with
``alpha`` searched on a grid to minimise the quantized output error on a token sample; the
scaled weights are then quantized on the shared grid of :mod:`mswift.export.qweight`.

Everything here works on Hugging Face tensors of one decoder layer, keyed by HF names.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch

from mswift.export.qweight import QuantizedWeight, dequantize, rtn_quantize

N_GRID = 20  # alphas 0, 0.05, ..., 0.95, as AutoAWQ; alpha 0 is plain RTN
MIN_SCALE = 1e-4  # floor of mean|x| ** alpha, so channels that never fire stay finite


@dataclass(frozen=True)
class ScaleGroup:
    """Linears that read the same input, and the tensor that produces that input.

    ``previous`` is an RMSNorm weight [in] or a linear's weight [in, *] whose output rows
    are this group's input channels; ``previous_bias`` its bias, if it has one.
    ``previous=None`` marks linears with nowhere to fold a scale: they are quantized as
    they are.
    """

    previous: str | None
    linears: tuple[str, ...]
    previous_bias: str | None = None


def llama_scale_groups(tensors: Mapping[str, torch.Tensor], layer: str) -> list[ScaleGroup]:
    """AWQ's groups in one Llama-style decoder layer (Llama, Qwen2, Qwen3, SmolLM2).

    ``layer`` is the HF prefix, e.g. ``"model.layers.3."``. The v_proj -> o_proj group is
    included only when v_proj's outputs are o_proj's inputs one to one (no grouped-query
    attention); otherwise o_proj is a group of its own without a scale.
    """
    attn, mlp = layer + "self_attn.", layer + "mlp."
    groups = [
        ScaleGroup(layer + "input_layernorm.weight",
                   tuple(f"{attn}{p}_proj.weight" for p in "qkv")),
        ScaleGroup(layer + "post_attention_layernorm.weight",
                   (mlp + "gate_proj.weight", mlp + "up_proj.weight")),
        ScaleGroup(mlp + "up_proj.weight", (mlp + "down_proj.weight",),
                   _bias_name(tensors, mlp + "up_proj.weight")),
    ]
    v, o = tensors[attn + "v_proj.weight"], tensors[attn + "o_proj.weight"]
    if v.shape[0] == o.shape[1]:
        groups.append(ScaleGroup(attn + "v_proj.weight", (attn + "o_proj.weight",),
                                 _bias_name(tensors, attn + "v_proj.weight")))
    else:
        groups.append(ScaleGroup(None, (attn + "o_proj.weight",)))
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
    candidate, so on the sample AWQ is never worse than RTN.
    """
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


def fold_scale(tensors: MutableMapping[str, torch.Tensor], group: ScaleGroup,
               s: torch.Tensor) -> None:
    """Divide ``group.previous`` (norm weight, or linear output rows and bias) by ``s`` and
    multiply the group's linears' input columns by ``s``, in place in ``tensors``.

    Arithmetic in fp32; each tensor keeps its dtype. The 16-bit model computes the same
    function up to that dtype's rounding.
    """
    def put(name, value):
        tensors[name] = value.to(tensors[name].dtype)

    previous = tensors[group.previous].float()
    put(group.previous, previous / (s if previous.dim() == 1 else s[:, None]))
    if group.previous_bias is not None:
        put(group.previous_bias, tensors[group.previous_bias].float() / s)
    for name in group.linears:
        put(name, tensors[name].float() * s)


def awq_quantize_layer(tensors: MutableMapping[str, torch.Tensor],
                       stats: Mapping[str, Mapping[str, torch.Tensor]],
                       groups: Sequence[ScaleGroup], *, bits: int, group_size: int,
                       scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, QuantizedWeight]:
    """AWQ one decoder layer: search every group's scale on the layer's original weights and
    calibration ``stats`` (per HF weight name: ``act_abs_mean``, ``act_sample`` of its
    input), fold them all, and quantize every linear named in ``groups``.

    ``tensors`` is updated in place, each tensor keeping its dtype: the folded norms /
    preceding linears, and the scaled linears (the returned ``QuantizedWeight``s, quantized
    from the fp32 scaled weights, are what gets written for those).
    """
    all_groups, groups = groups, [g for g in groups if g.previous is not None]
    scales = []
    for group in groups:
        first = stats[group.linears[0]]
        scales.append(search_scale([tensors[n] for n in group.linears], first["act_abs_mean"],
                                   first["act_sample"], bits=bits, group_size=group_size,
                                   scale_dtype=scale_dtype))
    names = {n for g in groups for n in (g.previous, g.previous_bias, *g.linears) if n}
    dtypes = {name: tensors[name].dtype for name in names}
    for name in names:
        tensors[name] = tensors[name].float()  # fold in fp32 once: up_proj is in two groups
    for group, s in zip(groups, scales):
        fold_scale(tensors, group, s)
    quantized = {name: rtn_quantize(tensors[name], bits=bits, group_size=group_size,
                                    scale_dtype=scale_dtype)
                 for group in all_groups for name in group.linears}
    for name in names:
        tensors[name] = tensors[name].to(dtypes[name])
    return quantized
