"""``mswift train|pt|sft`` and ``launch/pretrain_sft.py``: train from a YAML config + overrides."""
from __future__ import annotations

import argparse
import sys
import time

from mswift.config import ConfigError, load_config
from mswift.config.loader import describe_settings
from mswift.runtime.launch_env import LaunchEnvError, detect_launch_env, launcher_rank
from mswift.runtime.quiet import quiet_known_warnings
from mswift.train.preflight import check_before_start

USAGE = """\
%(prog)s [--config FILE.yaml] [key=value | --key-name value ...]

Run under torchrun (or srun / mpirun) for more than one rank, e.g.
  torchrun --nproc_per_node 2 launch/pretrain_sft.py --config examples/tiny_llama_tp2.yaml
Settings use Megatron-LM's names (tensor_model_parallel_size, lr, train_iters, ...);
'--list-settings' prints them all, with defaults and descriptions.
"""


def main(argv: list[str] | None = None, prog: str = "mswift train") -> int:
    parser = argparse.ArgumentParser(prog=prog, usage=USAGE)
    parser.add_argument("--config", help="YAML file of settings (flat or grouped by section)")
    parser.add_argument("--list-settings", action="store_true",
                        help="print every setting: section, default and description")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.list_settings:
        print(describe_settings())
        return 0
    # Settings, files, tokenizer and layout are checked before torch or megatron-core is
    # imported and before any process group exists: a mistake is reported in about a second.
    # Warning filters that need no torch first (in case a check imports megatron-core); the
    # CPU-only ones in _train, where torch is imported anyway.
    quiet_known_warnings(cuda=True)
    try:
        cfg = load_config(args.config, overrides)
        check_before_start(cfg, detect_launch_env().world_size)
    except (ConfigError, LaunchEnvError) as err:
        report_once(f"{prog}: {err}")
        return 2
    return _train(cfg, prog)


def _train(cfg, prog: str) -> int:
    if launcher_rank() == 0:
        print(f"{prog}: settings, files and layout checked; importing torch and megatron-core",
              flush=True)
    quiet_known_warnings()
    from mswift.models.errors import ModelError
    from mswift.train.checkpoint import CheckpointError  # imports megatron-core
    from mswift.train.loop import TrainingStopped, run_training
    from mswift.train.save_dir import SaveDirError

    # Every rank meets these problems alike (a checkpoint that does not fit, a non-finite
    # step): rank 0 reports them, as the up-front checks do.
    try:
        run_training(cfg)
    except (ConfigError, ModelError, LaunchEnvError, SaveDirError) as err:
        report_once(f"{prog}: {err}")
        return 2
    except CheckpointError as err:
        report_once(f"{prog}: cannot load the checkpoint: {err}")
        return 2
    except TrainingStopped as err:
        report_once(f"{prog}: {err}")
        return 1
    finally:
        from mswift.runtime import destroy_distributed

        destroy_distributed()
    return 0


def report_once(message: str, wait_s: float = 10.0) -> None:
    """Print a problem every rank found, once per job.

    Before any process group exists there is nothing to agree on who speaks with, so the
    launcher's rank decides: rank 0 prints at once. Other ranks wait ``wait_s`` first: when rank 0 found the same problem, its
    exit makes the launcher (torchrun) stop them before they print; when only they found it
    (a file on a node-local disk), they print it after the wait, naming their rank.
    """
    rank = launcher_rank()
    if rank:
        time.sleep(wait_s)
        message = f"(rank {rank}) {message}"
    print(message, file=sys.stderr, flush=True)
