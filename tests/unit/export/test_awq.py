"""AWQ: folding its scales leaves a transformers Llama's logits unchanged, and its quantized
outputs are closer to the 16-bit ones than RTN's where activations have outlier channels."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mswift.export.awq import (awq_quantize_layer, fold_scale, llama_scale_groups,
                               search_scale)
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
        o_group, = [g for g in groups if g.linears == (f"{layer}self_attn.o_proj.weight",)]
        # v -> o only without grouped-query attention
        assert (o_group.previous == f"{layer}self_attn.v_proj.weight") == (heads == kv_heads)
        for group in groups:
            if group.previous is None:
                continue
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


def _linear_inputs(model, tokens):
    """Per HF weight name, the inputs [tokens, in] every nn.Linear of the layers saw."""
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
    return {k: torch.cat(v) for k, v in seen.items()}


def test_awq_layer_quantization_beats_rtn_on_the_model_output():
    model = _tiny_llama(6, 2, seed=3)
    with torch.no_grad():  # outlier channels in the normed inputs of both layers
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.arange(1, 48, 11)] *= 30
    gen = torch.Generator().manual_seed(4)
    calib, held_out = torch.randint(0, 97, (8, 32), generator=gen), \
        torch.randint(0, 97, (4, 32), generator=gen)
    inputs = _linear_inputs(model, calib)
    stats = {k: {"act_abs_mean": x.abs().mean(0), "act_sample": x} for k, x in inputs.items()}
    with torch.no_grad():
        reference = model(held_out).logits

    def logit_error(quantize_layer):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for i in range(2):
            for name, qw in quantize_layer(state, f"model.layers.{i}.").items():
                state[name] = dequantize(qw)
        quantized = _tiny_llama(6, 2)
        quantized.load_state_dict(state)
        with torch.no_grad():
            return (quantized(held_out).logits - reference).pow(2).mean().item()

    def awq(state, layer):
        return awq_quantize_layer(state, stats, llama_scale_groups(state, layer), bits=4,
                                  group_size=16)

    def rtn(state, layer):
        return {n: rtn_quantize(state[n], bits=4, group_size=16) for n in state
                if n.startswith(layer) and n.endswith("proj.weight")}

    awq_error, rtn_error = logit_error(awq), logit_error(rtn)
    assert awq_error < 0.7 * rtn_error, (awq_error, rtn_error)
