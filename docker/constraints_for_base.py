"""Print mswift's tested pins (constraints.txt) minus every package the base image pins.

NGC PyTorch images pin what they ship (torch, triton, transformer-engine, apex, numpy, ...) in
/etc/pip/constraint.txt, which pip obeys through PIP_CONSTRAINT; one of mswift's pins for the
same package (torch 2.13.0+cpu, a CPU build) would make pip refuse or replace a CUDA build.
The base image's own versions win for those; mswift's tested pins apply to everything else.

    python docker/constraints_for_base.py constraints.txt /etc/pip/constraint.txt > OUT
"""
import re
import sys
from pathlib import Path

# the GPU stack always comes from the base image, pinned there or not
ALWAYS_FROM_BASE = {"torch", "triton", "transformer-engine", "apex"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def names(text: str) -> set[str]:
    found = set()
    for line in text.splitlines():
        match = _NAME.match(line.split("#", 1)[0])
        if match:
            found.add(re.sub(r"[-_.]+", "-", match.group(1)).lower())
    return found


def main(ours: str, base: str) -> None:
    skip = ALWAYS_FROM_BASE | (names(Path(base).read_text()) if Path(base).is_file() else set())
    for line in Path(ours).read_text().splitlines():
        found = names(line)
        if found and not found & skip:
            print(line)


if __name__ == "__main__":
    main(*sys.argv[1:3])
