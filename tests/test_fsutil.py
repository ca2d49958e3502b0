"""src/fsutil.py: replacing a small file whole (temp, fsync, replace, fsync the directory)."""

import os

from src import fsutil


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "state.json")
    fsutil.atomic_write(path, b"one")
    synced = []
    real = fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_dir", lambda d: (synced.append(d), real(d)))
    fsutil.atomic_write(path, b"two" * 100_000)
    with open(path, "rb") as f:
        assert f.read() == b"two" * 100_000
    assert os.listdir(tmp_path) == ["state.json"]
    assert synced == [str(tmp_path)]        # the rename is made durable too


def test_a_stale_temp_from_a_crash_is_overwritten(tmp_path):
    path = str(tmp_path / "state.json")
    with open(path + ".tmp", "wb") as f:
        f.write(b"half a file from before a crash, longer than the new one")
    fsutil.atomic_write(path, b"new")
    with open(path, "rb") as f:
        assert f.read() == b"new"
    assert not os.path.exists(path + ".tmp")
