#!/usr/bin/env python3
"""Entry point for pre-training and fine-tuning, under torchrun, srun or mpirun.

    torchrun --nproc_per_node 8 launch/pretrain_sft.py --config my.yaml key=value ...
    mpirun -np 8 --bind-to none python launch/pretrain_sft.py --config my.yaml key=value ...

How each launcher is set up: launch/README.md.

Same as ``mswift train``; see ``--help`` for the options.
"""
from mswift.train.cli import main

if __name__ == "__main__":  # the torch_dist checkpoint writer spawns worker processes
    raise SystemExit(main(prog="launch/pretrain_sft.py"))
