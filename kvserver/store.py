"""All tablets of one server: the commit group, the memory budget, background checkpoints.

    store = Store(data_dir, tablet_ids, storage_cfg).open()   # recovers every tablet
    store.tablet(7)            -> Tablet (None if not held)
    store.add_tablet(9)        -> Tablet: open (recover or create) one more
    store.over_budget()        memory back-pressure, asked before a write
    store.close()              clean stop: logs flushed and closed
    store.crash()              KILL: everything in memory dropped, as a crash

Each tablet lives in `<data_dir>/tablet-<NNN>/` (tablet.py describes its files).

Memory budget (`StorageConfig.memory_budget_bytes`). Half of it is the
memtables' share; the rest, minus the checkpoints' in-memory indexes, is the
block cache's capacity (an LRU). When the memtables together pass their share,
the background thread checkpoints the biggest one (writers go on into a fresh
memtable meanwhile); if they pass twice their share, writers wait (bounded)
for a checkpoint to finish, so a burst of writes cannot outgrow memory. A
tablet is also checkpointed when its log passes `checkpoint_log_bytes` or when
`checkpoint_interval_s` has passed since its last checkpoint and its new
writes are at least 1/16 of its checkpoint (INTERVAL_REWRITE_LIMIT).

All tablet logs of the server share one `CommitGroup` (wal.py): one sync
makes every tablet's pending records durable.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from src.config import StorageConfig
from src.fsutil import fsync_dir

from kvserver.checkpoint import BlockCache, CheckpointAborted
from kvserver.tablet import Tablet, TabletError
from kvserver.wal import CommitGroup

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5        # how often the checkpointer looks even when not woken
# A checkpoint rewrites the whole tablet. The periodic one is skipped while
# the new writes are less than 1/16 of the checkpoint: else a big tablet that
# gets a write now and then (the processes' status cells, written every two
# seconds: src/heartbeat.py) was rewritten every checkpoint_interval_s,
# hundreds of MB every 5 minutes on an idle cluster. The log-size and memory triggers still apply.
INTERVAL_REWRITE_LIMIT = 16
MEM_RECHECK_S = 0.005         # how stale the writers' view of memtable memory may be


def tablet_dir(data_dir: str, tablet_id: int) -> str:
    return os.path.join(data_dir, f"tablet-{tablet_id:03d}")


class Store:
    def __init__(self, data_dir: str, tablet_ids, cfg: StorageConfig):
        self.data_dir = data_dir
        self.cfg = cfg
        self.tablet_ids = sorted(tablet_ids)
        self.mem_share = cfg.memory_budget_bytes // 2
        self.cache = BlockCache(cfg.memory_budget_bytes - self.mem_share)
        # Group commit spans every tablet of the server: one sync for all (wal.py).
        self.commit_group = CommitGroup() if cfg.group_commit else None
        self.tablets: dict[int, Tablet] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.checkpoints = 0
        self._mem_cached = 0
        self._mem_checked = 0.0

    # -- life cycle ----------------------------------------------------------------

    def open(self) -> "Store":
        """Recover every tablet from disk and start the checkpointer."""
        if not os.path.isdir(self.data_dir):
            os.makedirs(self.data_dir)
            fsync_dir(os.path.dirname(os.path.abspath(self.data_dir)))
        t0 = time.monotonic()
        for tid in self.tablet_ids:
            self.tablets[tid] = Tablet(tid, tablet_dir(self.data_dir, tid), self.cache,
                                       self.cfg.group_commit, self.commit_group).open()
        self._rebalance()
        log.info("store: %d tablets recovered in %.2fs", len(self.tablets), time.monotonic() - t0)
        self._thread = threading.Thread(target=self._checkpoint_loop, name="checkpointer", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the checkpointer and close every log (pending records flushed)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        for t in self.tablets.values():
            t.close()

    def crash(self) -> None:
        """Drop all in-memory state as a crash would: unsynced records are lost,
        their writers get errors; a checkpoint being written is abandoned."""
        self._stop.set()
        self._wake.set()
        for t in self.tablets.values():
            t.close(abandon=True)
        if self._thread is not None:
            self._thread.join()
        self.cache.clear()
        self.tablets = {}

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # -- access ----------------------------------------------------------------------

    def tablet(self, tablet_id: int) -> Tablet | None:
        return self.tablets.get(tablet_id)

    def add_tablet(self, tablet_id: int) -> Tablet:
        """Open (recover or create) a tablet this server now holds."""
        t = self.tablets.get(tablet_id)
        if t is None:
            t = Tablet(tablet_id, tablet_dir(self.data_dir, tablet_id), self.cache,
                       self.cfg.group_commit, self.commit_group).open()
            self.tablets = {**self.tablets, tablet_id: t}
            self.tablet_ids = sorted(self.tablets)
        return t

    @property
    def memtable_bytes(self) -> int:
        return sum(t.memtable_bytes for t in list(self.tablets.values()))

    def _memtable_estimate(self) -> int:
        """memtable_bytes, recomputed at most every MEM_RECHECK_S (writes are hot)."""
        now = time.monotonic()
        if now - self._mem_checked > MEM_RECHECK_S:
            self._mem_cached = self.memtable_bytes
            self._mem_checked = now
        return self._mem_cached

    def over_budget(self) -> bool:
        """Before a write: are the memtables far (2x) over their share? The
        caller then holds the write back a little (the server's loop retries
        it) while the checkpointer, woken here, frees memory."""
        mem = self._memtable_estimate()
        if mem > self.mem_share:
            self._wake.set()
        return mem > 2 * self.mem_share

    def wrote(self, t: Tablet) -> None:
        """After a write to `t`: wake the checkpointer if a threshold is passed."""
        if t.log_bytes >= self.cfg.checkpoint_log_bytes or self._memtable_estimate() > self.mem_share:
            self._wake.set()

    # -- background checkpoints ---------------------------------------------------------

    def _due(self) -> list[Tablet]:
        now = time.monotonic()
        due = []
        for t in list(self.tablets.values()):
            if t.log_bytes >= self.cfg.checkpoint_log_bytes:
                due.append(t)
            elif (now - t.last_checkpoint_time >= self.cfg.checkpoint_interval_s and t.active_bytes
                  and t.active_bytes * INTERVAL_REWRITE_LIMIT >= t.checkpoint_bytes):
                due.append(t)
        if self.memtable_bytes > self.mem_share:
            biggest = max(self.tablets.values(), key=lambda t: t.active_bytes, default=None)
            if biggest is not None and biggest.active_bytes and biggest not in due:
                due.insert(0, biggest)
        return due

    def _checkpoint_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(CHECK_INTERVAL_S)
            self._wake.clear()
            for t in self._due():
                if self._stop.is_set():
                    return
                try:
                    if t.checkpoint(self._stop.is_set):
                        self.checkpoints += 1
                except (TabletError, CheckpointAborted):
                    pass
                except Exception:
                    log.exception("tablet %d: checkpoint failed (will retry)", t.id)
                    self._stop.wait(1.0)
                self._rebalance()

    def _rebalance(self) -> None:
        """Give the block cache what the budget leaves after memtables and indexes."""
        indexes = sum(t.index_memory for t in list(self.tablets.values()))
        self.cache.resize(self.cfg.memory_budget_bytes - self.mem_share - indexes)

    # -- figures for STATUS / TABLETS ---------------------------------------------------------

    def stats(self) -> dict:
        per = {tid: t.stats() for tid, t in list(self.tablets.items())}
        return {
            "tablets": per,
            "keys": sum(s["cells"] for s in per.values()),
            "disk_bytes": sum(s["disk_bytes"] for s in per.values()),
            "log_records": sum(s["log_records"] for s in per.values()),
            "memtable_bytes": sum(s["mem_bytes"] for s in per.values()),
            "cache_bytes": self.cache.bytes,
            "index_bytes": sum(t.index_memory for t in list(self.tablets.values())),
            "checkpoints": self.checkpoints,
            "group_flushes": self.commit_group.flushes if self.commit_group else 0,
            "logs_flushed": self.commit_group.logs_flushed if self.commit_group else 0,
        }
