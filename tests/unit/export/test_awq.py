"""AWQ: folding its scales leaves a transformers Llama's logits unchanged, and its quantized
outputs are closer to the 16-bit ones than RTN's where activations have outlier channels."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mswift.export.awq import (
    clip_weight,
    fold_scale,
    llama_scale_groups,
    prepare_export,
    search_clip,
    search_scale,
)
from mswift.export.qweight import dequantize, rtn_quantize


def _tiny_llama(heads, kv_heads, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=16 if heads == 6 else 12,
                         max_position_embeddings=64, attention_bias=kv_heads == heads)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms and biases, so a fold that forgets them shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(torch.rand_like(p) + 0.5)
    return model


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_folding_leaves_the_logits_unchanged(heads, kv_heads):
    model = _tiny_llama(heads, kv_heads)
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        before = model(tokens).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for layer in ("model.layers.0.", "model.layers.1."):
        groups = llama_scale_groups(state, layer)
        # v -> o only without grouped-query attention
        assert (f"{layer}self_attn.v_proj.weight" in [g.previous for g in groups]) \
            == (heads == kv_heads)
        for group in groups:
            s = torch.rand(state[group.linears[0]].shape[1], generator=gen) * 3 + 0.25
            fold_scale(state, group, s)
    changed = [k for k in state if not torch.equal(state[k], model.state_dict()[k])]
    # per layer: 2 norms, q k v gate up down, and with v -> o also o_proj and v_proj's bias
    assert len(changed) == 2 * (8 + (2 if heads == kv_heads else 0)), changed
    model.load_state_dict(state)
    with torch.no_grad():
        after = model(tokens).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def _outlier_inputs(tokens, features, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=gen)
    x[:, torch.arange(3, features, 17)] *= 25  # a few channels ~25x the rest, as in LLMs
    return x


def test_search_scale_beats_rtn_on_held_out_outlier_activations():
    x = _outlier_inputs(768, 96, seed=2)
    calib, held_out = x[:256], x[256:]
    weights = [torch.randn(40, 96, generator=torch.Generator().manual_seed(i)) for i in (3, 4)]
    s = search_scale(weights, calib.abs().mean(0), calib, bits=4, group_size=32)
    assert not torch.allclose(s, torch.ones_like(s))
    awq = sum(((held_out / s) @ dequantize(rtn_quantize(w * s, bits=4, group_size=32)).T
               - held_out @ w.T).pow(2).sum() for w in weights)
    rtn = sum((held_out @ dequantize(rtn_quantize(w, bits=4, group_size=32)).T
               - held_out @ w.T).pow(2).sum() for w in weights)
    assert awq < 0.7 * rtn, (awq, rtn)


def _linear_stats(model, tokens):
    """Per HF weight name, the statistics of the inputs every nn.Linear of the layers saw."""
    seen, hooks = {}, []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = f"model.layers.{name}.weight"
            hooks.append(module.register_forward_hook(
                lambda _m, args, _o, key=key: seen.setdefault(key, []).append(
                    args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return {k: SimpleNamespace(act_abs_mean=torch.cat(v).abs().mean(0), act_sample=torch.cat(v),
                               hessian=torch.cat(v).T @ torch.cat(v)) for k, v in seen.items()}


def test_awq_export_folds_the_checkpoint_and_beats_rtn(tmp_path):
    """The export's path: scales searched layer by layer from the checkpoint's files, folded
    into them; the folded checkpoint loads in transformers with the same logits, and RTN of its
    scaled linears is closer to the 16-bit model than RTN of the original ones."""
    model = _tiny_llama(6, 2, seed=3)
    with torch.no_grad():  # outlier channels in the normed inputs of both layers
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.arange(1, 48, 11)] *= 30
    gen = torch.Generator().manual_seed(4)
    calib = torch.randint(0, 97, (8, 32), generator=gen)
    held_out = torch.randint(0, 97, (4, 32), generator=gen)
    stats = _linear_stats(model, calib)
    model.save_pretrained(tmp_path / "hf")
    prepare_export(tmp_path / "hf", stats, 16, progress=False, clip=False)
    folded = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        reference = model(held_out).logits
        torch.testing.assert_close(folded(held_out).logits, reference, rtol=0, atol=1e-5)
    norm = "model.layers.1.post_attention_layernorm.weight"
    assert not torch.equal(folded.state_dict()[norm], model.state_dict()[norm])

    def rtn_logit_error(source):
        quantized = _tiny_llama(6, 2)
        state = {n: dequantize(rtn_quantize(t, bits=4, group_size=16))
                 if n.endswith("proj.weight") else t for n, t in source.state_dict().items()}
        quantized.load_state_dict(state)
        with torch.no_grad():
            return (quantized(held_out).logits - reference).pow(2).mean().item()

    awq_error, rtn_error = rtn_logit_error(folded), rtn_logit_error(model)
    assert awq_error < 0.7 * rtn_error, (awq_error, rtn_error)

    # with clipping (the export's default): the same folds, then every linear but q/k clipped
    # with the ratios a search on the folded model's own inputs (taken by hooks, not derived
    # from the scales) picks; up_proj's ratios are searched before its rows are divided by
    # down_proj's scale (a ratio does not depend on a row's scale but for the bf16 rounding
    # of the group scales), that scale read off down_proj's folded columns
    model.save_pretrained(tmp_path / "clipped")
    prepare_export(tmp_path / "clipped", stats, 16, progress=False)
    clipped = LlamaForCausalLM.from_pretrained(tmp_path / "clipped").eval()
    folded_inputs = _linear_stats(folded, calib)
    original, state = model.state_dict(), folded.state_dict()
    for name, weight in state.items():
        got = clipped.state_dict()[name]
        if not name.endswith("proj.weight") or name.endswith(("q_proj.weight", "k_proj.weight")):
            assert torch.equal(got, weight), name
            continue
        searched = weight
        if name.endswith("up_proj.weight"):
            down = name.replace("up_proj", "down_proj")
            searched = weight * (state[down] / original[down])[0][:, None]
        ratios = search_clip(searched, folded_inputs[name].hessian, bits=4, group_size=16)
        torch.testing.assert_close(got, clip_weight(weight, ratios), rtol=0, atol=0, msg=name)
    assert not all(torch.equal(clipped.state_dict()[n], folded.state_dict()[n])
                   for n in folded.state_dict())
    assert rtn_logit_error(clipped) < awq_error, (rtn_logit_error(clipped), awq_error)


def _brute_force_clip(weight, x, group_size, ratios):
    """Per (row, group): the ratio whose RTN group (clamped to its max |w| times the ratio,
    rounded to the weight's dtype, then quantized by rtn_quantize on its own) has the least sum
    over tokens of (error . x_t)^2; first wins ties. Plain loops, no Hessian."""
    rows, cols = weight.shape
    out = torch.empty(rows, cols // group_size)
    for r in range(rows):
        for g in range(cols // group_size):
            cut = slice(g * group_size, (g + 1) * group_size)
            w, xg = weight[r, cut].float(), x[:, cut].float()
            best = None
            for ratio in ratios:
                limit = (w.abs().max() * ratio).to(weight.dtype).float()
                q = dequantize(rtn_quantize(w.clamp(-limit, limit)[None], bits=4,
                                            group_size=group_size))[0]
                err = sum(float(((q - w) * xt).sum()) ** 2 for xt in xg)
                if best is None or err < best[0]:
                    best = (err, ratio)
            out[r, g] = best[1]
    return out


@pytest.mark.parametrize("dtype,group_size", [(torch.float32, 16), (torch.bfloat16, 16),
                                              (torch.float32, -1)])
def test_search_clip_matches_a_brute_force_search(dtype, group_size):
    gen = torch.Generator().manual_seed(5)
    # heavy-tailed weights (so clipping pays off on some groups, not all) and outlier inputs
    weight = (torch.randn(6, 48, generator=gen) ** 3).to(dtype)
    x = _outlier_inputs(40, 48, seed=6)
    ratios = search_clip(weight, x.T @ x, bits=4, group_size=group_size)
    expected = _brute_force_clip(weight, x, 48 if group_size == -1 else group_size,
                                 [1 - i / 20 for i in range(10)])
    torch.testing.assert_close(ratios, expected, rtol=0, atol=0)
    assert (ratios < 1).any() and (ratios == 1).any()  # some groups clipped, some not
    # the clipped weight quantizes with the clip as its group max: scale = clip / 7.5
    clipped = clip_weight(weight, ratios)
    assert clipped.dtype == dtype
    groups = ratios.shape[1]
    limits = (weight.float().reshape(6, groups, -1).abs().amax(-1) * ratios).to(dtype).float()
    qw = rtn_quantize(clipped.float(), bits=4, group_size=48 // groups)
    torch.testing.assert_close(qw.scale.float(), (limits / 7.5).to(torch.bfloat16).float(),
                               rtol=0, atol=0)


def test_search_clip_leaves_a_linear_no_token_reached():
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(7)) ** 3
    ratios = search_clip(weight, torch.zeros(32, 32), bits=4, group_size=16)
    torch.testing.assert_close(ratios, torch.ones(4, 2), rtol=0, atol=0)
    assert torch.equal(clip_weight(weight, ratios), weight)
