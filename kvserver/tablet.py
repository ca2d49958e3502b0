"""One tablet on disk and in memory: memtables + checkpoint + log segments.

Files, in the tablet's directory (`<data>/tablet-007/`):

    checkpoint              the newest checkpoint (checkpoint.py), covers seq <= S
    checkpoint.tmp          a checkpoint being written (removed on recovery)
    install.tmp/            a snapshot being installed (removed on recovery)
    install/                a committed snapshot install (finished on recovery)
    log-<first seq>.wal     log segments (wal.py); the newest is appended to

Layers, newest first: the *active* memtable (takes new writes), at most one
*frozen* memtable (being merged into a new checkpoint), the checkpoint. A
lookup asks each layer in turn; a memtable row carries a `deleted` flag
(DELROW: hide every older layer's cells of that row) and per-column values or
tombstones (None: DEL). The three are held in one tuple, `self._view`, that is
replaced atomically, so a reader sees a consistent stack without locks.

The write path, and the seam for replication (kvserver/cluster.py):

    p = tablet.submit(effect)     # assigns seq (+ epoch) and enqueues the record
                                  # in the local log, atomically, in seq order
    tablet.wait_durable(p)        # group commit: returns once it is fsynced
    tablet.apply(p)               # into the memtable that was active at submit
    tablet.write(effect)          # the three above: the standalone path
                                  # (a secondary submits the primary's records the
                                  # same way, once its state machine, replication.py,
                                  # has checked they follow the last one it holds)
    tablet.records_after(seq)     # catch-up: log records after seq, or None when
                                  # the log no longer reaches back that far
    tablet.snapshot() / tablet.install_snapshot(chunks, records)
                                  # full catch-up: the checkpoint file's bytes +
                                  # the records after it

`submit` holds the tablet's sequencing lock only to number and enqueue, so
records are in the log in seq order and writes of different rows share an
fsync. The caller (the server's event loop) holds the cell from reading the
old value to `apply` (no other write to it is in flight meanwhile), so a
reader never sees a write that is not durable.

A checkpoint (`checkpoint()`, run by the store's background thread) freezes
the active memtable and starts a new log segment under the sequencing lock
(writers go on into the fresh memtable and segment), waits until every record
submitted to the frozen memtable has been applied or failed, merges old
checkpoint + frozen memtable into `checkpoint.tmp`, fsyncs, renames, fsyncs
the directory, swaps the view, and deletes log segments the new checkpoint
covers except the newest of them (kept so a lagging replica can catch up
incrementally). A crash at any point leaves a checkpoint and segments whose
records above its `last_seq` are exactly what it lacks: recovery replays only
those, so nothing is lost and nothing applied twice.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from src.fsutil import fsync_dir

from kvserver.checkpoint import BigValue, BlockCache, CheckpointReader, Value, write_checkpoint
from kvserver.wal import (
    DELROW, SET, CommitGroup, Effect, LogError, LogRecord, TabletLog, iter_segment,
    recover_segment, segment_first_seq, segment_name,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
CHECKPOINT_TMP = "checkpoint.tmp"
INSTALL_TMP = "install.tmp"     # a snapshot being installed, not yet committed
INSTALL = "install"             # a committed snapshot not yet moved into place
ROW_OVERHEAD = 200      # rough Python cost of a memtable row (dict entry, MemRow, dict)
CELL_OVERHEAD = 120     # rough Python cost of one cell (dict slot, two bytes objects)


class TabletError(Exception):
    """The tablet cannot serve: its log failed or it was closed (KILL)."""


class WriteOutcomeUnknown(TabletError):
    """The log failed (an I/O error) while this write was on its way to disk:
    it may or may not be there. The server must not answer RETRY ("not
    applied"); it closes the connection, which a client reads as unknown."""


class SeqGap(TabletError):
    """A replicated record does not follow the tablet's last seq."""


class MemRow:
    """One row in a memtable: `deleted` hides older layers; None = tombstone."""

    __slots__ = ("deleted", "cells")

    def __init__(self, deleted: bool, cells: dict[bytes, bytes | None]):
        self.deleted = deleted
        self.cells = cells


class Memtable:
    """Recent writes of one tablet, in memory. Rows are mutated only by
    `Tablet.apply` (under the tablet's `_inflight_cond`); readers copy what
    they need (a dict copy is atomic under the GIL)."""

    def __init__(self):
        self.rows: dict[bytes, MemRow] = {}
        self.bytes = 0
        self.inflight = 0        # records submitted here, not yet applied or failed
        self.records = 0
        self.sealed_seq = 0      # when frozen: the last seq submitted to it
        self.sealed_epoch = 0

    def apply(self, e: Effect) -> None:
        self.records += 1
        r = self.rows.get(e.row)
        if e.kind == DELROW:
            if r is not None:
                self.bytes -= sum(len(c) + len(v or b"") + CELL_OVERHEAD for c, v in r.cells.items())
            else:
                self.bytes += len(e.row) + ROW_OVERHEAD
            self.rows[e.row] = MemRow(True, {})
            return
        if r is None:
            r = self.rows[e.row] = MemRow(False, {})
            self.bytes += len(e.row) + ROW_OVERHEAD
        if e.col in r.cells:
            self.bytes -= len(r.cells[e.col] or b"")
        else:
            self.bytes += len(e.col) + CELL_OVERHEAD
        if e.kind == SET:
            r.cells[e.col] = e.value
            self.bytes += len(e.value)
        else:
            r.cells[e.col] = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Pending:
    """A submitted record on its way to durability and the memtable."""

    record: LogRecord
    log: TabletLog
    ticket: int
    mem: Memtable
    done: bool = False


@dataclass
class Snapshot:
    """A tablet's state for a full catch-up: checkpoint bytes + the records after it."""

    checkpoint: CheckpointReader | None
    last_seq: int
    records: list[LogRecord]

    def checkpoint_chunks(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The checkpoint file's bytes (the file as opened, even if since replaced)."""
        if self.checkpoint is None:
            return
        pos, size = 0, self.checkpoint.file_bytes
        while pos < size:
            data = os.pread(self.checkpoint._fd, min(chunk, size - pos), pos)
            if not data:
                break
            yield data
            pos += len(data)


def _read_value(v: Value | None) -> bytes | None:
    return v.read() if isinstance(v, BigValue) else v


class Tablet:
    """One tablet of a server. `open()` recovers it from its directory."""

    def __init__(self, tablet_id: int, path: str, cache: BlockCache | None = None,
                 group_commit: bool = True, commit_group: CommitGroup | None = None):
        self.id = tablet_id
        self.path = path
        self.cache = cache
        self.group_commit = group_commit
        self.commit_group = commit_group     # shared with the server's other tablets (wal.py)
        self.epoch = 0                   # set by the replication layer; 0 standalone
        self.last_seq = 0
        self.checkpoint_seq = 0
        self.last_checkpoint_time = time.monotonic()
        self.log: TabletLog | None = None
        self._seq_lock = threading.Lock()
        self._ckpt_lock = threading.Lock()      # one checkpoint at a time
        self._inflight_cond = threading.Condition()
        self._view: tuple[Memtable, Memtable | None, CheckpointReader | None] = (Memtable(), None, None)
        self._closed = False
        self.failed: str | None = None
        self.replayed = 0                # log records applied by the last open()

    # -- recovery ----------------------------------------------------------------

    def open(self) -> "Tablet":
        """Recover from disk: checkpoint, then the log records above it (docs/storage.md)."""
        if not os.path.isdir(self.path):
            os.makedirs(self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))   # the new directory's entry
        tmp = os.path.join(self.path, CHECKPOINT_TMP)
        if os.path.exists(tmp):
            log.info("tablet %d: removing unfinished %s", self.id, CHECKPOINT_TMP)
            os.unlink(tmp)
        if os.path.exists(os.path.join(self.path, INSTALL_TMP)):
            log.info("tablet %d: removing an uncommitted snapshot (%s)", self.id, INSTALL_TMP)
            shutil.rmtree(os.path.join(self.path, INSTALL_TMP))
        if os.path.exists(os.path.join(self.path, INSTALL)):
            log.info("tablet %d: finishing a committed snapshot install (%s)", self.id, INSTALL)
            self._finish_install()
        ckpt = None
        if os.path.exists(os.path.join(self.path, CHECKPOINT)):
            ckpt = CheckpointReader(os.path.join(self.path, CHECKPOINT), self.cache)
            self.checkpoint_seq = ckpt.last_seq
            self.epoch = ckpt.last_epoch
        last = self.checkpoint_seq
        mem = Memtable()
        segs = self._segments()
        replayed = 0
        for i, (first, name) in enumerate(segs):
            scan = recover_segment(os.path.join(self.path, name))
            if scan.dropped_bytes and i < len(segs) - 1:
                log.error("tablet %d: %s is not the newest segment but lost %d bytes",
                          self.id, name, scan.dropped_bytes)
            for rec in scan.records:
                if rec.seq <= last:
                    continue
                if rec.seq != last + 1:
                    log.error("tablet %d: log records %d..%d are missing", self.id, last + 1, rec.seq - 1)
                mem.apply(rec.effect)
                last = rec.seq
                self.epoch = max(self.epoch, rec.epoch)
                replayed += 1
        self.last_seq = last
        self.replayed = replayed
        if segs:
            name = segs[-1][1]
            p = os.path.join(self.path, name)
            self.log = self._open_log(p, os.path.getsize(p))
        else:
            self.log = self._new_segment(last + 1)
        self._view = (mem, None, ckpt)
        self._drop_covered_segments()
        if replayed or ckpt:
            log.info("tablet %d: recovered checkpoint seq %d + %d log records -> seq %d",
                     self.id, self.checkpoint_seq, replayed, last)
        return self

    def _segments(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir(self.path):
            first = segment_first_seq(name)
            if first is not None:
                out.append((first, name))
        out.sort()
        return out

    def _open_log(self, path: str, size: int = 0) -> TabletLog:
        """A log segment of this tablet, in the server's commit group."""
        return TabletLog(path, size, self.group_commit, self.commit_group)

    def _new_segment(self, first_seq: int) -> TabletLog:
        lg = self._open_log(os.path.join(self.path, segment_name(first_seq)))
        fsync_dir(self.path)
        return lg

    def _drop_covered_segments(self) -> None:
        """Delete segments wholly covered by the checkpoint, keeping the newest such."""
        segs = self._segments()
        covered = [i for i in range(len(segs) - 1) if segs[i + 1][0] <= self.checkpoint_seq + 1]
        for i in covered[:-1]:
            os.unlink(os.path.join(self.path, segs[i][1]))
        if len(covered) > 1:
            fsync_dir(self.path)

    # -- reads -----------------------------------------------------------------------

    def _lookup(self, row: bytes, col: bytes):
        """Where the cell's latest version is: (True, value or None) when a
        memtable decides it (None: deleted); else (False, the checkpoint's
        entry or None)."""
        active, frozen, ckpt = self._view
        for mem in (active, frozen):
            if mem is None:
                continue
            r = mem.rows.get(row)
            if r is not None:
                cells = r.cells
                if col in cells:
                    return True, cells.get(col)
                if r.deleted:
                    return True, None
        return False, None if ckpt is None else ckpt.get(row, col)

    def get(self, row: bytes, col: bytes) -> bytes | None:
        in_memory, v = self._lookup(row, col)
        return v if in_memory or v is None else _read_value(v)

    def exists(self, row: bytes, col: bytes) -> bool:
        """Like get() != None, without reading a big value from disk."""
        return self._lookup(row, col)[1] is not None

    def cols(self, row: bytes) -> list[bytes]:
        """The row's column names, sorted bytewise."""
        active, frozen, ckpt = self._view
        layers = [m.rows.get(row) for m in (frozen, active) if m is not None]
        present: set[bytes] = set()
        if ckpt is not None and not any(r is not None and r.deleted for r in layers):
            present.update(c for c, _ in ckpt.row_cells(row))
        for r in layers:
            if r is None:
                continue
            if r.deleted:
                present.clear()
            for c, v in r.cells.copy().items():
                if v is None:
                    present.discard(c)
                else:
                    present.add(c)
        return sorted(present)

    def rows(self, after: bytes | None, limit: int) -> list[bytes]:
        """Up to `limit` row names greater than `after` (None: from the start), sorted."""
        active, frozen, ckpt = self._view
        mem_rows = set()
        for m in (active, frozen):
            if m is not None:
                mem_rows.update(r for r in list(m.rows) if after is None or r > after)
        mem_sorted = sorted(mem_rows)
        out: list[bytes] = []
        ck = ckpt.rows_after(after) if ckpt is not None else iter(())
        i = 0
        nxt = next(ck, None)
        while len(out) < limit and (nxt is not None or i < len(mem_sorted)):
            if nxt is not None and (i >= len(mem_sorted) or nxt <= mem_sorted[i]):
                cand = nxt
                if i < len(mem_sorted) and mem_sorted[i] == nxt:
                    i += 1
                nxt = next(ck, None)
            else:
                cand = mem_sorted[i]
                i += 1
            if self.cols(cand):
                out.append(cand)
        return out

    def stats(self) -> dict:
        active, frozen, ckpt = self._view
        mem_rows = len(active) + (len(frozen) if frozen is not None else 0)
        cells = sum(len(r.cells) for m in (active, frozen) if m is not None for r in list(m.rows.values()))
        disk = 0
        try:
            for name in os.listdir(self.path):
                try:
                    disk += os.path.getsize(os.path.join(self.path, name))
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass
        return {
            # rows/cells: checkpoint counts plus the memtables' (an estimate
            # until the next checkpoint merges them)
            "rows": (ckpt.rows if ckpt else 0) + mem_rows,
            "cells": (ckpt.cells if ckpt else 0) + cells,
            "disk_bytes": disk,
            "log_records": self.last_seq - self.checkpoint_seq,
            "mem_bytes": self.memtable_bytes,
        }

    @property
    def memtable_bytes(self) -> int:
        active, frozen, _ = self._view
        return active.bytes + (frozen.bytes if frozen is not None else 0)

    @property
    def active_bytes(self) -> int:
        return self._view[0].bytes

    @property
    def checkpoint_bytes(self) -> int:
        """The size of the checkpoint file (0 without one)."""
        ckpt = self._view[2]
        return ckpt.file_bytes if ckpt is not None else 0

    @property
    def log_bytes(self) -> int:
        lg = self.log
        return lg.queued_bytes if lg is not None else 0

    @property
    def index_memory(self) -> int:
        ckpt = self._view[2]
        return ckpt.index_memory if ckpt is not None else 0

    # -- writes ------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise TabletError("tablet closed")
        if self.failed:
            raise TabletError(self.failed)

    def submit(self, effect: Effect) -> Pending:
        """Number `effect` and enqueue it in the log, in seq order."""
        with self._seq_lock:
            self._check()
            rec = LogRecord(self.last_seq + 1, self.epoch, effect)
            return self._enqueue_locked(rec)

    def _enqueue_locked(self, rec: LogRecord) -> Pending:
        lg = self.log
        try:
            ticket = lg.enqueue(rec)
        except LogError as e:
            self._fail(str(e))
            raise TabletError(str(e)) from None
        self.last_seq = rec.seq
        mem = self._view[0]
        with self._inflight_cond:
            mem.inflight += 1
        return Pending(rec, lg, ticket, mem)

    def wait_durable(self, p: Pending) -> None:
        """Return once `p` is fsynced in the local log; TabletError (and the
        record is given up) if it never will be."""
        try:
            p.log.wait_durable(p.ticket)
        except LogError as e:
            self._fail(str(e))
            self.abandon(p)
            if p.log.failed:
                raise WriteOutcomeUnknown(str(e)) from None
            raise TabletError(str(e)) from None     # closed (KILL): never written

    def apply(self, p: Pending) -> None:
        """Make a durable record visible to readers."""
        if p.done:
            return
        p.done = True
        with self._inflight_cond:      # also keeps the memtable's byte count exact
            p.mem.apply(p.record.effect)
            p.mem.inflight -= 1
            if p.mem.inflight == 0 and p.mem is not self._view[0]:
                self._inflight_cond.notify_all()      # a checkpoint waits for this frozen one

    def abandon(self, p: Pending) -> None:
        """Give up a submitted record without applying it (it may still be on disk)."""
        self._done(p)

    def _done(self, p: Pending) -> None:
        if p.done:
            return
        p.done = True
        with self._inflight_cond:
            p.mem.inflight -= 1
            if p.mem.inflight == 0 and p.mem is not self._view[0]:
                self._inflight_cond.notify_all()

    def _fail(self, why: str) -> None:
        if not self._closed and not self.failed:
            log.error("tablet %d: stops taking writes: %s", self.id, why)
            self.failed = why

    def write(self, effect: Effect) -> LogRecord:
        """The standalone write: submit, wait until durable, apply."""
        p = self.submit(effect)
        self.wait_durable(p)
        self.apply(p)
        return p.record

    def records_after(self, seq: int) -> list[LogRecord] | None:
        """Every durable log record with a seq above `seq`, in order; None if
        the log no longer holds all of them (use snapshot())."""
        if seq >= self.last_seq:
            return []
        for _ in range(3):     # a checkpoint may delete an old segment while we read
            try:
                return self._records_after(seq)
            except FileNotFoundError:
                continue
        return None

    def _records_after(self, seq: int) -> list[LogRecord] | None:
        segs = self._segments()
        start = None
        for i, (first, _) in enumerate(segs):
            if first <= seq + 1:
                start = i
        if start is None:
            return None
        current = self.log
        out: list[LogRecord] = []
        for first, name in segs[start:]:
            p = os.path.join(self.path, name)
            limit = current.durable_bytes if current is not None and current.path == p else None
            for rec, _ in iter_segment(p, limit):
                if rec.seq > seq:
                    out.append(rec)
        if out and out[0].seq != seq + 1:
            return None
        return out

    def snapshot(self) -> Snapshot:
        """The checkpoint (open, immutable) and the durable records after it."""
        ckpt = self._view[2]
        base = ckpt.last_seq if ckpt is not None else 0
        recs = self.records_after(base)
        if recs is None:   # cannot happen: segments are kept until a checkpoint covers them
            raise TabletError(f"tablet {self.id}: log does not reach back to the checkpoint")
        return Snapshot(ckpt, base, recs)

    def install_snapshot(self, chunks: Iterable[bytes], records: Iterable[LogRecord]) -> None:
        """Replace this tablet's state with a primary's snapshot (not while serving).

        Atomic on disk. The new state, the checkpoint's bytes (an empty
        checkpoint when the primary has none) and one log segment holding
        `records`, is built and fsynced in `install.tmp/`; renaming that to
        `install/` commits it; only then are the old files replaced
        (`_finish_install`, which `open()` redoes after a crash). So at every
        instant the disk holds the whole old state or the whole new one. A
        member of the view may be sent a snapshot (its log diverged: an
        unacknowledged tail of a dead primary); its old state holds every
        acknowledged write, and it may be elected alone after a crash, so a
        part of either state (old log segments gone, new trailing records not
        yet written) would lose acknowledged writes."""
        with self._ckpt_lock, self._seq_lock:
            staging = os.path.join(self.path, INSTALL_TMP)
            if os.path.exists(staging):
                shutil.rmtree(staging)
            os.mkdir(staging)
            staged = os.path.join(staging, CHECKPOINT)
            with open(staged, "wb") as f:
                wrote = 0
                for c in chunks:
                    f.write(c)
                    wrote += len(c)
                f.flush()
                os.fsync(f.fileno())
            if not wrote:
                write_checkpoint(staged, iter(()), 0, 0)
            ckpt = CheckpointReader(staged, self.cache)   # validates before anything is replaced
            base = ckpt.last_seq
            recs = [r for r in records if r.seq > base]
            for i, rec in enumerate(recs):
                if rec.seq != base + 1 + i:
                    raise SeqGap(f"tablet {self.id}: snapshot record seq {rec.seq}, expected {base + 1 + i}")
            seg = self._open_log(os.path.join(staging, segment_name(base + 1)))
            try:
                for rec in recs:
                    seg.enqueue(rec)
                seg.flush()
            finally:
                seg.close()
            fsync_dir(staging)
            os.rename(staging, os.path.join(self.path, INSTALL))      # the commit point
            fsync_dir(self.path)
            if self.log is not None:
                self.log.close(abandon=True)
            try:
                self._finish_install()
            except OSError as e:       # the next open() finishes it; until then, no writes
                self._fail(f"snapshot install interrupted: {e}")
                raise TabletError(self.failed) from None
            ckpt.path = os.path.join(self.path, CHECKPOINT)
            mem = Memtable()
            epoch = ckpt.last_epoch
            for rec in recs:
                mem.apply(rec.effect)
                epoch = max(epoch, rec.epoch)
            self.checkpoint_seq = base
            self.last_seq = recs[-1].seq if recs else base
            self.epoch = epoch
            p = os.path.join(self.path, segment_name(base + 1))
            self.log = self._open_log(p, os.path.getsize(p))
            self._view = (mem, None, ckpt)
            self.failed = None

    def _finish_install(self) -> None:
        """Move a committed snapshot from `install/` into place.

        Idempotent, so `open()` redoes it after a crash at any step: while
        `install/checkpoint` is there nothing has moved yet, so every log
        segment in the tablet's directory is the old state's and goes (before
        the checkpoint is replaced: the old checkpoint never lies under the new
        segment, nor the new checkpoint under old records); then the
        checkpoint, then the new segment move in."""
        inst = os.path.join(self.path, INSTALL)
        staged = os.path.join(inst, CHECKPOINT)
        if os.path.exists(staged):
            for _, name in self._segments():
                os.unlink(os.path.join(self.path, name))
            fsync_dir(self.path)
            os.replace(staged, os.path.join(self.path, CHECKPOINT))
            fsync_dir(self.path)
        for name in os.listdir(inst):
            os.replace(os.path.join(inst, name), os.path.join(self.path, name))
        fsync_dir(self.path)
        os.rmdir(inst)
        fsync_dir(self.path)

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Merge the memtable into a new checkpoint; False if there was nothing to do."""
        with self._ckpt_lock:
            with self._seq_lock:
                self._check()
                active, frozen, ckpt = self._view
                if frozen is None:
                    if active.records == 0:
                        self.last_checkpoint_time = time.monotonic()
                        return False
                    # Everything numbered so far goes to disk before the new
                    # segment takes records, so segments never leave a gap.
                    old_log = self.log
                    try:
                        old_log.flush()
                    except LogError as e:
                        self._fail(str(e))
                        raise TabletError(str(e)) from None
                    frozen = active
                    frozen.sealed_seq, frozen.sealed_epoch = self.last_seq, self.epoch
                    self._view = (Memtable(), frozen, ckpt)
                    self.log = self._new_segment(self.last_seq + 1)
                else:
                    old_log = None      # a failed attempt left the freeze in place
                seq, epoch = frozen.sealed_seq, frozen.sealed_epoch
            with self._inflight_cond:
                while frozen.inflight:
                    self._inflight_cond.wait(0.1)
                    if should_stop():
                        return False
            if self.failed:
                return False            # a record numbered into `frozen` may be missing
            if old_log is not None:
                old_log.close()
            t0 = time.monotonic()
            tmp = os.path.join(self.path, CHECKPOINT_TMP)
            write_checkpoint(tmp, _merge(ckpt, frozen), seq, epoch, should_stop)
            if should_stop():
                os.unlink(tmp)
                return False
            final = os.path.join(self.path, CHECKPOINT)
            os.replace(tmp, final)
            fsync_dir(self.path)
            new = CheckpointReader(final, self.cache)
            with self._seq_lock:
                active = self._view[0]
                self._view = (active, None, new)
                self.checkpoint_seq = new.last_seq
            self._drop_covered_segments()
            self.last_checkpoint_time = time.monotonic()
            log.info("tablet %d: checkpoint at seq %d: %d rows, %d cells, %d bytes in %.2fs",
                     self.id, new.last_seq, new.rows, new.cells, new.file_bytes, time.monotonic() - t0)
            return True

    # -- life cycle ----------------------------------------------------------------------

    def close(self, abandon: bool = False) -> None:
        """Close the log. With `abandon` (KILL), unsynced records are dropped."""
        with self._seq_lock:
            self._closed = True
            lg = self.log
        if lg is not None:
            lg.close(abandon=abandon)


def _merge(ckpt: CheckpointReader | None, mem: Memtable) -> Iterator[tuple[bytes, bytes, Value]]:
    """The cells of `ckpt` overlaid with `mem`, in (row, col) order."""
    mem_rows = sorted(mem.rows.items())
    old = iter(ckpt) if ckpt is not None else iter(())
    cur = next(old, None)
    for row, mr in mem_rows:
        # older rows that the memtable does not touch pass through
        while cur is not None and cur[0] < row:
            yield cur
            cur = next(old, None)
        base: list[tuple[bytes, Value]] = []
        while cur is not None and cur[0] == row:
            if not mr.deleted:
                base.append((cur[1], cur[2]))
            cur = next(old, None)
        cells = dict(base)
        for c, v in mr.cells.items():
            if v is None:
                cells.pop(c, None)
            else:
                cells[c] = v
        for c in sorted(cells):
            yield row, c, cells[c]
    while cur is not None:
        yield cur
        cur = next(old, None)
