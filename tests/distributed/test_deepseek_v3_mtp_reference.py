"""DeepSeek-V3's multi-token prediction trained with ``mtp_num_layers``: a tiny DeepSeek-V3
with the release's MTP layer (loaded from HF into megatron-core's MTP block), fed one packed
THD batch by mswift's own ``model_inputs``, gives the MTP logits, the MTP loss and the
gradients of an independent torch implementation of DeepSeek's equations (fp32, 1e-5
relative to the largest value).

The reference (the DeepSeek-V3 report, section 2.2, and the MTP modules of vLLM / SGLang that
run the released weights): for each sample alone, ``h`` = transformers' main-model hidden
states after the final norm; MTP input at position i = ``eh_proj([enorm(Emb(t[i+1]));
hnorm(h[i])])``; transformers' own ``DeepseekV3DecoderLayer`` (layer ``num_hidden_layers``, an
MoE layer) with causal attention inside the sample; logits = ``lm_head(shared_head.norm(.))``
predicting ``t[i+2]``. Loss: per depth the cross entropy summed over the positions whose
target is a loss token, the objective ``sum main CE + lambda / D * sum MTP CE`` over the same
token count (the report's 1/T in both), so the gradients carry lambda = 0.3 and the shared
embedding / head get both losses' share. The logged MTP loss is its per-target mean.

Packing: megatron-core 0.16.1 shifts input ids, labels and loss mask per sample when given
``PackedSeqParams`` (``_roll_tensor_packed_seq``); the batch's third sample starts with a loss
token, so a shift across the second one's end would add a target the reference has not.
The same HF checkpoint converted to torch_dist with ``mtp_num_layers`` loads into the model
with every tensor equal to the direct HF load, and the loaded model exports the checkpoint
back bit for bit.
"""
import pytest
import torch

from mswift.testing import run_ranks
from mswift.testing.hf_models import add_tiny_mtp_layer, read_safetensors_dir, save_tiny_hf_model

TOL = 1e-5
LAMBDA = 0.3
SAMPLES = [13, 40, 27]
PROMPT = 5  # the second sample's first tokens carry no loss (a prompt)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3_mtp") / "hf"
    return add_tiny_mtp_layer(save_tiny_hf_model("deepseek_v3", path, seed=3))


@pytest.fixture(scope="module")
def batch():
    """One packed batch as mswift's data pipeline makes it: labels = next token inside the
    sample (-100 at its end), loss mask 0 there and on the prompt."""
    generator = torch.Generator().manual_seed(7)
    samples = [torch.randint(0, 250, (n,), generator=generator) for n in SAMPLES]
    labels, masks = [], []
    for i, s in enumerate(samples):
        label = torch.cat([s[1:], torch.tensor([-100])])
        mask = (label >= 0).float()
        if i == 1:
            mask[:PROMPT] = 0
        labels.append(label)
        masks.append(mask)
    cu = torch.tensor([0] + SAMPLES).cumsum(0).to(torch.int32)
    return {"tokens": torch.cat(samples)[None], "labels": torch.cat(labels)[None],
            "loss_mask": torch.cat(masks)[None], "cu_seqlens": cu,
            "position_ids": torch.cat([torch.arange(n) for n in SAMPLES])[None],
            "samples": samples, "masks": masks}


def megatron_mtp(hf_dir, converted, exported, batch):
    """Rank body: MTP logits, logged MTP loss and gradients of one packed training step."""
    from megatron.core.transformer.multi_token_prediction import (
        MTPLossAutoScaler,
        MTPLossLoggingHelper,
    )

    from mswift.bridge.layout import HFModel, Layout, build_chunks
    from mswift.bridge.model_io import load_hf_into_model, save_model_to_hf
    from mswift.bridge.torch_dist import load_torch_dist
    from mswift.train.step import model_inputs

    hf = HFModel.open(hf_dir, mtp_num_layers=1, mtp_loss_scaling_factor=LAMBDA)
    chunks = build_chunks(hf.run_config(Layout(), seq_length=sum(SAMPLES)))
    (model,) = chunks
    load_torch_dist(chunks, converted)
    from_torch_dist = {k: v.clone() for k, v in model.state_dict().items()
                       if isinstance(v, torch.Tensor)}
    wmap = hf.weight_map(hf.padded_vocab(1))
    load_hf_into_model(chunks, hf.hf_dir, wmap)
    save_model_to_hf(chunks, wmap, exported)  # before training: the loaded tensors
    differ = [k for k, v in model.state_dict().items()
              if k in from_torch_dist and not torch.equal(v, from_torch_dist[k])]
    captured = {}
    model.mtp.register_forward_hook(lambda module, args, out: captured.update(hidden=out))
    model.train()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    MTPLossLoggingHelper.tracker.clear()
    fed = {k: v for k, v in batch.items() if k not in ("samples", "masks")}
    loss = model(**model_inputs(fed, torch.device("cpu")))  # main per-token loss [1, T]
    (loss * batch["loss_mask"]).sum().backward()
    tokens = sum(SAMPLES)
    with torch.no_grad():
        mtp_hidden = captured["hidden"][tokens:]  # after the main model's [T, 1, H]
        logits = model.output_layer(mtp_hidden)[0][:, 0, :hf.model.vocab_size]
    layer = model.mtp.layers[0]
    grads = {"eh_proj": layer.eh_proj.weight.grad, "enorm": layer.enorm.weight.grad,
             "embedding": model.embedding.word_embeddings.weight.grad[:hf.model.vocab_size],
             "head": model.output_layer.weight.grad[:hf.model.vocab_size]}
    return {"logits": logits, "mtp_loss": MTPLossLoggingHelper.tracker["values"][0].item(),
            "grads": grads, "torch_dist_differs": differ, "tensors": len(from_torch_dist)}


def reference(hf_dir, batch):
    """The independent implementation: transformers' main model and decoder layer, the MTP
    equations written out (see the module doc)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    def load(**overrides):
        return AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, attn_implementation="eager", **overrides).eval()

    model = load()
    cfg, weights = model.config, read_safetensors_dir(hf_dir)
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    mtp = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    # The MTP decoder layer as transformers loads a decoder layer from the same keys: one
    # more layer in the config (its other MTP tensors are left unused).
    layer = load(num_hidden_layers=cfg.num_hidden_layers + 1).model.layers[-1]
    hidden = cfg.hidden_size
    enorm, hnorm, head_norm = (DeepseekV3RMSNorm(hidden, eps=cfg.rms_norm_eps) for _ in range(3))
    for norm, name in ((enorm, "enorm"), (hnorm, "hnorm"), (head_norm, "shared_head.norm")):
        norm.weight.data.copy_(mtp[f"{name}.weight"])
    eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
    eh_proj.weight.data.copy_(mtp["eh_proj.weight"])
    ce = torch.nn.functional.cross_entropy
    objective, mtp_sum, mtp_count, rows = 0.0, 0.0, 0.0, []
    for sample, mask in zip(batch["samples"], batch["masks"]):
        n = len(sample)
        h = model.model(sample[None]).last_hidden_state  # after the final norm [1, n, H]
        objective = objective + (ce(model.lm_head(h)[0, :-1], sample[1:], reduction="none")
                                 * mask[:-1]).sum()
        x = eh_proj(torch.cat([enorm(model.model.embed_tokens(sample[None, 1:])),
                               hnorm(h[:, :-1])], dim=-1))  # position i: token i+1, hidden i
        positions = torch.arange(n - 1)[None]
        causal = torch.full((n - 1, n - 1), float("-inf")).triu(1)[None, None]
        y = layer(x, attention_mask=causal, position_ids=positions,
                  position_embeddings=model.model.rotary_emb(x, positions))
        logits = model.lm_head(head_norm(y))[0]  # row i predicts token i+2
        rows.append(logits.detach())
        target_mask = mask[1:-1]  # t[i+2] is position i+1's main target
        depth = (ce(logits[:-1], sample[2:], reduction="none") * target_mask).sum()
        objective = objective + LAMBDA * depth
        mtp_sum, mtp_count = mtp_sum + depth.item(), mtp_count + target_mask.sum().item()
    objective.backward()
    grads = {"eh_proj": eh_proj.weight.grad, "enorm": enorm.weight.grad,
             "embedding": model.model.embed_tokens.weight.grad, "head": model.lm_head.weight.grad}
    return {"rows": rows, "mtp_loss": mtp_sum / mtp_count, "grads": grads}


@pytest.fixture(scope="module")
def results(hf_dir, batch, tmp_path_factory):
    from mswift.bridge.convert import hf_to_mcore

    converted = hf_to_mcore(hf_dir, tmp_path_factory.mktemp("mtp_mcore") / "mcore",
                            "torch_dist", progress=False, mtp_num_layers=1)
    exported = tmp_path_factory.mktemp("mtp_export") / "hf"
    (got,) = run_ranks(1, megatron_mtp, str(hf_dir), str(converted), str(exported), batch,
                       timeout=600)
    return got, reference(hf_dir, batch), exported


def test_mtp_logits_equal_the_reference_per_sample(results):
    got, want, _ = results
    start = 0
    for n, rows in zip(SAMPLES, want["rows"]):
        # the sample's last position has no next token: megatron-core feeds it id 0, no loss
        diff = (got["logits"][start:start + n - 1] - rows).abs().max().item()
        scale = rows.abs().max().item()
        assert diff <= TOL * scale, f"sample of {n}: MTP logits up to {scale}, {diff} off"
        start += n


def test_mtp_loss_equals_the_reference(results):
    got, want, _ = results
    assert abs(got["mtp_loss"] - want["mtp_loss"]) <= TOL * want["mtp_loss"]


@pytest.mark.parametrize("name", ["eh_proj", "enorm", "embedding", "head"])
def test_gradients_carry_lambda_and_the_shared_embedding_and_head(results, name):
    got, want, _ = results
    g, w = got["grads"][name], want["grads"][name]
    assert g.shape == w.shape
    assert (g - w).abs().max().item() <= TOL * max(1.0, w.abs().max().item())


def test_the_converted_torch_dist_checkpoint_loads_the_same_tensors(results):
    got, _, _ = results
    assert got["tensors"] > 100 and got["torch_dist_differs"] == []


def test_the_loaded_model_exports_every_tensor_bit_exact(hf_dir, results):
    """The live model's HF export: the MTP layer from megatron-core's MTP block, its
    embed_tokens / shared_head.head copies written from the shared embedding and head."""
    _, _, exported = results
    want, got = read_safetensors_dir(hf_dir), read_safetensors_dir(exported)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[name], want[name]) for name in want)
