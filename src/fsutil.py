"""Replacing a small file so that a crash leaves the old or the new one, whole.

STYLE rule 6 and LevelDB's recipe: write a temp file, fsync it, `os.replace`
it over the old name, then fsync the directory, without which the rename
itself may be lost at a power cut (the file's bytes are on disk, but its
directory entry still names the old inode). Used for the master's state file
and the LB's list of disabled frontends; the tablet logs and checkpoints use
`fsync_dir` on their own directories (kvserver/wal.py, kvserver/tablet.py).
"""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make a rename, creation or removal in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Durably replace `path` with `data` (returns once both are on disk).

    The temp file is `<path>.tmp`: one writer per file (a process owns its
    state file); a crash can leave a stale temp, which the next write truncates.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
