"""``mswift train|pt|sft`` and ``launch/pretrain_sft.py``: train from a YAML config + overrides."""
from __future__ import annotations

import argparse
import sys

from mswift.config import ConfigError, all_keys, load_config

USAGE = """\
%(prog)s [--config FILE.yaml] [key=value | --key-name value ...]

Run under torchrun (or srun / mpirun) for more than one rank, e.g.
  torchrun --nproc_per_node 2 launch/pretrain_sft.py --config examples/tiny_llama_tp2.yaml
Settings use Megatron-LM's names (tensor_model_parallel_size, lr, train_iters, ...);
'--list-settings' prints them all.
"""


def main(argv: list[str] | None = None, prog: str = "mswift train") -> int:
    parser = argparse.ArgumentParser(prog=prog, usage=USAGE)
    parser.add_argument("--config", help="YAML file of settings (flat or grouped by section)")
    parser.add_argument("--list-settings", action="store_true", help="print every setting name")
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.list_settings:
        print("\n".join(all_keys()))
        return 0
    from mswift.bridge.errors import BridgeError
    from mswift.runtime.launch_env import LaunchEnvError
    from mswift.train.checkpoint import CheckpointError  # imports megatron-core: after --help
    from mswift.train.loop import TrainingStopped, run_training

    try:
        cfg = load_config(args.config, overrides)
        run_training(cfg)
    except (ConfigError, BridgeError, LaunchEnvError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"{prog}: cannot load the checkpoint: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    finally:
        from mswift.runtime import destroy_distributed

        destroy_distributed()
    return 0
