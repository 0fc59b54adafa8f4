"""``mswift plot RUN_DIR``: loss / learning rate / throughput curves of a run, as one PNG."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mswift.train.metrics import METRICS_FILE, with_current_names

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: not found (metrics.jsonl is written under the run's save dir)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(with_current_names(json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no steps logged yet")
    return rows


def plot_run(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        points = [(r["step"], r[key]) for r in rows
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
        if key == "loss":
            evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
            if evals:
                ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="eval loss")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mswift plot", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="a run's save directory (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = plot_run(args.run_dir, args.out or args.run_dir / "curves.png")
    except ValueError as err:
        print(f"mswift plot: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
