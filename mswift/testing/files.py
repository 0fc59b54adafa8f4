"""What a folder holds, to check that a refused command changed nothing in it."""
from __future__ import annotations

import os
from pathlib import Path


def snapshot(root: str | Path) -> dict[str, tuple]:
    """Every path under ``root`` (``root`` itself as "."): its kind, mode, mtime in ns and,
    for a file, its bytes; a link's target. Equal snapshots: nothing was added, removed,
    written or touched."""
    root = Path(root)
    if not os.path.lexists(root):
        return {}
    paths = [root] + sorted(root.rglob("*")) if root.is_dir() else [root]
    state = {}
    for path in paths:
        st = path.lstat()
        name = "." if path == root else str(path.relative_to(root))
        if path.is_symlink():
            state[name] = ("link", os.readlink(path))
        elif path.is_dir():
            state[name] = ("dir", st.st_mode, st.st_mtime_ns)
        else:
            state[name] = ("file", st.st_mode, st.st_mtime_ns, path.read_bytes())
    return state
