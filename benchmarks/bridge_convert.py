"""Checkpoint conversion against ``cp``: wall time and peak memory of HF -> megatron -> HF.

Builds a synthetic Llama-style HF checkpoint (random weights, exact HF tensor names, sharded
safetensors + index, config.json from ``transformers.LlamaConfig``) of about ``--sizes`` GB
each, then runs as subprocesses, one at a time:

    checkpoint_convert/hf_to_mcore.py --hf-dir HF --out LEG --format legacy --tp 1 --pp 1
    checkpoint_convert/hf_to_mcore.py --hf-dir HF --out TD  --format torch_dist --tp 1 --pp 1
    checkpoint_convert/mcore_to_hf.py --mcore-dir LEG --out HF_LEG
    checkpoint_convert/mcore_to_hf.py --mcore-dir TD  --out HF_TD

each paired with its baseline, ``cp -r`` of the same input (HF, LEG or TD), ``--repeat`` times
each in alternating order, each command starting with both outputs removed and synced (so both
see the same page cache: inputs written earlier may have been evicted once the files outgrow
memory). It prints, per size: each conversion's wall time /
its cp's (issue 3 target: <= 2x each way; the lower median of ``--repeat`` runs, also with a
``sync`` after each command) and peak RSS against
``largest tensor x 3 + 1 GB`` (target, and it should not grow with the model). Peak RSS is the
largest process's ``ru_maxrss`` from ``os.wait4`` in a small launcher (includes file-backed
pages of memory-mapped inputs); peak ``VmRSS`` and ``RssAnon`` summed over the process tree
(polled every 50 ms; shared copy-on-write pages of forked children count once per process) are
shown beside it. Finally every tensor of both round trips is compared bit for bit with the
original. Everything is written under ``--workdir`` and removed at the end (``--keep`` keeps it).
``--drop-caches`` (root): before each timed command the page cache is dropped and the command's
input read back into it, so that ``cp`` and the conversion start from the same memory state
(otherwise the page cache is full of the run's other files, and a command's writes first
reclaim their pages).
``--cast`` adds four steps that change the dtype (``--dtype`` the other of bf16 / fp32, then
back to HF, which casts to the original dtype), with the round trips checked too; their ``cp``
baseline copies the input, so a cast that doubles the bytes written cannot reach 1x.

    python benchmarks/bridge_convert.py                       # 1.2 GB and 2.5 GB, bf16
    python benchmarks/bridge_convert.py --sizes 0.1 --dtype fp32
    python benchmarks/bridge_convert.py --sizes 1.2 2.5 5 --repeat 3 --drop-caches
    python benchmarks/bridge_convert.py --sizes 1.2 2.5 --repeat 3 --cast
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
GB = 10**9
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SHARD_BYTES = 1 * GB  # the synthetic input's shard size (HF's own default is 5 GB)


# -- synthetic checkpoint -------------------------------------------------------------------------


def llama_config(size_gb: float, dtype: torch.dtype, hidden: int, ffn: int, vocab: int):
    """A Llama config whose weights take about ``size_gb`` GB: the layer count is chosen."""
    from transformers import LlamaConfig

    heads, kv_heads = hidden // 128, max(1, hidden // 512)
    head_dim = hidden // heads
    per_layer = (2 * hidden * hidden + 2 * hidden * kv_heads * head_dim  # q, o; k, v
                 + 3 * hidden * ffn + 2 * hidden)  # gate, up, down; two norms
    fixed = 2 * vocab * hidden + hidden  # embedding, lm_head (untied), final norm
    nbytes = torch.finfo(dtype).bits // 8
    layers = max(1, round((size_gb * GB / nbytes - fixed) / per_layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       tie_word_embeddings=False, torch_dtype=dtype,
                       architectures=["LlamaForCausalLM"])


def llama_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of ``LlamaForCausalLM``, in the order HF saves them."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return shapes


def write_synthetic_hf(out: Path, cfg, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random weights under the exact HF names, in <= 1 GB shards + index; returns facts."""
    out.mkdir(parents=True)
    cfg.save_pretrained(out)  # config.json (+ generation_config.json)
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(cfg)
    shards, shard, shard_bytes = [], {}, 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * (torch.finfo(dtype).bits // 8)
        if shard and shard_bytes + nbytes > SHARD_BYTES:
            shards.append(shard)
            shard, shard_bytes = {}, 0
        if len(shape) == 1:
            shard[name] = torch.ones(shape, dtype=dtype)
        else:
            shard[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        shard_bytes += nbytes
    shards.append(shard)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    largest = max(torch.Size(s).numel() for s in shapes.values()) * (torch.finfo(dtype).bits // 8)
    return {"bytes": total, "tensors": len(shapes), "largest": largest,
            "layers": cfg.num_hidden_layers}


# -- measuring one subprocess ---------------------------------------------------------------------


def _tree_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes summed over ``pid`` and its descendants; 0s once it is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0, 0
    rss = anon = 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, anon


# A fork inherits its parent's RSS high-water mark, and this process holds torch; so the command
# is started by a small launcher (no torch), which reports the command's own ru_maxrss.
LAUNCHER = """import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
print(f"@@maxrss {usage.ru_maxrss * 1024}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``: wall seconds, the largest process's peak RSS (ru_maxrss), and the peaks of
    RSS and anonymous RSS summed over the process tree (polled every 50 ms)."""
    peak = [0, 0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cmd], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done = threading.Event()

    def poll():
        while not done.is_set():
            rss, anon = _tree_rss(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
            done.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    output = proc.stdout.read().decode(errors="replace")  # drain: the child never blocks
    proc.wait()
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{output}")
    maxrss = int(output.rsplit("@@maxrss ", 1)[1].split()[0])
    subprocess.run(["sync"], check=True)  # until the bytes are on disk (and out of the next run)
    synced = time.perf_counter() - start
    return {"wall": wall, "synced": synced, "rss": maxrss, "tree_rss": peak[0], "anon": peak[1]}


def _summary(runs: list[dict]) -> dict:
    """Median times (the lower one of an even count), the fastest wall time, max memory, every
    wall time."""
    median = lambda key: sorted(r[key] for r in runs)[(len(runs) - 1) // 2]  # noqa: E731
    result = {key: median(key) for key in ("wall", "synced")}
    result.update({key: max(r[key] for r in runs) for key in ("rss", "tree_rss", "anon")})
    result["walls"] = [r["wall"] for r in runs]
    result["fastest"] = min(result["walls"])
    return result


def measure_paired(cmd: list[str], out: Path, source: Path, copy: Path, env: dict,
                   repeat: int, drop_caches: bool = False) -> tuple[dict, dict]:
    """``cp -r source copy`` and ``cmd``, ``repeat`` times each, in alternating order (the last
    run is ``cmd``, whose ``out`` is kept): the baseline's and the command's summaries. Before
    each command both outputs are removed and synced, so each starts from the state the other
    started from (an earlier version kept cp's copy while the conversion ran, which charged the
    conversion for reclaiming its pages). With ``drop_caches``, each command starts with the
    page cache dropped and ``source`` read back into it (so the copy's work is measured, not
    the disk's reads or the reclaim of other files' pages)."""
    copy_cmd = ["cp", "-r", str(source), str(copy)]
    baseline, runs = [], []
    for i in range(repeat):
        cp_first = (repeat - 1 - i) % 2 == 0
        for command, results in ((copy_cmd, baseline), (cmd, runs))[::1 if cp_first else -1]:
            for path in (copy, out):
                if path.exists():
                    shutil.rmtree(path)
            subprocess.run(["sync"], check=True)
            if drop_caches:
                fresh_cache(source)
            results.append(measure(command, env))
    shutil.rmtree(copy, ignore_errors=True)
    return _summary(baseline), _summary(runs)


def fresh_cache(source: Path) -> None:
    """Drop the page cache (root only), then read every file under ``source`` into it."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as err:
        sys.exit(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({err.strerror}); "
                 "run as root, or without --drop-caches")
    for path in sorted(source.rglob("*")):
        if path.is_file():
            with open(path, "rb") as file:
                while file.read(64 * 2**20):
                    pass


# -- round-trip check -----------------------------------------------------------------------------


def hf_tensor_files(path: Path) -> dict[str, Path]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return {name: path / file for name, file in index["weight_map"].items()}


def compare_hf(original: Path, converted: Path) -> list[str]:
    """Every problem found: missing / extra names, dtype, shape or byte differences."""
    a, b = hf_tensor_files(original), hf_tensor_files(converted)
    problems = [f"{n}: missing" for n in a if n not in b]
    problems += [f"{n}: extra" for n in b if n not in a]
    handles: dict[Path, object] = {}

    def get(path, name):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)

    for name in a:
        if name not in b:
            continue
        x, y = get(a[name], name), get(b[name], name)
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
        elif not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            problems.append(f"{name}: bytes differ")
    return problems


# -- the benchmark --------------------------------------------------------------------------------


def run_size(size_gb: float, args, work: Path, env: dict) -> dict:
    dtype = DTYPES[args.dtype]
    d = work / f"{size_gb:g}gb"
    cfg = llama_config(size_gb, dtype, args.hidden, args.ffn, args.vocab)
    t0 = time.perf_counter()
    facts = write_synthetic_hf(d / "hf", cfg, dtype)
    subprocess.run(["sync"], check=True)
    print(f"\n== {facts['bytes'] / GB:.2f} GB ({facts['layers']} layers, {facts['tensors']} "
          f"tensors, largest {facts['largest'] / GB:.3f} GB, {args.dtype}); built in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    py = [sys.executable]
    to_mcore = py + ["checkpoint_convert/hf_to_mcore.py", "--hf-dir", str(d / "hf"),
                     "--tp", "1", "--pp", "1"]
    runs = {
        "hf -> legacy": to_mcore + ["--out", str(d / "legacy"), "--format", "legacy"],
        "hf -> torch_dist": to_mcore + ["--out", str(d / "td"), "--format", "torch_dist"],
        "legacy -> hf": py + ["checkpoint_convert/mcore_to_hf.py", "--mcore-dir",
                              str(d / "legacy"), "--out", str(d / "hf_legacy")],
        "torch_dist -> hf": py + ["checkpoint_convert/mcore_to_hf.py", "--mcore-dir",
                                  str(d / "td"), "--out", str(d / "hf_td")],
    }
    if args.cast:  # the other dtype (--dtype) and back: every byte cast, bf16 <-> fp32
        other = "fp32" if args.dtype == "bf16" else "bf16"
        runs.update({
            f"hf -> legacy {other}": to_mcore + ["--out", str(d / "legacy_cast"), "--format",
                                                 "legacy", "--dtype", other],
            f"hf -> torch_dist {other}": to_mcore + ["--out", str(d / "td_cast"), "--format",
                                                     "torch_dist", "--dtype", other],
            f"legacy {other} -> hf": py + ["checkpoint_convert/mcore_to_hf.py", "--mcore-dir",
                                           str(d / "legacy_cast"), "--out",
                                           str(d / "hf_legacy_cast")],
            f"torch_dist {other} -> hf": py + ["checkpoint_convert/mcore_to_hf.py",
                                               "--mcore-dir", str(d / "td_cast"), "--out",
                                               str(d / "hf_td_cast")],
        })
    results, baselines = {}, {}
    for label, cmd in runs.items():
        source = Path(cmd[cmd.index("--hf-dir" if "--hf-dir" in cmd else "--mcore-dir") + 1])
        out = Path(cmd[cmd.index("--out") + 1])
        baselines[label], results[label] = measure_paired(cmd, out, source, d / "copy", env,
                                                          args.repeat, args.drop_caches)
        for name, r in ((f"cp -r {source.name}", baselines[label]), (label, results[label])):
            walls = "/".join(f"{w:.1f}" for w in r["walls"])
            print(f"  {name:<22} {walls} s (+sync {r['synced']:.1f} s)  peak RSS "
                  f"{r['rss'] / GB:5.2f} GB, process tree {r['tree_rss'] / GB:5.2f} GB "
                  f"(anon {r['anon'] / GB:5.2f} GB)", flush=True)
    exact = {}
    for label, out in (("legacy", d / "hf_legacy"), ("torch_dist", d / "hf_td"),
                       ("legacy cast", d / "hf_legacy_cast"),
                       ("torch_dist cast", d / "hf_td_cast")):
        if not out.exists():
            continue
        problems = compare_hf(d / "hf", out)
        exact[label] = not problems
        print(f"  round trip via {label}: " + ("bit-exact" if not problems else
              f"{len(problems)} problems, e.g. {problems[:3]}"), flush=True)
    if not args.keep:
        shutil.rmtree(d)
    return {"facts": facts, "results": results, "baselines": baselines, "exact": exact}


def print_table(all_results: dict) -> None:
    print("\nwall time vs cp -r of the same input (target <= 2x; lower median of --repeat runs; "
          "+sync: until on disk; x best cp: against cp's fastest run); peak RSS of the largest "
          "process vs largest tensor x 3 + 1 GB (target)")
    print(f"{'size':>7} {'step':<22} {'cp s':>5} {'wall s':>7} {'x cp':>6} {'cp+sync':>8} "
          f"{'+sync s':>8} {'x cp':>6} {'x best cp':>9} {'RSS GB':>7} {'anon GB':>8} {'tree GB':>8} "
          f"{'target GB':>9} {'RSS/target':>10}")
    for size, res in all_results.items():
        target = 3 * res["facts"]["largest"] + GB
        for label, r in res["results"].items():
            cp = res["baselines"][label]
            print(f"{res['facts']['bytes'] / GB:6.2f}G {label:<22} {cp['wall']:5.1f} "
                  f"{r['wall']:7.1f} {r['wall'] / cp['wall']:6.2f} {cp['synced']:8.1f} "
                  f"{r['synced']:8.1f} {r['synced'] / cp['synced']:6.2f} "
                  f"{r['wall'] / cp['fastest']:9.2f} "
                  f"{r['rss'] / GB:7.2f} {r['anon'] / GB:8.2f} {r['tree_rss'] / GB:8.2f} "
                  f"{target / GB:9.2f} {r['rss'] / target:10.2f}")
        print(f"{'':7} round trip bit-exact: " +
              ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in res["exact"].items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1.2, 2.5],
                   help="approximate checkpoint sizes in GB (the layer count is chosen)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size")
    p.add_argument("--ffn", type=int, default=5632, help="MLP intermediate size")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    p.add_argument("--workdir", default=None, help="where to write (default: a new dir in /tmp)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each step (median time)")
    p.add_argument("--keep", action="store_true", help="keep the files written")
    p.add_argument("--cast", action="store_true",
                   help="also convert to the other dtype (--dtype bf16 <-> fp32) and back")
    p.add_argument("--drop-caches", action="store_true",
                   help="before each timed command: drop the page cache (root), then read its "
                        "input into it, so that cp and the conversion start alike")
    args = p.parse_args(argv)
    import megatron.core
    import safetensors
    import transformers

    print(f"{platform.node()}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; python {platform.python_version()}, torch {torch.__version__}, "
          f"megatron-core {megatron.core.__version__}, transformers {transformers.__version__}, "
          f"safetensors {safetensors.__version__}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bridge_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        all_results = {size: run_size(size, args, work, env) for size in args.sizes}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(all_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
