"""A stand-in for SLURM's ``scontrol`` for tests of launch/slurm/train.sbatch.

``show hostnames a,b,c`` prints one host a line (plain comma lists only, no ``gpu[1-4]``
ranges); ``requeue JOBID`` is appended to $FAKE_SLURM_LOG as one JSON line. Anything else fails.
"""
import json
import os
import sys


def main():
    args = sys.argv[1:]
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps({"cmd": "scontrol", "argv": args}) + "\n")
    if args[:2] == ["show", "hostnames"] and len(args) == 3:
        if "[" in args[2]:
            sys.exit(f"fake scontrol: node ranges are not supported: {args[2]!r}")
        print("\n".join(args[2].split(",")))
    elif args[:1] == ["requeue"] and len(args) == 2:
        pass
    else:
        sys.exit(f"fake scontrol: unsupported command {args!r}")


if __name__ == "__main__":
    main()
