"""``mswift export --quant w4a16-rtn`` against the usual way: load the whole model in
transformers and RTN-quantize it there (the same ``rtn_quantize``), same machine, same run.

Builds a random Llama-style HF model (``--hidden``, ``--layers``; bf16), converts it to a
torch_dist checkpoint (not timed), then runs as subprocesses, alternating, ``--repeat`` times:

    mswift export --load CKPT --out OUT --quant w4a16-rtn --no-report --no-progress
    python -c BASELINE HF OUT2   # from_pretrained, rtn_quantize every *proj.weight, save_file

and prints each one's wall time (lower median) and peak RSS (the process's ``ru_maxrss``,
measured as ``benchmarks/bridge_convert.py`` measures it), both per billion parameters, and
mswift's / the baseline's ratios. mswift's time includes its 16-bit HF export from the
megatron checkpoint (the baseline starts from that HF folder).

    python benchmarks/export_quant.py                       # ~0.1 B parameters, CPU
    python benchmarks/export_quant.py --hidden 1024 --layers 16 --repeat 3
    python benchmarks/export_quant.py --ranks 2             # + GPTQ: 1 process vs TP2

``--ranks N`` also runs a calibrated export (``w4a16-gptq`` on ``--calib-samples`` rows of
random words) in one process and under ``torchrun --nproc_per_node N`` at ``--tp N``, and
prints the largest process's peak RSS and the time of each: what sharding the model over ranks
saves each process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bridge_convert import measure  # noqa: E402  (the launcher that reads ru_maxrss)

BASELINE = """import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from mswift.export.qweight import rtn_quantize
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
out = {}
for name, tensor in model.state_dict().items():
    if name.endswith("proj.weight"):
        qw = rtn_quantize(tensor.float(), bits=4, group_size=128)
        out[name], out[name + "_scale"] = qw.q, qw.scale
    else:
        out[name] = tensor.contiguous()
save_file(out, sys.argv[2] + "/model.safetensors")
"""


def build(workdir: Path, hidden: int, layers: int) -> tuple[Path, Path, int]:
    from mswift.bridge.convert import hf_to_mcore
    from mswift.testing.hf_models import save_tiny_hf_model

    hf = save_tiny_hf_model("llama", workdir / "hf", dtype=torch.bfloat16, vocab_size=32000,
                            hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 128 * 128,
                            num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                            head_dim=64, num_hidden_layers=layers)
    from mswift.bridge.hf_io import HFCheckpoint

    stored = HFCheckpoint(hf)
    params = sum(torch.Size(stored.shape(n)).numel() for n in stored.names)
    hf_to_mcore(hf, workdir / "ckpt", "torch_dist", progress=False)
    return hf, workdir / "ckpt", params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", default=None)
    p.add_argument("--ranks", type=int, default=1, help="also GPTQ at TP N under torchrun")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-len", type=int, default=256)
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="export_quant."))
    env = dict(os.environ)
    try:
        hf, ckpt, params = build(workdir, args.hidden, args.layers)
        billions = params / 1e9
        ours, base = [], []
        for _ in range(args.repeat):
            for path in (workdir / "ours", workdir / "base"):
                shutil.rmtree(path, ignore_errors=True)
            ours.append(measure([sys.executable, "-m", "mswift", "export", "--load", str(ckpt),
                                 "--out", str(workdir / "ours"), "--quant", "w4a16-rtn",
                                 "--no-report", "--no-progress"], env))
            (workdir / "base").mkdir()
            base.append(measure([sys.executable, "-c", BASELINE, str(hf),
                                 str(workdir / "base")], env))
        pick = lambda runs, key: sorted(r[key] for r in runs)[(len(runs) - 1) // 2]  # noqa
        rows = {"mswift export": ours, "transformers + rtn_quantize": base}
        print(f"model: {params / 1e6:.1f} M parameters (hidden {args.hidden}, {args.layers} "
              f"layers, bf16), {args.repeat} run(s) each, {os.cpu_count()} CPUs")
        for name, runs in rows.items():
            wall, rss = pick(runs, "wall"), max(r["rss"] for r in runs)
            print(f"  {name:<28} {wall:7.2f} s ({wall / billions:8.1f} s/B)  peak RSS "
                  f"{rss / 2**30:6.2f} GiB ({rss / 2**30 / billions:7.2f} GiB/B)")
        print(f"  ratio mswift / baseline: time {pick(ours, 'wall') / pick(base, 'wall'):.2f}x, "
              f"peak RSS {max(r['rss'] for r in ours) / max(r['rss'] for r in base):.2f}x")
        if args.ranks > 1:
            ranks(workdir, ckpt, args, env)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def ranks(workdir: Path, ckpt: Path, args, env: dict) -> None:
    """GPTQ export in one process and at TP ``args.ranks`` under torchrun."""
    import json
    import random

    rows = workdir / "calib.jsonl"
    rng = random.Random(0)
    rows.write_text("".join(json.dumps({"text": " ".join(
        f"w{rng.randrange(5000)}" for _ in range(args.calib_len))}) + "\n"
        for _ in range(args.calib_samples)))
    common = ["--load", str(ckpt), "--quant", "w4a16-gptq", "--calib-dataset", str(rows),
              "--calib-samples", str(args.calib_samples), "--calib-seq-len",
              str(args.calib_len), "--no-report", "--no-progress"]
    runs = {}
    for world in (1, args.ranks):
        out = workdir / f"gptq-{world}"
        shutil.rmtree(out, ignore_errors=True)
        launch = ([sys.executable, "-m", "mswift"] if world == 1 else
                  [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                   str(world), "-m", "mswift"])
        tp = [] if world == 1 else ["--tp", str(world)]
        runs[world] = measure([*launch, "export", "--out", str(out), *common, *tp], env)
    print(f"w4a16-gptq, {args.calib_samples} calibration rows of {args.calib_len} tokens:")
    for world, run in runs.items():
        print(f"  {world} process(es){' at TP' + str(world) if world > 1 else '':<7} "
              f"{run['wall']:7.2f} s  largest process's peak RSS {run['rss'] / 2**30:6.2f} GiB"
              f"  (all processes together {run['tree_rss'] / 2**30:6.2f} GiB)")
    one, many = runs[1], runs[args.ranks]
    print(f"  ratio TP{args.ranks} / one process: time {many['wall'] / one['wall']:.2f}x, "
          f"largest process's peak RSS {many['rss'] / one['rss']:.2f}x")


if __name__ == "__main__":
    main()
