"""Checkpoint files: sorted cells with an index, big values, corruption."""

import os
import random

import pytest

from kvserver.checkpoint import (
    FOOTER_BYTES, BigValue, BlockCache, CheckpointReader, CheckpointWriter, CorruptCheckpoint,
    write_checkpoint,
)


def make_cells(n_rows=300, cols=4, seed=1):
    rnd = random.Random(seed)
    cells = []
    for r in range(n_rows):
        row = b"row/%05d" % r
        for c in range(cols):
            size = rnd.choice([0, 1, 10, 100, 5000])
            cells.append((row, b"col%d" % c, rnd.randbytes(size)))
    return cells


def write(path, cells, seq=42, epoch=3, **kw):
    write_checkpoint(str(path), iter(cells), seq, epoch, block_bytes=2048, **kw)


def test_every_cell_read_back_with_a_small_cache(tmp_path):
    cells = make_cells()
    p = tmp_path / "ck"
    write(p, cells)
    cache = BlockCache(8 * 1024)
    r = CheckpointReader(str(p), cache)
    assert (r.last_seq, r.last_epoch, r.cells, r.rows) == (42, 3, len(cells), 300)
    assert len(r.blocks) > 20              # really split into blocks, read through the index
    for row, col, val in cells:
        v = r.get(row, col)
        got = v.read() if isinstance(v, BigValue) else v
        assert got == val, (row, col)
    assert cache.bytes <= cache.capacity
    assert r.get(b"row/00001", b"nope") is None
    assert r.get(b"aaa", b"x") is None and r.get(b"zzz", b"x") is None


def test_single_cell_lookup_reads_one_block(tmp_path):
    cells = make_cells()
    p = tmp_path / "ck"
    write(p, cells)
    cache = BlockCache(1 << 20)
    r = CheckpointReader(str(p), cache)
    v = r.get(b"row/00150", b"col2")
    assert cache.misses == 1 and cache.hits == 0    # one block, not the tablet
    assert (v.read() if isinstance(v, BigValue) else v) == cells[150 * 4 + 2][2]


def test_row_listing_and_row_pagination(tmp_path):
    cells = make_cells(50, 3)
    p = tmp_path / "ck"
    write(p, cells)
    r = CheckpointReader(str(p), BlockCache(1 << 20))
    assert [c for c, _ in r.row_cells(b"row/00007")] == [b"col0", b"col1", b"col2"]
    assert r.row_cells(b"row/000") == []
    assert list(r.rows_after(None))[:3] == [b"row/00000", b"row/00001", b"row/00002"]
    assert next(r.rows_after(b"row/00010")) == b"row/00011"
    assert list(r.rows_after(b"row/00049")) == []
    assert [(a, b) for a, b, _ in r] == [(a, b) for a, b, _ in cells]


def test_big_values_are_copied_between_checkpoints(tmp_path):
    big = os.urandom(3 * 1024 * 1024)
    p1, p2 = tmp_path / "a", tmp_path / "b"
    write(p1, [(b"r", b"big", big), (b"r", b"small", b"s")])
    r1 = CheckpointReader(str(p1))
    write(p2, iter(r1), seq=43)
    r2 = CheckpointReader(str(p2))
    assert r2.get(b"r", b"big").read() == big
    assert r2.get(b"r", b"small") == b"s"


def test_cells_must_be_sorted(tmp_path):
    w = CheckpointWriter(str(tmp_path / "x"), 1, 0)
    w.add(b"b", b"c", b"1")
    with pytest.raises(ValueError):
        w.add(b"a", b"c", b"1")
    w.abort()
    assert not (tmp_path / "x").exists()


def test_empty_checkpoint(tmp_path):
    p = tmp_path / "e"
    write(p, [])
    r = CheckpointReader(str(p))
    assert r.cells == 0 and r.get(b"a", b"b") is None and list(r.rows_after(None)) == []


@pytest.mark.parametrize("where", ["footer", "index", "truncated", "empty"])
def test_corrupt_footer_or_index_refused_at_open(tmp_path, where):
    p = tmp_path / "ck"
    write(p, make_cells(30))
    data = bytearray(p.read_bytes())
    if where == "footer":
        data[-10] ^= 1
    elif where == "index":
        data[-FOOTER_BYTES - 3] ^= 1
    elif where == "truncated":
        data = data[:-5]
    else:
        data = bytearray()
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        CheckpointReader(str(p))


def test_corrupt_block_or_value_detected_on_read(tmp_path):
    small = [(b"a", b"c%03d" % i, b"x" * 50) for i in range(100)]
    big = (b"b", b"big", os.urandom(10000))
    p = tmp_path / "ck"
    write(p, small + [big])
    data = bytearray(p.read_bytes())
    r = CheckpointReader(str(p))
    boff, _ = r.blocks[0]
    voff = r.get(b"b", b"big").off
    data[boff + 20] ^= 0xFF
    data[voff + 5] ^= 0xFF
    p.write_bytes(bytes(data))
    r = CheckpointReader(str(p), BlockCache(1 << 20))
    with pytest.raises(CorruptCheckpoint):
        r.get(b"a", b"c000")
    with pytest.raises(CorruptCheckpoint):
        r.get(b"b", b"big").read()


def test_cache_is_an_lru_bounded_in_bytes():
    c = BlockCache(100)
    c.put(("f", 1), "one", 40)
    c.put(("f", 2), "two", 40)
    assert c.get(("f", 1)) == "one"         # 1 is now the most recent
    c.put(("f", 3), "three", 40)            # evicts 2
    assert c.get(("f", 2)) is None and c.get(("f", 1)) == "one" and c.bytes == 80
    c.put(("f", 4), "huge", 1000)           # bigger than the cache: not kept
    assert c.get(("f", 4)) is None
