"""A tablet: layers, recovery, checkpoints (including a crash in the middle),
catch-up records and snapshots."""

import itertools
import os
import random
import threading

import pytest

from kvserver.checkpoint import BlockCache, CorruptCheckpoint, write_checkpoint
from kvserver.tablet import CHECKPOINT, CHECKPOINT_TMP, Memtable, Tablet, TabletError, _merge
from kvserver.wal import DEL, DELROW, SET, Effect, read_segment
from tests.harness import wait_until


def open_tablet(path, **kw):
    return Tablet(3, str(path), BlockCache(1 << 20), **kw).open()


def model_apply(model, e):
    if e.kind == SET:
        model.setdefault(e.row, {})[e.col] = e.value
    elif e.kind == DEL:
        model.get(e.row, {}).pop(e.col, None)
        if not model.get(e.row, True):
            del model[e.row]
    else:
        model.pop(e.row, None)


def check(t, model):
    for row, cells in model.items():
        assert t.cols(row) == sorted(cells), row
        for col, v in cells.items():
            assert t.get(row, col) == v, (row, col)
    assert t.rows(None, 10**6) == sorted(model)


def random_effects(n, seed=0, rows=30):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        row = b"r%02d" % rnd.randrange(rows)
        k = rnd.random()
        if k < 0.75:
            size = rnd.choice([1, 10, 200, 6000])
            out.append(Effect(SET, row, b"c%d" % rnd.randrange(5), rnd.randbytes(size)))
        elif k < 0.95:
            out.append(Effect(DEL, row, b"c%d" % rnd.randrange(5)))
        else:
            out.append(Effect(DELROW, row))
    return out


def test_writes_survive_reopen_through_log_and_checkpoints(tmp_path):
    t = open_tablet(tmp_path)
    model = {}
    for i, e in enumerate(random_effects(600)):
        t.write(e)
        model_apply(model, e)
        if i in (200, 400):
            assert t.checkpoint()
            check(t, model)
    check(t, model)
    t.close()
    t2 = open_tablet(tmp_path)
    assert t2.last_seq == 600 and t2.checkpoint_seq == 401
    check(t2, model)


def test_delrow_hides_checkpointed_cells_and_new_cells_show(tmp_path):
    t = open_tablet(tmp_path)
    t.write(Effect(SET, b"a", b"x", b"1"))
    t.write(Effect(SET, b"a", b"y", b"2"))
    t.checkpoint()
    t.write(Effect(DELROW, b"a"))
    t.write(Effect(SET, b"a", b"z", b"3"))
    assert t.cols(b"a") == [b"z"] and t.get(b"a", b"x") is None
    t.write(Effect(DEL, b"a", b"z"))
    assert t.cols(b"a") == [] and t.rows(None, 10) == []
    t.checkpoint()
    assert t.cols(b"a") == [] and t.get(b"a", b"y") is None


def test_crash_between_checkpoint_and_log_truncation(tmp_path):
    """Do a checkpoint's steps by hand and 'crash' after the rename, before
    the log is truncated: nothing lost, nothing applied twice."""
    t = open_tablet(tmp_path)
    model = {}
    effects = random_effects(300, seed=5)
    for e in effects[:200]:
        t.write(e)
        model_apply(model, e)
    t.close()
    # step 1: write the checkpoint of the state at seq 200 to a temp file
    mem = Memtable()
    for rec in read_segment(os.path.join(tmp_path, sorted(os.listdir(tmp_path))[0])).records:
        mem.apply(rec.effect)
    write_checkpoint(os.path.join(tmp_path, CHECKPOINT_TMP), _merge(None, mem), 200, 0)
    # step 2: rename it into place; crash before the log is truncated
    os.replace(os.path.join(tmp_path, CHECKPOINT_TMP), os.path.join(tmp_path, CHECKPOINT))
    t2 = open_tablet(tmp_path)
    assert t2.checkpoint_seq == 200 and t2.last_seq == 200
    assert t2.replayed == 0                    # the 200 covered records were not applied again
    check(t2, model)
    for e in effects[200:]:
        t2.write(e)
        model_apply(model, e)
    t2.close()
    t3 = open_tablet(tmp_path)
    assert t3.last_seq == 300 and t3.replayed == 100
    check(t3, model)


def test_unfinished_checkpoint_temp_file_is_ignored(tmp_path):
    t = open_tablet(tmp_path)
    t.write(Effect(SET, b"a", b"b", b"c"))
    t.close()
    (tmp_path / CHECKPOINT_TMP).write_bytes(b"half a checkpoint")
    t = open_tablet(tmp_path)
    assert t.get(b"a", b"b") == b"c" and not (tmp_path / CHECKPOINT_TMP).exists()


def test_corrupt_checkpoint_refuses_to_open(tmp_path):
    t = open_tablet(tmp_path)
    t.write(Effect(SET, b"a", b"b", b"c"))
    t.checkpoint()
    t.close()
    p = tmp_path / CHECKPOINT
    data = bytearray(p.read_bytes())
    data[-20] ^= 0x55
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        open_tablet(tmp_path)


def test_cells_are_read_from_the_checkpoint_without_loading_the_tablet(tmp_path):
    t = open_tablet(tmp_path)
    pending = [t.submit(Effect(SET, b"row%04d" % i, b"c", b"v" * 300)) for i in range(2000)]
    for p in pending:                            # distinct rows: one group commit for all
        t.wait_durable(p)
        t.apply(p)
    t.checkpoint()
    t.close()
    cache = BlockCache(64 * 1024)
    t = Tablet(3, str(tmp_path), cache).open()
    assert t.memtable_bytes == 0                 # nothing loaded at open
    assert t.get(b"row1234", b"c") == b"v" * 300
    assert cache.misses == 1                     # one block read
    for i in range(0, 2000, 7):
        assert t.get(b"row%04d" % i, b"c") == b"v" * 300
    assert cache.bytes <= 64 * 1024


def test_checkpoint_does_not_block_writers(tmp_path):
    t = open_tablet(tmp_path)
    for i in range(300):
        t.write(Effect(SET, b"r%d" % i, b"c", os.urandom(1000)))
    stop = threading.Event()
    written = []

    def writer():
        i = 0
        while not stop.is_set() and i < 2000:
            t.write(Effect(SET, b"w", b"c%d" % i, b"%d" % i))
            written.append(i)
            i += 1

    th = threading.Thread(target=writer)
    th.start()
    for _ in range(3):
        t.checkpoint()
    stop.set()
    th.join(30)
    assert t.cols(b"w") == sorted(b"c%d" % i for i in written)
    t.close()
    t = open_tablet(tmp_path)
    assert t.cols(b"w") == sorted(b"c%d" % i for i in written)
    segs = [n for n in os.listdir(tmp_path) if n.endswith(".wal")]
    assert len(segs) <= 2                        # covered segments removed, one kept


def replicate(sec, recs):
    """What a secondary does with records its state machine accepted (cluster.py
    _submit_append): submit each in order, so it gets the primary's seq; then
    make them durable and apply them."""
    pend = []
    for r in recs:
        sec.epoch = r.epoch
        p = sec.submit(r.effect)
        assert p.record.seq == r.seq
        pend.append(p)
    for p in pend:
        sec.wait_durable(p)
        sec.apply(p)


def test_records_after_and_replicated_append(tmp_path):
    prim = open_tablet(tmp_path / "p")
    sec = open_tablet(tmp_path / "s")
    for e in random_effects(50, seed=2):
        prim.write(e)
    recs = prim.records_after(0)
    assert [r.seq for r in recs] == list(range(1, 51))
    replicate(sec, recs[:30])
    prim.checkpoint()
    for e in random_effects(20, seed=3):
        prim.write(e)
    # the previous segment is kept, so catching up from 30 is incremental
    more = prim.records_after(sec.last_seq)
    assert [r.seq for r in more] == list(range(31, 71))
    replicate(sec, more)
    assert sec.rows(None, 1000) == prim.rows(None, 1000)
    for row in prim.rows(None, 1000):
        assert sec.cols(row) == prim.cols(row)
    prim.checkpoint()
    for e in random_effects(5, seed=4):
        prim.write(e)
    prim.checkpoint()
    assert prim.records_after(10) is None        # too far behind: needs a snapshot


def test_snapshot_installs_on_a_fresh_replica(tmp_path):
    prim = open_tablet(tmp_path / "p")
    model = {}
    for i, e in enumerate(random_effects(200, seed=9)):
        prim.write(e)
        model_apply(model, e)
        if i == 120:
            prim.checkpoint()
    snap = prim.snapshot()
    assert snap.last_seq == 121 and [r.seq for r in snap.records] == list(range(122, 201))
    sec = open_tablet(tmp_path / "s")
    sec.write(Effect(SET, b"stale", b"x", b"y"))
    sec.install_snapshot(snap.checkpoint_chunks(), snap.records)
    assert sec.last_seq == 200
    check(sec, model)
    sec.close()
    sec = open_tablet(tmp_path / "s")
    check(sec, model)
    assert sec.get(b"stale", b"x") is None


def test_closed_tablet_refuses_writes(tmp_path):
    t = open_tablet(tmp_path)
    t.close(abandon=True)
    with pytest.raises(TabletError):
        t.write(Effect(SET, b"a", b"b", b"c"))


def test_checkpoint_waits_for_records_in_flight_and_leaves_no_gap(tmp_path):
    t = open_tablet(tmp_path)
    t.write(Effect(SET, b"a", b"c", b"1"))
    p = t.submit(Effect(SET, b"b", b"c", b"2"))        # numbered, not yet waited for
    done = threading.Event()
    th = threading.Thread(target=lambda: (t.checkpoint(), done.set()))
    th.start()
    # the rotation made seq 2 durable in the old segment before the new one took records
    first = os.path.join(tmp_path, sorted(n for n in os.listdir(tmp_path) if n.endswith(".wal"))[0])
    wait_until(lambda: [r.seq for r in read_segment(first).records] == [1, 2], timeout=5,
               what="seq 2 durable")
    t.write(Effect(SET, b"c", b"c", b"3"))            # writers go on meanwhile
    assert not done.wait(0.2)                          # the checkpoint waits for seq 2's apply
    t.wait_durable(p)
    t.apply(p)
    th.join(10)
    assert done.is_set() and t.checkpoint_seq == 2
    t.close()
    t = open_tablet(tmp_path)
    assert [t.get(r, b"c") for r in (b"a", b"b", b"c")] == [b"1", b"2", b"3"] and t.replayed == 1


def test_a_failed_sync_stops_writes_and_reports_an_unknown_outcome(tmp_path, monkeypatch):
    from kvserver import wal
    from kvserver.tablet import WriteOutcomeUnknown
    t = open_tablet(tmp_path)
    t.write(Effect(SET, b"a", b"c", b"before"))

    def broken_sync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(wal.os, "fdatasync", broken_sync)
    with pytest.raises(WriteOutcomeUnknown):
        t.write(Effect(SET, b"a", b"c", b"during"))
    monkeypatch.undo()
    with pytest.raises(TabletError):              # no more writes until a restart
        t.write(Effect(SET, b"b", b"c", b"after"))
    assert t.get(b"a", b"c") == b"before"         # reads go on; the failed write is not visible
    with pytest.raises(TabletError):              # nor checkpoints
        t.checkpoint()
    t.close(abandon=True)
    t = open_tablet(tmp_path)                     # a restart recovers whatever reached the disk
    assert t.get(b"a", b"c") in (b"before", b"during")
    t.write(Effect(SET, b"b", b"c", b"after"))
    assert t.get(b"b", b"c") == b"after"


def test_replicated_records_survive_a_restart_with_their_seqs(tmp_path):
    prim = open_tablet(tmp_path / "p")
    for i in range(10):
        prim.write(Effect(SET, b"r%d" % i, b"c", b"v%d" % i))
    recs = prim.records_after(0)
    sec = open_tablet(tmp_path / "s")
    replicate(sec, recs[:7])
    assert sec.last_seq == 7 and sec.get(b"r6", b"c") == b"v6" and sec.get(b"r8", b"c") is None
    sec.close()
    sec = open_tablet(tmp_path / "s")
    assert sec.last_seq == 7 and sec.get(b"r6", b"c") == b"v6"
    replicate(sec, recs[7:])
    assert sec.rows(None, 100) == prim.rows(None, 100)


# -- power loss: only what was synced survives ---------------------------------------

class PowerLossFS:
    """Records what fsync/fdatasync made durable under `root`; `crash()` then
    makes the tree look as it would after a power cut (as LevelDB's
    fault-injection test does): each directory holds exactly the entries it
    had at its last sync (names renamed or removed since come back, names
    created since vanish; a never-synced directory comes back empty), and
    every file is cut back to the size it had at its last sync. Directory
    entries are kept alive by hard links in `shadow`, so a file replaced by a
    rename or removed by unlink can come back."""

    def __init__(self, root, shadow, monkeypatch):
        self.root = str(root)
        self.shadow = str(shadow)
        self.synced: dict[int, int] = {}          # inode -> durable size
        self.durable_dirs: dict[str, str] = {}    # dir -> its shadow copy of entries
        self.snapshots = 0
        real_fsync, real_fdatasync = os.fsync, os.fdatasync

        def note(fd):
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.isdir(path):
                self._snapshot_dir(path)
            else:
                self.synced[os.fstat(fd).st_ino] = os.fstat(fd).st_size

        def fsync(fd):
            real_fsync(fd)
            note(fd)

        def fdatasync(fd):
            real_fdatasync(fd)
            note(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

    def _snapshot_dir(self, path):
        if not path.startswith(self.root):
            return
        self.snapshots += 1
        sh = os.path.join(self.shadow, f"{self.snapshots}-{os.path.basename(path)}")
        os.makedirs(sh)
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                os.link(p, os.path.join(sh, name))
        self.durable_dirs[path] = sh

    def crash(self):
        for d, _, files in os.walk(self.root):
            for name in files:
                os.unlink(os.path.join(d, name))
            sh = self.durable_dirs.get(d)
            for name in os.listdir(sh) if sh else ():
                p = os.path.join(d, name)
                os.link(os.path.join(sh, name), p)
                keep = self.synced.get(os.stat(p).st_ino, 0)
                if os.path.getsize(p) > keep:
                    os.truncate(p, keep)


def test_power_loss_at_random_moments_keeps_every_acknowledged_write(tmp_path, monkeypatch):
    rnd = random.Random(99)
    root = tmp_path / "t"
    fs = PowerLossFS(root, tmp_path / "shadow", monkeypatch)
    model = {}
    effects = random_effects(1500, seed=11, rows=40)
    t = open_tablet(root)
    crashes = 0
    for i, e in enumerate(effects):
        t.write(e)                                 # acknowledged once this returns
        model_apply(model, e)
        if rnd.random() < 0.03:
            t.checkpoint()
        if rnd.random() < 0.02 or i == len(effects) - 1:
            t.close(abandon=True)
            fs.crash()
            crashes += 1
            t = open_tablet(root)
            check(t, model)
    assert crashes >= 10


def test_power_loss_in_the_middle_of_a_checkpoint(tmp_path, monkeypatch):
    """Cut the power at each disk step of a checkpoint in turn, with writes
    acknowledged into the new segment while the checkpoint runs."""
    import kvserver.tablet as tablet_mod

    class PowerCut(Exception):
        pass

    for step in range(6):
        root = tmp_path / f"s{step}"
        fs = PowerLossFS(root, tmp_path / f"shadow{step}", monkeypatch)
        t = open_tablet(root)
        model = {}
        for e in random_effects(300, seed=step):
            t.write(e)
            model_apply(model, e)
        t.checkpoint()
        for e in random_effects(200, seed=step + 100):
            t.write(e)
            model_apply(model, e)
        calls = []
        real = {"replace": os.replace, "unlink": os.unlink, "fsync_dir": tablet_mod.fsync_dir}
        during = iter(random_effects(50, seed=step + 200))

        def counted(name):
            def f(*a, **kw):
                calls.append(name)
                if len(calls) > 1:              # the rotation is done: writers go on
                    for e in itertools.islice(during, 10):
                        t.write(e)
                        model_apply(model, e)
                if len(calls) == step + 1:
                    raise PowerCut(name)
                return real[name](*a, **kw)
            return f

        monkeypatch.setattr(tablet_mod.os, "replace", counted("replace"))
        monkeypatch.setattr(tablet_mod.os, "unlink", counted("unlink"))
        monkeypatch.setattr(tablet_mod, "fsync_dir", counted("fsync_dir"))
        try:
            t.checkpoint()
        except PowerCut:
            pass
        monkeypatch.setattr(tablet_mod.os, "replace", real["replace"])
        monkeypatch.setattr(tablet_mod.os, "unlink", real["unlink"])
        monkeypatch.setattr(tablet_mod, "fsync_dir", real["fsync_dir"])
        assert len(calls) > step or step >= 4, calls
        t.close(abandon=True)
        fs.crash()
        t = open_tablet(root)
        check(t, model)
        t.close()


def test_corruption_in_the_middle_of_the_log_is_reported(tmp_path, caplog):
    import logging
    t = open_tablet(tmp_path)
    for i in range(10):
        t.write(Effect(SET, b"r%d" % i, b"c", b"v%d" % i))
    seg = t.log.path
    t.close()
    data = bytearray(open(seg, "rb").read())
    data[len(data) // 2] ^= 0x20                   # inside record 5 or 6
    open(seg, "wb").write(bytes(data))
    with caplog.at_level(logging.WARNING):
        t = open_tablet(tmp_path)
    assert 3 <= t.last_seq < 10
    assert [t.get(b"r%d" % i, b"c") for i in range(t.last_seq)] == [b"v%d" % i for i in range(t.last_seq)]
    assert any("corrupt record" in r.message for r in caplog.records)
    t.write(Effect(SET, b"new", b"c", b"x"))       # the log goes on after the cut
    t.close()
    assert open_tablet(tmp_path).get(b"new", b"c") == b"x"


def test_the_periodic_checkpoint_skips_a_big_tablet_with_few_new_writes(tmp_path):
    """A checkpoint rewrites the whole tablet: the soak QA saw an idle
    cluster rewrite a 355 MB tablet every 5 minutes because the processes'
    status cells get a write a second. The interval checkpoint waits until
    the new writes are 1/16 of the checkpoint; the log-size trigger stays."""
    import time
    from kvserver.store import INTERVAL_REWRITE_LIMIT, Store
    from src.config import StorageConfig
    cfg = StorageConfig(checkpoint_interval_s=60.0, checkpoint_log_bytes=4 << 20)
    store = Store(str(tmp_path), [0], cfg).open()
    store._stop.set()                    # no background checkpoints: the test asks _due() itself
    store._wake.set()
    store._thread.join()
    try:
        t = store.tablets[0]
        for i in range(200):
            t.write(Effect(SET, b"big%d" % i, b"c", b"x" * 1000))
        assert t.checkpoint()
        big = t.checkpoint_bytes
        t.write(Effect(SET, b"sys/procs", b"kv1", b"up"))
        t.last_checkpoint_time = time.monotonic() - 61        # the interval has passed
        assert store._due() == []                             # a few bytes: not worth 200 KB
        while t.active_bytes * INTERVAL_REWRITE_LIMIT < big:
            t.write(Effect(SET, b"new%d" % t.active_bytes, b"c", b"y" * 500))
        assert store._due() == [t]
    finally:
        store.close()
