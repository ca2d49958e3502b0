"""MemoryKV, the fake the web apps are tested against, keeps the store's semantics."""

import pytest

from src.kv import BadRequest, Exists, Mismatch, MemoryKV, NotFound, TooBig, tablet_of


def test_cells_and_rows():
    kv = MemoryKV(max_cell_bytes=10)
    kv.put("alice", "greeting", b"hello")
    assert kv.get(b"alice", b"greeting") == b"hello"
    with pytest.raises(Exists):
        kv.putnx("alice", "greeting", b"x")
    with pytest.raises(Mismatch):
        kv.cput("alice", "greeting", b"nope", b"x")
    kv.cput("alice", "greeting", b"hello", b"bye")
    with pytest.raises(NotFound):
        kv.cput("alice", "other", b"", b"x")
    kv.put("alice", "b", b"")
    assert kv.cols("alice") == [b"b", b"greeting"]
    kv.delete("alice", "b")
    kv.delete("alice", "greeting")
    assert kv.cols("alice") == []
    with pytest.raises(NotFound):
        kv.delrow("alice")
    with pytest.raises(TooBig):
        kv.put("a", "b", b"x" * 11)
    with pytest.raises(BadRequest):
        kv.put("", "b", b"")


def test_tablet_of_is_crc32():
    import zlib
    assert tablet_of(b"alice", 24) == zlib.crc32(b"alice") % 24
