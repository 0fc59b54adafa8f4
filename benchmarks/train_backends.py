"""Tiny Llama and Qwen3-MoE training at TP1 with each attention backend and layer implementation.

Each run is the real command line (``python -m mswift train``) on the same HF model, data and
seed, in bf16 on packed SFT batches (seq_length 2048, mixed sample lengths), under its own
``timeout`` so that one hang cannot eat the budget. The table gives tokens/s, TFLOP/s per GPU,
MFU and peak memory (means over the steps after the 2 warm-up steps, from ``metrics.jsonl``),
and the loss of steps 1-5 compared with the model's reference run (the first one: local
layers, mswift's torch attention): equal within ``LOSS_RTOL`` (bf16) or flagged.

    python benchmarks/train_backends.py --markdown train.md     # on a GPU machine
    python benchmarks/train_backends.py --dry-run               # anywhere: models, data and
                                                                # every run's settings checked

Runs: every ``transformer_impl`` x ``attention_backend`` (torch, triton, te) this mswift's
config offers. Runs that need Transformer Engine where it does not import are listed as
skipped; a combination the config refuses, a crash or a time-out is a row saying so.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "tiny_corpus.txt"

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9); the backends round differently in
# every layer, so the losses of steps 1-5 agree to about 1e-3 relative; 2e-2 flags a real
# difference (a wrong mask or scale changes the loss by far more) without tripping on rounding.
LOSS_RTOL = 2e-2
LOSS_STEPS = 5
WARMUP_STEPS = 2

MODELS = {
    # 3 query heads per KV group; vocabularies 384 (tokenizer 360), padded by the builder
    "llama": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                  max_position_embeddings=4096),
    "qwen3_moe": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                      max_position_embeddings=4096),
}
IMPLS = ("local", "transformer_engine")
BACKENDS = ("torch", "triton", "te")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="models, data and runs (default: a new temporary folder)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=10, help="training steps per run")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per run")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all runs; later runs are skipped once it is spent")
    parser.add_argument("--dry-run", action="store_true",
                        help="make the models and data, check every run's settings with "
                             "mswift's config loader and pre-start checks; train nothing")
    return parser.parse_args(argv)


def offered(name: str, wanted: tuple[str, ...]) -> list[str] | None:
    """The values of ``wanted`` that the model setting ``name`` accepts; None: no such setting."""
    from mswift.config.schema import ModelConfig

    for f in dataclasses.fields(ModelConfig):
        if f.name == name:
            return [v for v in wanted if v in f.metadata["choices"]]
    return None


def runs() -> list[tuple[str | None, str]]:
    """(transformer_impl or None where mswift has no such setting, attention_backend)."""
    impls = offered("transformer_impl", IMPLS) or [None]
    # TE's fused attention runs only on TE's layer spec (mswift refuses local + te)
    return [(impl, backend) for impl in impls
            for backend in offered("attention_backend", BACKENDS)
            if not (backend == "te" and impl in (None, "local"))]


def prepare(workdir: Path, models: list[str]) -> dict[str, Path]:
    """HF model folders (random weights, a BPE tokenizer with a chat template) and chat data."""
    from mswift.testing.tokenizers import save_tiny_chat_model, write_chat_jsonl

    data = write_chat_jsonl(CORPUS, workdir / "chat.jsonl")
    found = {"data": data}
    for name in models:
        found[name] = workdir / name
        if not (found[name] / "config.json").exists():
            save_tiny_chat_model(name, found[name], CORPUS, **MODELS[name])
    return found


def settings(args, paths: dict[str, Path], model: str, impl: str | None, backend: str,
             save: Path) -> list[str]:
    chosen = [f"attention_backend={backend}"] + ([f"transformer_impl={impl}"] if impl else [])
    return [f"hf_model={paths[model]}", "mode=sft", f"dataset=[{paths['data']}]",
            f"seq_length={args.seq_length}", "packing=true", "bf16=true", "micro_batch_size=1",
            f"global_batch_size={args.global_batch_size}", f"train_iters={args.steps}",
            "lr=1e-4", "lr_warmup_iters=0", "log_interval=1", "seed=1234", f"save={save}",
            *chosen]


def check_settings(overrides: list[str], machine: bool = True) -> str | None:
    """None if mswift's loader and pre-start checks accept ``overrides``, else the problem.
    ``machine=False`` (the dry run, on a machine without a GPU) leaves out the refusals that only
    say Transformer Engine or the Triton kernels cannot run *here*; contradictory settings are
    still refused."""
    from mswift.config import ConfigError, load_config
    from mswift.models.impl import te_machine_problems
    from mswift.train.preflight import check_before_start, triton_problems

    try:
        cfg = load_config(None, overrides)
    except ConfigError as err:
        return str(err)
    try:
        check_before_start(cfg, 1)
    except ConfigError as err:
        here = [] if machine else triton_problems(cfg) + te_machine_problems(
            cfg.model.transformer_impl, cfg.model.attention_backend, cfg.training.fp8)
        left = [p for p in err.problems if p not in here]
        return str(ConfigError(left)) if left else None
    return None


def needs_te(impl: str | None, backend: str) -> bool:
    return impl == "transformer_engine" or backend == "te"


def train(overrides: list[str], save: Path, timeout: int) -> dict:
    """One run on the command line, under ``timeout``; its metrics rows and how it ended."""
    cmd = ["timeout", "--kill-after=10", str(timeout), sys.executable, "-m", "mswift", "train",
           *overrides]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    (save.parent / f"{save.name}.log").write_text(proc.stdout + proc.stderr)
    metrics = save / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] \
        if metrics.exists() else []
    status = "ok" if proc.returncode == 0 else \
        f"timed out after {timeout} s" if proc.returncode in (124, 137) else \
        f"exit {proc.returncode}: " + _last_line(proc.stderr or proc.stdout)
    return {"status": status, "rows": [r for r in rows if "loss" in r],
            "wall_s": time.perf_counter() - start}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows[WARMUP_STEPS:] if isinstance(r.get(key), (int, float))]
    return sum(values) / len(values) if values else None


def _fmt(value, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(results: list[dict]) -> str:
    """One markdown table; losses compared with the first run of the same model that ran."""
    lines = ["| model | transformer_impl | attention_backend | status | tokens/s | TFLOP/s/GPU "
             "| MFU | peak GiB | loss steps 1-5 | max rel. diff vs reference |",
             "|---|---|---|---|--:|--:|--:|--:|---|---|"]
    reference: dict[str, list[float]] = {}
    for res in results:
        rows = res.get("rows", [])
        losses = [r["loss"] for r in rows[:LOSS_STEPS]]
        diff = "—"
        complete = len(losses) == LOSS_STEPS and all(map(math.isfinite, losses))
        if complete and res["model"] not in reference:
            reference[res["model"]] = losses
            diff = "reference"
        elif complete:
            ref = reference[res["model"]]
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
            diff = f"{worst:.2e} " + ("ok" if worst <= LOSS_RTOL else f"DIFFERS (> {LOSS_RTOL})")
        peak = max((r["mem_peak_gib"] for r in rows if "mem_peak_gib" in r), default=None)
        mfu = _mean(rows, "mfu")
        lines.append(
            f"| {res['model']} | {res['impl'] or 'local (no setting)'} | {res['backend']} "
            f"| {res['status']} | {_fmt(_mean(rows, 'tokens_per_s'), ',.0f')} "
            f"| {_fmt(_mean(rows, 'tflops_per_gpu'), '.1f')} "
            f"| {_fmt(None if mfu is None else 100 * mfu, '.1f')}{'%' if mfu else ''} "
            f"| {_fmt(peak, '.2f')} | {' '.join(f'{x:.4f}' for x in losses) or '—'} | {diff} |")
    return "\n".join(lines) + (f"\n\nLosses: bf16, equal when within {LOSS_RTOL} relative of "
                               "the model's reference run (its first complete run above); "
                               f"speeds: means over steps {WARMUP_STEPS + 1}+.\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mswift-train-backends-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir, args.models)
    plan = runs()
    print(f"workdir {workdir}; runs per model: "
          + ", ".join(f"{impl or 'local'}/{backend}" for impl, backend in plan), flush=True)
    if args.dry_run:
        problems = []
        for model in args.models:
            for impl, backend in plan:
                overrides = settings(args, paths, model, impl, backend, workdir / "dry")
                problem = check_settings(overrides, machine=False)
                print(f"{'ok  ' if problem is None else 'FAIL'} {model} {impl or 'local'} "
                      f"{backend}: python -m mswift train {' '.join(overrides)}"
                      + (f"\n     {problem}" if problem else ""), flush=True)
                problems += [problem] if problem else []
        print(f"dry run: {len(problems)} of {len(args.models) * len(plan)} runs' settings refused")
        return 1 if problems else 0

    from mswift.runtime.device import transformer_engine_importable

    te = transformer_engine_importable()
    end = time.monotonic() + args.budget if args.budget else None
    results = []
    for model in args.models:
        for impl, backend in plan:
            res = {"model": model, "impl": impl, "backend": backend}
            left = int(end - time.monotonic()) - 5 if end else args.timeout
            save = workdir / "runs" / f"{model}-{impl or 'local'}-{backend}"
            if needs_te(impl, backend) and not te:
                res["status"] = "skipped: Transformer Engine does not import here"
            elif left < 20:
                res["status"] = "skipped: time budget spent"
            else:
                problem = check_settings(settings(args, paths, model, impl, backend, save))
                res.update({"status": "refused: " + problem.replace("\n", " ")[:160]}
                           if problem else
                           train(settings(args, paths, model, impl, backend, save), save,
                                 min(args.timeout, left)))
            print(f"{model} {impl} {backend}: {res['status']}", flush=True)
            results.append(res)
    text = table(results)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
