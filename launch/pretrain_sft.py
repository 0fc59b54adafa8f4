"""torchrun entry point for pre-training and fine-tuning.

    torchrun --nproc_per_node 8 launch/pretrain_sft.py --config my.yaml key=value ...

Same as ``mswift train``; see ``--help`` for the options.
"""
from mswift.train.cli import main

if __name__ == "__main__":  # the torch_dist checkpoint writer spawns worker processes
    raise SystemExit(main(prog="launch/pretrain_sft.py"))
