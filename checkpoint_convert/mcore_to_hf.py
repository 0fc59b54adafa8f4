"""Command-line tool over mswift.bridge; run with --help for its options (see mswift/bridge/cli.py).

Runs as one process or under torchrun. Same as `mswift convert mcore-to-hf`.
"""
import sys

from mswift.bridge.cli import mcore_to_hf_main

if __name__ == "__main__":  # the torch_dist writer starts processes that re-import this file
    raise SystemExit(mcore_to_hf_main(sys.argv[1:], prog="mcore_to_hf"))
