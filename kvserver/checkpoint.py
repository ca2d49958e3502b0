"""Checkpoint files: an immutable, sorted table of one tablet's cells.

A checkpoint holds every cell of a tablet as of one log sequence number
(`last_seq`), sorted by (row, column) bytewise. It is written once, by
`CheckpointWriter`, to a temp file that is fsynced and renamed into place
(the caller fsyncs the directory), and read by `CheckpointReader` one block at
a time, so a single cell is read without loading the tablet.

File layout (all integers little-endian; docs/storage.md has the details):

    [value extent | data block]*   in the order they were written
    index block
    footer (64 bytes, fixed)

    data block  := entry* crc32:u32            crc32 of the entries
    entry       := flags:u8 row_len:u16 col_len:u16 value_len:u32
                   [value_off:u64 value_crc:u32]   if flags & BIG
                   row col [value]                 value inline unless BIG
    index block := count:u32 (off:u64 len:u32 row_len:u16 col_len:u16 row col)*
                   -- one entry per data block: where it is, its first key
    footer      := magic "PCCKPT01" version:u32 last_seq:u64 last_epoch:u64
                   index_off:u64 index_len:u32 index_crc:u32 cells:u64 rows:u64
                   crc32:u32 (of the 60 bytes before it)

Values of BIG_VALUE_BYTES or more live outside the blocks, in a value extent
written just before the block that names them, with their own CRC; blocks
stay small (BLOCK_BYTES) so listing a row's columns never reads a 64 MiB
value, and the block cache holds only blocks. The index is kept in memory
(its size counts against the memory budget); data blocks go through the
shared `BlockCache`, an LRU bounded in bytes.

A corrupt footer or index makes `CheckpointReader.open` raise
`CorruptCheckpoint`; a corrupt block or value raises it on the read that
touches it. Nothing corrupt is ever returned as data.
"""

from __future__ import annotations

import bisect
import itertools
import os
import struct
import threading
import zlib
from collections import OrderedDict
from typing import Callable, Iterator

MAGIC = b"PCCKPT01"
VERSION = 1
FOOTER = struct.Struct("<8sIQQQIIQQ")   # + crc32:u32 -> 64 bytes
FOOTER_BYTES = FOOTER.size + 4
ENTRY = struct.Struct("<BHHI")           # flags, row_len, col_len, value_len
BIGREF = struct.Struct("<QI")            # value_off, value_crc
INDEX_ENTRY = struct.Struct("<QIHH")     # block off, block len, first row len, first col len
U32 = struct.Struct("<I")
F_BIG = 1

BLOCK_BYTES = 16 * 1024                  # target size of a data block
BIG_VALUE_BYTES = 4 * 1024               # values this big or bigger live outside blocks
COPY_CHUNK = 1024 * 1024
ENTRY_OVERHEAD = 96                      # rough Python cost of one parsed entry, for the cache
INDEX_BLOCK_OVERHEAD = 120               # rough Python cost of one block in the loaded index:
                                         # (row, col) of its first key, (offset, length)

assert FOOTER_BYTES == 64


class CorruptCheckpoint(Exception):
    """A checkpoint file failed a check (magic, CRC, or structure)."""


class BigValue:
    """A reference to a value stored outside the blocks of checkpoint `reader`."""

    __slots__ = ("reader", "off", "length", "crc")

    def __init__(self, reader: "CheckpointReader", off: int, length: int, crc: int):
        self.reader, self.off, self.length, self.crc = reader, off, length, crc

    def read(self) -> bytes:
        return self.reader.read_value(self)

    def __len__(self) -> int:
        return self.length


class BigRef:
    """Where a big value is, as a parsed block keeps it (no reader: no cycles)."""

    __slots__ = ("off", "length", "crc")

    def __init__(self, off: int, length: int, crc: int):
        self.off, self.length, self.crc = off, length, crc


Value = bytes | BigValue


# -- the block cache ---------------------------------------------------------

class BlockCache:
    """An LRU of parsed data blocks, bounded by an estimate of their memory."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: tuple, value: object, cost: int) -> None:
        with self._lock:
            if key in self._items or cost > self.capacity:
                return
            self._items[key] = (value, cost)
            self.bytes += cost
            while self.bytes > self.capacity:
                _, (_, c) = self._items.popitem(last=False)
                self.bytes -= c

    def resize(self, capacity: int) -> None:
        with self._lock:
            self.capacity = max(0, capacity)
            while self.bytes > self.capacity and self._items:
                _, (_, c) = self._items.popitem(last=False)
                self.bytes -= c

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


# -- writing -----------------------------------------------------------------------

class CheckpointWriter:
    """Writes a checkpoint file. Cells must be added in (row, col) order.

    Usage: `w = CheckpointWriter(tmp_path, last_seq, epoch)`, `w.add(...)`
    for every cell, `w.finish()` (writes index + footer and fsyncs), then the
    caller renames tmp_path into place and fsyncs the directory. `abort()`
    removes the temp file.
    """

    def __init__(self, path: str, last_seq: int, last_epoch: int,
                 block_bytes: int = BLOCK_BYTES, big_value_bytes: int = BIG_VALUE_BYTES):
        self.path = path
        self.last_seq = last_seq
        self.last_epoch = last_epoch
        self.block_bytes = block_bytes
        self.big_value_bytes = big_value_bytes
        self._f = open(path, "wb")
        self._pos = 0
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_first: tuple[bytes, bytes] | None = None
        self._index: list[bytes] = []
        self._last_key: tuple[bytes, bytes] | None = None
        self._last_row: bytes | None = None
        self.cells = 0
        self.rows = 0

    def _write(self, data) -> int:
        off = self._pos
        self._f.write(data)
        self._pos += len(data)
        return off

    def add(self, row: bytes, col: bytes, value: Value) -> None:
        key = (row, col)
        if self._last_key is not None and key <= self._last_key:
            raise ValueError("cells must be added in increasing (row, col) order")
        self._last_key = key
        if row != self._last_row:
            self.rows += 1
            self._last_row = row
        self.cells += 1
        vlen = len(value)
        if vlen >= self.big_value_bytes:
            off, crc = self._write_value(value)
            entry = ENTRY.pack(F_BIG, len(row), len(col), vlen) + BIGREF.pack(off, crc) + row + col
        else:
            if isinstance(value, BigValue):
                value = value.read()
            entry = ENTRY.pack(0, len(row), len(col), vlen) + row + col + value
        if self._block_first is None:
            self._block_first = key
        self._block.append(entry)
        self._block_size += len(entry)
        if self._block_size >= self.block_bytes:
            self._flush_block()

    def _write_value(self, value: Value) -> tuple[int, int]:
        off = self._pos
        if isinstance(value, BigValue):
            crc = 0
            for chunk in value.reader.iter_value_chunks(value):
                crc = zlib.crc32(chunk, crc)
                self._write(chunk)
            if crc != value.crc:
                raise CorruptCheckpoint(f"{value.reader.path}: value at offset {value.off}: bad CRC")
        else:
            crc = zlib.crc32(value)
            self._write(value)
        return off, crc

    def _flush_block(self) -> None:
        if not self._block:
            return
        body = b"".join(self._block)
        data = body + U32.pack(zlib.crc32(body))
        off = self._write(data)
        row, col = self._block_first
        self._index.append(INDEX_ENTRY.pack(off, len(data), len(row), len(col)) + row + col)
        self._block = []
        self._block_size = 0
        self._block_first = None

    def finish(self) -> None:
        self._flush_block()
        index = U32.pack(len(self._index)) + b"".join(self._index)
        index_off = self._write(index)
        footer = FOOTER.pack(MAGIC, VERSION, self.last_seq, self.last_epoch, index_off, len(index),
                             zlib.crc32(index), self.cells, self.rows)
        self._write(footer + U32.pack(zlib.crc32(footer)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def write_checkpoint(path: str, cells: Iterator[tuple[bytes, bytes, Value]], last_seq: int,
                     last_epoch: int, should_stop: Callable[[], bool] = lambda: False, **kw) -> None:
    """Write `cells` (sorted) to a new checkpoint at `path` (fsynced, not renamed).

    `should_stop` is polled between cells; when it turns true the file is
    removed and `CheckpointAborted` raised.
    """
    w = CheckpointWriter(path, last_seq, last_epoch, **kw)
    try:
        for i, (row, col, value) in enumerate(cells):
            if i % 64 == 0 and should_stop():
                raise CheckpointAborted(path)
            w.add(row, col, value)
        w.finish()
    except BaseException:
        w.abort()
        raise


class CheckpointAborted(Exception):
    """The checkpoint was given up (KILL or shutdown) before it was complete."""


# -- reading --------------------------------------------------------------------------

class Block:
    """A parsed data block: sorted keys and their values (bytes, or a BigRef
    to a value outside the blocks: a cached block holds no file reader)."""

    __slots__ = ("keys", "values")

    def __init__(self, keys: list[tuple[bytes, bytes]], values: list[bytes | BigRef]):
        self.keys = keys
        self.values = values


_file_ids = itertools.count(1)


class CheckpointReader:
    """An open checkpoint file. Thread-safe (reads use pread).

    The file descriptor is closed when the reader is garbage-collected, so a
    reader that a concurrent GET still holds stays usable after a newer
    checkpoint replaced it.
    """

    def __init__(self, path: str, cache: BlockCache | None = None):
        self.path = path
        self.cache = cache
        self.file_id = next(_file_ids)
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._load()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _pread(self, n: int, off: int) -> bytes:
        data = os.pread(self._fd, n, off)
        while len(data) < n:            # pread may return less on some systems
            more = os.pread(self._fd, n - len(data), off + len(data))
            if not more:
                raise CorruptCheckpoint(f"{self.path}: unexpected end of file at {off + len(data)}")
            data += more
        return data

    def _load(self) -> None:
        size = os.fstat(self._fd).st_size
        self.file_bytes = size
        if size < FOOTER_BYTES:
            raise CorruptCheckpoint(f"{self.path}: too short ({size} bytes) for a checkpoint")
        raw = self._pread(FOOTER_BYTES, size - FOOTER_BYTES)
        (crc,) = U32.unpack_from(raw, FOOTER.size)
        if zlib.crc32(raw[:FOOTER.size]) != crc:
            raise CorruptCheckpoint(f"{self.path}: footer CRC mismatch")
        magic, version, self.last_seq, self.last_epoch, index_off, index_len, index_crc, self.cells, \
            self.rows = FOOTER.unpack_from(raw)
        if magic != MAGIC or version != VERSION:
            raise CorruptCheckpoint(f"{self.path}: not a version {VERSION} checkpoint")
        if index_off + index_len > size - FOOTER_BYTES or index_len < 4:
            raise CorruptCheckpoint(f"{self.path}: index out of bounds")
        index = self._pread(index_len, index_off)
        if zlib.crc32(index) != index_crc:
            raise CorruptCheckpoint(f"{self.path}: index CRC mismatch")
        self.first_keys: list[tuple[bytes, bytes]] = []
        self.blocks: list[tuple[int, int]] = []
        try:
            (count,) = U32.unpack_from(index, 0)
            p = 4
            for _ in range(count):
                off, length, rl, cl = INDEX_ENTRY.unpack_from(index, p)
                p += INDEX_ENTRY.size
                row, col = index[p:p + rl], index[p + rl:p + rl + cl]
                p += rl + cl
                if off + length > index_off or len(row) != rl or len(col) != cl:
                    raise CorruptCheckpoint(f"{self.path}: index entry out of bounds")
                self.first_keys.append((row, col))
                self.blocks.append((off, length))
        except struct.error:
            raise CorruptCheckpoint(f"{self.path}: index truncated") from None
        self.index_memory = len(index) + INDEX_BLOCK_OVERHEAD * len(self.blocks)

    def __del__(self):
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
            self._fd = -1

    # -- blocks --------------------------------------------------------------------

    def _parse_block(self, i: int, data: bytes) -> Block:
        off, _ = self.blocks[i]
        if len(data) < 4 or zlib.crc32(data[:-4]) != U32.unpack_from(data, len(data) - 4)[0]:
            raise CorruptCheckpoint(f"{self.path}: block at offset {off}: CRC mismatch")
        keys: list[tuple[bytes, bytes]] = []
        values: list[bytes | BigRef] = []
        p, end = 0, len(data) - 4
        try:
            while p < end:
                flags, rl, cl, vl = ENTRY.unpack_from(data, p)
                p += ENTRY.size
                if flags & F_BIG:
                    voff, vcrc = BIGREF.unpack_from(data, p)
                    p += BIGREF.size
                    keys.append((data[p:p + rl], data[p + rl:p + rl + cl]))
                    values.append(BigRef(voff, vl, vcrc))
                    p += rl + cl
                else:
                    keys.append((data[p:p + rl], data[p + rl:p + rl + cl]))
                    p += rl + cl
                    values.append(data[p:p + vl])
                    p += vl
        except struct.error:
            raise CorruptCheckpoint(f"{self.path}: block at offset {off}: truncated entry") from None
        if p != end:
            raise CorruptCheckpoint(f"{self.path}: block at offset {off}: bad entry lengths")
        return Block(keys, values)

    def block(self, i: int, cache: bool = True) -> Block:
        """Data block `i`, through the block cache when `cache`."""
        key = (self.file_id, i)
        if cache and self.cache is not None:
            b = self.cache.get(key)
            if b is not None:
                return b
        off, length = self.blocks[i]
        data = self._pread(length, off)
        b = self._parse_block(i, data)
        if cache and self.cache is not None:
            self.cache.put(key, b, len(data) + ENTRY_OVERHEAD * len(b.keys))
        return b

    def read_value(self, v: BigValue) -> bytes:
        data = self._pread(v.length, v.off)
        if zlib.crc32(data) != v.crc:
            raise CorruptCheckpoint(f"{self.path}: value at offset {v.off}: CRC mismatch")
        return data

    def iter_value_chunks(self, v: BigValue) -> Iterator[bytes]:
        pos, end = v.off, v.off + v.length
        while pos < end:
            n = min(COPY_CHUNK, end - pos)
            yield self._pread(n, pos)
            pos += n

    # -- lookups ---------------------------------------------------------------------

    def get(self, row: bytes, col: bytes) -> Value | None:
        """The cell's value (bytes, or a BigValue to `.read()`), or None."""
        key = (row, col)
        i = bisect.bisect_right(self.first_keys, key) - 1
        if i < 0:
            return None
        b = self.block(i)
        j = bisect.bisect_left(b.keys, key)
        if j < len(b.keys) and b.keys[j] == key:
            return self._value(b.values[j])
        return None

    def _value(self, v: bytes | BigRef) -> Value:
        return v if isinstance(v, bytes) else BigValue(self, v.off, v.length, v.crc)

    def iter_from(self, key: tuple[bytes, bytes], cache: bool = True
                  ) -> Iterator[tuple[bytes, bytes, Value]]:
        """Every cell with (row, col) >= key, in order."""
        i = max(0, bisect.bisect_right(self.first_keys, key) - 1)
        first = True
        for bi in range(i, len(self.blocks)):
            b = self.block(bi, cache)
            j = bisect.bisect_left(b.keys, key) if first else 0
            first = False
            for k in range(j, len(b.keys)):
                r, c = b.keys[k]
                yield r, c, self._value(b.values[k])

    def __iter__(self) -> Iterator[tuple[bytes, bytes, Value]]:
        """Every cell in order, read around the cache (for merging)."""
        return self.iter_from((b"", b""), cache=False)

    def row_cells(self, row: bytes) -> list[tuple[bytes, Value]]:
        """The (col, value) pairs of one row, sorted by column."""
        out = []
        for r, c, v in self.iter_from((row, b"")):
            if r != row:
                break
            out.append((c, v))
        return out

    def rows_after(self, after: bytes | None) -> Iterator[bytes]:
        """Row names greater than `after` (all rows if None), in order."""
        start = (b"", b"") if after is None else (after + b"\x00", b"")
        last = None
        for r, _, _ in self.iter_from(start):
            if r != last:
                last = r
                yield r
