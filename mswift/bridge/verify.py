"""``mswift verify``: the same tokens through megatron-core (at a parallel layout) and through
``transformers``; prints the logit differences and exits non-zero past a tolerance.

    torchrun --nproc_per_node W -m mswift verify --hf-dir IN [--mcore-dir CKPT] --tp N --pp N
        --ep N [--tokens-file T.json] [--dump-logits OUT.pt] [--tol 1e-4]

The megatron model's weights come from ``--mcore-dir`` (a torch_dist or legacy checkpoint) if
given, else straight from ``--hf-dir``; the reference is always ``--hf-dir`` loaded by
transformers (a quantized one, FP8 or AWQ, as the model of its dequantized weights, dequantized
as the bridge loads them: :mod:`mswift.bridge.quantized`). Both run in fp32. Exit codes: 0 within ``--tol`` (max abs logit difference and
loss difference), 1 past it, 2 bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mswift.bridge.cli import positive_int
from mswift.bridge.errors import BridgeError
from mswift.config.schema import ConfigError
from mswift.models.errors import ModelError
from mswift.runtime.device import local_device
from mswift.runtime.launch_env import launcher_rank


def parser(prog: str = "mswift verify") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF model dir: the reference (transformers)")
    p.add_argument("--mcore-dir", default=None, help="converted checkpoint to check instead of "
                   "loading --hf-dir into megatron-core")
    for flag, what in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        p.add_argument(flag, type=positive_int, default=1, help=f"{what}-parallel size")
    p.add_argument("--etp", type=positive_int, default=None, help="expert tensor-parallel size")
    p.add_argument("--vpp", type=positive_int, default=None, help="virtual pipeline stages")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="sequence parallelism (always on for MoE with --tp > 1)")
    p.add_argument("--tokens-file", default=None,
                   help="JSON list of token-id lists of equal length (default: random tokens)")
    p.add_argument("--batch", type=positive_int, default=2, help="random tokens: sequences")
    p.add_argument("--seq-len", type=positive_int, default=32, help="random tokens: length")
    p.add_argument("--dump-logits", default=None,
                   help="torch.save the megatron fp32 logits [batch, seq, vocab] here")
    p.add_argument("--tol", type=float, default=1e-4)
    return p


def read_tokens(path: str | None, vocab: int, batch: int, seq: int) -> torch.Tensor:
    if path is None:
        generator = torch.Generator().manual_seed(1234)
        return torch.randint(0, vocab, (batch, seq), generator=generator)
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise BridgeError(f"--tokens-file {path}: cannot be read as JSON ({err})") from None
    ok = (isinstance(rows, list) and rows and all(isinstance(r, list) and r for r in rows)
          and all(isinstance(t, int) and not isinstance(t, bool) for r in rows for t in r))
    if not ok or len({len(r) for r in rows}) != 1:
        raise BridgeError(f"--tokens-file {path}: expected a JSON list of non-empty lists of "
                          "token ids, all of the same length")
    tokens = torch.tensor(rows, dtype=torch.long)
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise BridgeError(f"--tokens-file {path}: token ids must lie in [0, {vocab})")
    return tokens


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross entropy of predicting each next token (fp64 for a stable comparison)."""
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
    return torch.nn.functional.cross_entropy(flat, tokens[:, 1:].reshape(-1)).item()


def compare(logits: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor,
            model_loss: float) -> dict:
    """Logit and loss differences; ``model_loss`` is the megatron model's own loss (its
    vocab-parallel cross entropy over the padded vocabulary), the others come from logits cut
    to the real vocabulary."""
    diff = (logits - reference).abs()
    loss, ref_loss = next_token_loss(logits, tokens), next_token_loss(reference, tokens)
    loss_diff = max(abs(loss - ref_loss), abs(model_loss - ref_loss))
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "argmax_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
        "loss": loss,
        "model_loss": model_loss,
        "reference_loss": ref_loss,
        "loss_diff": loss_diff,
    }


def _dequantized_hf_model(hf_dir):
    """transformers' model of an FP8 / AWQ checkpoint's dequantized weights (fp32); None for a
    plain checkpoint.

    The dequantized tensors are streamed (one at a time) into an fp32 twin in a temporary
    folder, which transformers loads as any checkpoint, with its own key conversions (its MoE
    models fuse the stored per-expert tensors into ``experts.gate_up_proj`` on load).
    """
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    from mswift.bridge.hf_io import HFShardWriter
    from mswift.bridge.quantized import DequantizedCheckpoint, open_checkpoint, plain_config

    ckpt = open_checkpoint(hf_dir)
    if not isinstance(ckpt, DequantizedCheckpoint):
        return None
    with tempfile.TemporaryDirectory(prefix="mswift-verify-") as twin:
        shutil.copy(Path(hf_dir) / "config.json", Path(twin) / "config.json")
        plain_config(twin, "float32")
        names = sorted(ckpt.names)
        writer = HFShardWriter(twin, [(n, torch.float32, tuple(ckpt.shape(n))) for n in names])
        for name in names:
            writer.add(name, ckpt.read(name).float())
        writer.close()
        return AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32,
                                                    attn_implementation="eager")


def hf_reference_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = _dequantized_hf_model(hf_dir) or AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _padded_vocab(hf, mcore_dir, tp: int) -> int:
    from mswift.bridge.dist_bytes import is_torch_dist, stored_embedding

    if mcore_dir is not None and is_torch_dist(mcore_dir):
        padded, _ = stored_embedding(mcore_dir)
        if padded % tp:
            raise BridgeError(f"--mcore-dir {mcore_dir}: {padded} vocabulary rows do not split "
                              f"over --tp {tp}")
        return padded
    return hf.padded_vocab(tp)


def _load_weights(chunks, hf, mcore_dir, wmap) -> None:
    from mswift.bridge.dist_bytes import is_torch_dist
    from mswift.bridge.legacy import LegacySource, is_legacy
    from mswift.bridge.model_io import HFSource, load_into_model
    from mswift.bridge.quantized import open_checkpoint
    from mswift.bridge.torch_dist import load_torch_dist

    if mcore_dir is None:
        ckpt = open_checkpoint(hf.hf_dir)
        ckpt.check_tensors(wmap.hf_shapes(), hf.family.name, hf.ignored_tensors)
        load_into_model(chunks, HFSource(ckpt, wmap))
    elif is_torch_dist(mcore_dir):
        load_torch_dist(chunks, mcore_dir)
    elif is_legacy(mcore_dir):
        load_into_model(chunks, LegacySource(mcore_dir, wmap))
    else:
        raise BridgeError(f"--mcore-dir {mcore_dir}: neither a torch_dist nor a legacy checkpoint")


def megatron_side(args, hf, layout, tokens) -> tuple[torch.Tensor, float] | None:
    """The megatron logits and the model's own loss, on rank 0 (None elsewhere)."""
    from mswift.bridge.forward import gather_to_rank0, megatron_logits, megatron_loss
    from mswift.bridge.layout import build_chunks, launch_world_size

    seq = tokens.shape[1]
    hf.check_layout(layout, launch_world_size(), seq_length=seq)
    padded = _padded_vocab(hf, args.mcore_dir, layout.tp)
    model = dataclasses.replace(hf.model, make_vocab_size_divisible_by=padded // layout.tp)
    run_hf = dataclasses.replace(hf, model=model)
    chunks = build_chunks(run_hf.run_config(layout, seq_length=seq))
    _load_weights(chunks, hf, args.mcore_dir, run_hf.weight_map(padded))
    logits = gather_to_rank0(megatron_logits(chunks, tokens, hf.model.vocab_size))
    loss = megatron_loss(chunks, tokens)
    loss = gather_to_rank0(None if loss is None else
                           torch.tensor([loss], dtype=torch.float32, device=local_device()))
    return None if logits is None else (logits.cpu(), loss.item())


def report(stats: dict, layout, tol: float) -> str:
    verdict = "PASS" if stats["max_abs_diff"] <= tol and stats["loss_diff"] <= tol else "FAIL"
    return (f"mswift verify ({layout.describe()}): {verdict} (tol {tol:g})\n"
            f"  max abs logit diff   {stats['max_abs_diff']:.3e}\n"
            f"  mean abs logit diff  {stats['mean_abs_diff']:.3e}\n"
            f"  argmax agreement     {stats['argmax_agreement'] * 100:.2f}%\n"
            f"  loss megatron / HF   {stats['loss']:.6f} / {stats['reference_loss']:.6f} "
            f"(model's own loss {stats['model_loss']:.6f}; max diff {stats['loss_diff']:.3e})")


def run_verify(args) -> int:
    from mswift.bridge.convert import conversion_layout
    from mswift.bridge.layout import HFModel

    hf = HFModel.open(args.hf_dir)
    layout = conversion_layout(hf, args.tp, args.pp, args.ep, args.etp, args.vpp)
    if args.sequence_parallel and args.tp > 1:
        layout = dataclasses.replace(layout, sequence_parallel=True)
    tokens = read_tokens(args.tokens_file, hf.model.vocab_size, args.batch, args.seq_len)
    megatron = megatron_side(args, hf, layout, tokens)
    code = torch.zeros(1, dtype=torch.long, device=local_device())
    if megatron is not None:  # rank 0
        logits, model_loss = megatron
        stats = compare(logits, hf_reference_logits(args.hf_dir, tokens), tokens, model_loss)
        print(report(stats, layout, args.tol), flush=True)
        if args.dump_logits:
            torch.save(logits, args.dump_logits)
        code[0] = 0 if stats["max_abs_diff"] <= args.tol and stats["loss_diff"] <= args.tol else 1
    if dist.is_initialized():
        dist.broadcast(code, src=0)
    return int(code[0])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_verify(args)
    except (ModelError, ConfigError) as err:
        if launcher_rank() == 0:
            print(f"mswift verify: {err}", file=sys.stderr)
        return 2
    finally:
        from mswift.runtime import destroy_distributed

        destroy_distributed()
