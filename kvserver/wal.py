"""The write-ahead log of one tablet: `TabletLog`, with group commit.

A tablet's log is a sequence of *segment* files `log-<first seq>.wal` (the
number is the seq of the first record the segment was created for, 20
digits so names sort). Each segment is a run of records:

    record  := crc32:u32 length:u32 payload[length]         (little-endian)
    payload := seq:u64 epoch:u64 kind:u8 row_len:u16 col_len:u16 value_len:u32
               row col value
    crc32   =  zlib.crc32(length bytes + payload)

`kind` is SET (1), DEL (2) or DELROW (3): a record holds an EFFECT, never a
conditional command. The server checks CPUT's old value, PUTNX's absence and
DELETE's existence before logging, so replay is deterministic and needs no
checks (docs/storage.md has the full grammar and an example in hex).

Durability and group commit. `enqueue(record)` puts the encoded record on the
log's pending list and returns a ticket (the byte offset its end will reach);
`wait_durable(ticket)` returns once the record is written and synced.
Logs belong to a `CommitGroup` (below; every tablet log of a server shares
one, a log alone has its own). The first waiter that finds no flush in
progress becomes the leader: it takes everything pending in every log of the
group, writes each log's batch with one `writev`, syncs once, and wakes
every waiter. Concurrent writers therefore share syncs. With
`group_commit=False` each log has a group of its own and a leader flushes
one record per sync (for the benchmark's comparison). A failed write or sync poisons the log: every later
call raises `LogError` (the caller turns that into an error reply; nothing
acknowledged is lost since nothing after the failure is acknowledged).

`read_segment` / `recover_segment` read a segment back: they stop at the first
record whose length or CRC is bad. A bad record at the very end is a torn
tail (a crash mid-write); a bad record followed by a good one is corruption
in the middle. `recover_segment` truncates the file at the last good record,
so new appends are valid, and reports how many bytes it dropped.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

log = logging.getLogger(__name__)

SET, DEL, DELROW = 1, 2, 3
KINDS = {SET: "SET", DEL: "DEL", DELROW: "DELROW"}

HEADER = struct.Struct("<II")            # crc32, length
BODY = struct.Struct("<QQBHHI")          # seq, epoch, kind, row_len, col_len, value_len
LENGTH = struct.Struct("<I")
IOV_MAX = 512                            # buffers per writev call (Linux allows 1024)


INTERRUPTED = OSError("the flush was interrupted")   # what a flush cut short by an exception reports


class LogError(Exception):
    """The log cannot take more writes: an I/O error, or it was closed (KILL)."""


@dataclass(frozen=True, slots=True)
class Effect:
    """What a write does to a tablet, decided before it is logged."""

    kind: int
    row: bytes
    col: bytes = b""
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One log record: an effect with its place in the tablet's history."""

    seq: int
    epoch: int
    effect: Effect


# -- the codec (pure) ----------------------------------------------------------

def encode_record(rec: LogRecord) -> list[bytes]:
    """The record's bytes as a list of buffers (the value is not copied)."""
    e = rec.effect
    body = BODY.pack(rec.seq, rec.epoch, e.kind, len(e.row), len(e.col), len(e.value)) + e.row + e.col
    length = len(body) + len(e.value)
    crc = zlib.crc32(e.value, zlib.crc32(body, zlib.crc32(LENGTH.pack(length))))
    return [HEADER.pack(crc, length), body, e.value] if e.value else [HEADER.pack(crc, length), body]


def decode_payload(payload: bytes) -> LogRecord | None:
    """The record in a payload whose CRC matched; None if its fields do not add up."""
    if len(payload) < BODY.size:
        return None
    seq, epoch, kind, rl, cl, vl = BODY.unpack_from(payload)
    if kind not in KINDS or BODY.size + rl + cl + vl != len(payload):
        return None
    p = BODY.size
    row = payload[p:p + rl]
    col = payload[p + rl:p + rl + cl]
    value = payload[p + rl + cl:]
    return LogRecord(seq, epoch, Effect(kind, row, col, value))


# -- reading segments back -------------------------------------------------------

@dataclass
class SegmentScan:
    """What reading one segment found."""

    records: list[LogRecord]
    good_bytes: int          # offset just past the last good record
    file_bytes: int
    corrupt_middle: bool     # a bad record was followed by a good one

    @property
    def dropped_bytes(self) -> int:
        return self.file_bytes - self.good_bytes


def _read_one(f, pos: int, size: int) -> tuple[LogRecord | None, int]:
    """The record at `pos` and the offset after it, or (None, pos) if it is bad."""
    if size - pos < HEADER.size:
        return None, pos
    f.seek(pos)
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None, pos
    crc, length = HEADER.unpack(head)
    if length > size - pos - HEADER.size:     # never allocate more than the file holds
        return None, pos
    payload = f.read(length)
    if len(payload) != length or zlib.crc32(payload, zlib.crc32(head[4:])) != crc:
        return None, pos
    rec = decode_payload(payload)
    if rec is None:
        return None, pos
    return rec, pos + HEADER.size + length


def iter_segment(path: str, limit: int | None = None) -> Iterator[tuple[LogRecord, int]]:
    """Yield (record, end offset) for each good record, stopping at the first bad one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None:
            size = min(size, limit)
        pos = 0
        while True:
            rec, nxt = _read_one(f, pos, size)
            if rec is None:
                return
            yield rec, nxt
            pos = nxt


def read_segment(path: str) -> SegmentScan:
    """Every good record of a segment, and where (and how) reading stopped."""
    records: list[LogRecord] = []
    good = 0
    for rec, end in iter_segment(path):
        records.append(rec)
        good = end
    size = os.path.getsize(path)
    corrupt = False
    if good < size:
        # Is the bad record followed by a good one? Then this is not a torn
        # tail but damage in the middle; only worth reporting differently.
        with open(path, "rb") as f:
            f.seek(good)
            head = f.read(HEADER.size)
            if len(head) == HEADER.size:
                _, length = HEADER.unpack(head)
                nxt = good + HEADER.size + length
                if nxt < size:
                    corrupt = _read_one(f, nxt, size)[0] is not None
    return SegmentScan(records, good, size, corrupt)


def recover_segment(path: str) -> SegmentScan:
    """Read a segment and cut off anything after its last good record."""
    scan = read_segment(path)
    if scan.dropped_bytes:
        if scan.corrupt_middle:
            log.error("%s: corrupt record at offset %d followed by good records; dropping %d bytes "
                      "after the last good record (seq %s)", path, scan.good_bytes, scan.dropped_bytes,
                      scan.records[-1].seq if scan.records else "-")
        else:
            log.warning("%s: torn tail: dropping %d bytes after offset %d",
                        path, scan.dropped_bytes, scan.good_bytes)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, scan.good_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
    return scan


# -- file helpers ------------------------------------------------------------------

def writev_all(fd: int, bufs: Sequence[bytes | memoryview]) -> None:
    """Write every buffer, in order, coping with short writes and IOV_MAX."""
    pending = [memoryview(b) for b in bufs if len(b)]
    while pending:
        batch = pending[:IOV_MAX]
        n = os.writev(fd, batch)
        consumed = 0
        for b in batch:
            if n >= len(b):
                n -= len(b)
                consumed += 1
            else:
                pending[consumed] = b[n:]
                break
        del pending[:consumed]


def segment_name(first_seq: int) -> str:
    return f"log-{first_seq:020d}.wal"


def segment_first_seq(name: str) -> int | None:
    if name.startswith("log-") and name.endswith(".wal") and name[4:-4].isdigit():
        return int(name[4:-4])
    return None


# -- the log -------------------------------------------------------------------------

class TabletLog:
    """One open segment, appended to with group commit.

    `size` is where appending starts (the file is truncated there first, in
    case a recovery left bytes behind). Thread-safe.
    """

    def __init__(self, path: str, size: int = 0, group_commit: bool = True,
                 group: "CommitGroup | None" = None):
        self.path = path
        self.group_commit = group_commit
        # The logs of a commit group share its lock and its flushes; a log
        # without one (or without group commit) has a group of its own.
        self.group = group if group is not None and group_commit else CommitGroup()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != size:
            os.ftruncate(self._fd, size)
        os.lseek(self._fd, size, os.SEEK_SET)
        self.dev = os.fstat(self._fd).st_dev      # the file system: one syncfs covers a device
        self._cond = self.group.cond
        self._pending: deque[tuple[list[bytes], int]] = deque()
        self._queued = size          # offset after the last enqueued record
        self._durable = size         # offset up to which the file is synced
        self._flushing = False
        self._closed = False
        self._error: OSError | None = None
        self.records = 0             # records enqueued since open
        self.syncs = 0

    @property
    def failed(self) -> bool:
        """A write or sync failed: what was in flight may or may not be on disk."""
        return self._error is not None

    @property
    def durable_bytes(self) -> int:
        return self._durable

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def enqueue(self, rec: LogRecord) -> int:
        """Put `rec` after every record enqueued before it; return its ticket."""
        bufs = encode_record(rec)
        with self._cond:
            if self._closed or self._error:
                raise LogError(self._why())
            self._queued += sum(len(b) for b in bufs)
            self._pending.append((bufs, self._queued))
            self.records += 1
            self.group.dirty[self] = None
            return self._queued

    def wait_durable(self, ticket: int) -> None:
        """Return once the record with this ticket is on disk; LogError if it never will be."""
        with self._cond:
            while self._durable < ticket:
                if self._error:
                    raise LogError(self._why())
                if self.group.flushing:
                    # One leader at a time: the next batch, of every log of the
                    # group, forms meanwhile. Even after close(abandon=True) the
                    # batch being written may hold this record, and then it is
                    # durable, not dropped.
                    self._cond.wait()
                    continue
                if self._closed:
                    raise LogError(self._why())
                self.group.flush_locked()

    def append(self, rec: LogRecord) -> None:
        """enqueue + wait_durable."""
        self.wait_durable(self.enqueue(rec))

    def _take_batch(self) -> tuple[list[bytes], int]:
        """Under the lock: take what the next flush writes (everything
        pending, or one record without group commit); (buffers, ticket)."""
        if self.group_commit:
            batch = list(self._pending)
            self._pending.clear()
        else:
            batch = [self._pending.popleft()]
        self._flushing = True
        return [b for bufs, _ in batch for b in bufs], batch[-1][1]

    def _finish_batch(self, target: int, err: BaseException | None) -> None:
        """Under the lock again: the batch up to `target` is durable, or failed."""
        self._flushing = False
        if err is not None:
            if not self._closed:
                log.error("%s: write failed, the log takes no more writes: %s", self.path, err)
            self._error = err
        else:
            self._durable = target
            self.syncs += 1

    def _why(self) -> str:
        if self._closed:
            return "log closed"
        return f"log write failed: {self._error}"

    def flush(self) -> None:
        """Make everything enqueued so far durable."""
        self.wait_durable(self._queued)

    def close(self, abandon: bool = False) -> None:
        """Close the file. With `abandon` (KILL), records not yet written are
        dropped, as a crash would drop them, and their writers get LogError."""
        with self._cond:
            if self._closed:
                return
            if abandon:
                self._pending.clear()
            while self._pending and not self._error:
                if self.group.flushing:
                    self._cond.wait()
                else:
                    self.group.flush_locked()
            self._closed = True
            self.group.dirty.pop(self, None)
            while self._flushing:       # never close an fd another thread writes to
                self._cond.wait()
            os.close(self._fd)
            self._cond.notify_all()


# -- group commit across logs ------------------------------------------------------

def _load_syncfs():
    """Linux's syncfs(2) (not in `os`): flush every dirty file of one file
    system with one call. None where the C library lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if fn(fd) != 0:        # ctypes releases the GIL for the call
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return syncfs


SYNCFS = _load_syncfs()


def sync_logs(logs: Sequence["TabletLog"]) -> None:
    """Make the written bytes of every log durable: one fdatasync for one
    log; for several, one syncfs per file system (where there is syncfs),
    else an fdatasync each. A file system (or kernel) that does not support
    syncfs makes the server use fdatasync from then on; any other error is
    a failed sync."""
    global SYNCFS
    if len(logs) > 1 and SYNCFS is not None:
        try:
            for fd in {lg.dev: lg._fd for lg in logs}.values():
                SYNCFS(fd)
            return
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            log.warning("syncfs is not supported here (%s): syncing each tablet log with fdatasync", e)
            SYNCFS = None
    for lg in logs:
        os.fdatasync(lg._fd)


class CommitGroup:
    """Group commit across every log of one server (all its tablets).

    The logs of a group share the group's lock. A writer that finds no flush
    running becomes the leader: it takes the pending records of EVERY log
    that has some, writes each log's batch with one `writev`, and makes them
    all durable with one sync (`sync_logs`: syncfs on Linux), then wakes
    everyone. Writes to 24 tablets thus share one sync instead of paying one
    each: on this machine an fdatasync costs about 55 us of kernel CPU, and
    one syncfs covering 24 dirty logs about 150 us (docs/storage.md).
    """

    def __init__(self):
        self.cond = threading.Condition()
        self.dirty: dict[TabletLog, None] = {}     # logs with pending records (an ordered set)
        self.flushing = False
        self.flushes = 0
        self.logs_flushed = 0                      # sum over flushes of the logs each covered

    def flush_locked(self) -> None:
        """Lead one flush of every dirty log. The caller holds `cond`."""
        logs = [lg for lg in self.dirty if lg._pending and not lg._closed and not lg._error]
        self.dirty.clear()
        if not logs:
            return
        batches = [(lg, *lg._take_batch()) for lg in logs]
        for lg in logs:
            if lg._pending:             # without group commit a flush takes one record
                self.dirty[lg] = None
        self.flushing = True
        self.cond.release()
        errors: dict[TabletLog, BaseException | None] = {lg: INTERRUPTED for lg in logs}
        try:
            written = []
            for lg, bufs, _ in batches:
                try:
                    writev_all(lg._fd, bufs)
                    written.append(lg)
                except OSError as e:
                    errors[lg] = e
            if written:
                try:
                    sync_logs(written)
                    outcome = None
                except OSError as e:
                    outcome = e
                for lg in written:
                    errors[lg] = outcome
        finally:
            self.cond.acquire()
            self.flushing = False
            for lg, _, target in batches:
                lg._finish_batch(target, errors[lg])
            self.flushes += 1
            self.logs_flushed += len(batches)
            self.cond.notify_all()
