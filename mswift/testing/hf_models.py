"""Tiny random Hugging Face models of each supported family, saved like real checkpoints.

``save_tiny_hf_model("qwen3_moe", path)`` instantiates the family's ``debug_config`` with
``transformers`` (no hub access), gives every tensor random values (HF initialises norms to one
and biases to zero, which would hide a swapped or mis-sliced norm or bias), and writes it with
``save_pretrained`` plus a small word-level tokenizer, so tokenizer files travel too.
"""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_hf_config(family: str, **overrides):
    from transformers import AutoConfig

    from mswift.models.registry import families

    fam = {f.name: f for f in families()}[family]
    return AutoConfig.for_model(fam.model_types[0], **{**fam.debug_config, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norm weights and biases: around one, all different
                values = 0.5 + torch.rand(param.shape, generator=generator)
            else:
                values = 0.2 * torch.randn(param.shape, generator=generator)
            param.copy_(values.to(param.dtype))
        # Saved buffers that are weights (DeepSeek-V3's e_score_correction_bias, zero when
        # built, which would hide a bias that is not loaded or not used): small, all different.
        saved = model.state_dict().keys()
        for name, buffer in model.named_buffers():
            if name in saved and buffer.is_floating_point():
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


def save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["<unk>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(path))


def save_tiny_hf_model(family: str, path: str | Path, dtype: torch.dtype = torch.float32,
                       seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    """Save a random tiny ``family`` model (``overrides``: HF config values) to ``path``."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    save_tokenizer(path, config.vocab_size)
    return path


def add_tiny_mtp_layer(path: str | Path, seed: int = 11, same_copies: bool = True) -> Path:
    """Write one multi-token-prediction layer into the tiny DeepSeek-V3 checkpoint at ``path``
    (one safetensors file), with the release's names and shapes (transformers neither builds
    nor saves it): layer ``num_hidden_layers``'s ``enorm``, ``hnorm``, ``eh_proj`` [H, 2H],
    ``shared_head.norm``, a decoder layer shaped like the last (MoE) one, random values as
    :func:`randomize_` draws them, and ``embed_tokens`` / ``shared_head.head``: copies of the
    main model's (``same_copies``, as released) or random; config.json then counts it."""
    import json

    from safetensors.torch import load_file, save_file

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1, f"{path}: expected one safetensors file"
    tensors = load_file(files[0])
    config = json.loads((path / "config.json").read_text())
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    main = tensors["model.embed_tokens.weight"]
    shapes = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,),
              "eh_proj.weight": (hidden, 2 * hidden), "shared_head.norm.weight": (hidden,),
              "embed_tokens.weight": tuple(main.shape),
              "shared_head.head.weight": tuple(tensors["lm_head.weight"].shape)}
    last = f"model.layers.{layers - 1}."
    shapes.update({name[len(last):]: tuple(t.shape) for name, t in tensors.items()
                   if name.startswith(last)})
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            values = 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            values = 0.5 + torch.rand(shape, generator=generator)
        else:
            values = 0.2 * torch.randn(shape, generator=generator)
        tensors[f"model.layers.{layers}.{name}"] = values.to(main.dtype)
    if same_copies:
        tensors[f"model.layers.{layers}.embed_tokens.weight"] = main.clone()
        tensors[f"model.layers.{layers}.shared_head.head.weight"] = \
            tensors["lm_head.weight"].clone()
    save_file(tensors, files[0], metadata={"format": "pt"})
    config["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def hf_logits(path: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits ``[batch, seq, vocab]`` of the model saved at ``path``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def hf_reference_logits(path: str | Path, tokens: torch.Tensor,
                        samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' logits of a batch (``logits`` ``[batch, seq, vocab]``) and of packed samples,
    each run alone (``packed`` ``[tokens, vocab]``, concatenated in order): the references of the
    logits-vs-transformers tests."""
    return {"logits": hf_logits(path, tokens),
            "packed": torch.cat([hf_logits(path, s.unsqueeze(0))[0] for s in samples])}


def read_safetensors_dir(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder``, by name."""
    from safetensors import safe_open

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# A vision tower small enough for tests: two layers, 28x28 images in 14x14 patches.
TINY_LLAMA4_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, image_size=28, patch_size=14,
                          vision_output_dim=48, projector_input_dim=48,
                          projector_output_dim=48, pixel_shuffle_ratio=0.5)


def save_tiny_llama4_multimodal(path: str | Path, dtype: torch.dtype = torch.float32,
                                seed: int = 0, **text_overrides) -> Path:
    """A random tiny ``Llama4ForConditionalGeneration`` (the layout of the released Scout and
    Maverick checkpoints: the text model under ``language_model.``, a vision tower and its
    projector beside it), the llama4 family's debug config as its text model."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    path = Path(path)
    text = tiny_hf_config("llama4", **text_overrides).to_dict()
    config = Llama4Config(text_config=text, vision_config=TINY_LLAMA4_VISION)
    torch.manual_seed(seed)
    model = Llama4ForConditionalGeneration(config)
    randomize_(model, seed)
    model.to(dtype).save_pretrained(str(path))
    save_tokenizer(path, text["vocab_size"])
    return path
