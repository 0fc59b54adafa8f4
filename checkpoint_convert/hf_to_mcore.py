"""Command-line tool over mswift.bridge; run with --help for its options (see mswift/bridge/cli.py).

Runs as one process or under torchrun. Same as `mswift convert hf-to-mcore`.
"""
import sys

from mswift.bridge.cli import hf_to_mcore_main

if __name__ == "__main__":  # the torch_dist writer starts processes that re-import this file
    raise SystemExit(hf_to_mcore_main(sys.argv[1:], prog="hf_to_mcore"))
