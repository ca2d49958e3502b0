"""The tablet log: record codec, torn tails, corruption, group commit."""

import logging
import os
import shutil
import threading
import zlib

import pytest

from tests.harness import wait_until

from kvserver.wal import (
    BODY, DEL, DELROW, HEADER, SET, SYNCFS, Effect, LogError, LogRecord, TabletLog, encode_record,
    read_segment, recover_segment, segment_first_seq, segment_name,
)


def encoded_size(rec: LogRecord) -> int:
    """A record's size on disk by the grammar: header, body, then row, column and value."""
    e = rec.effect
    return HEADER.size + BODY.size + len(e.row) + len(e.col) + len(e.value)


def recs(n, big=False):
    out = []
    for i in range(n):
        kind = (SET, DEL, DELROW)[i % 3]
        value = (bytes(range(256)) * 3 if big else b"v%d" % i) if kind == SET else b""
        col = b"c%d" % i if kind != DELROW else b""
        out.append(LogRecord(i + 1, 7, Effect(kind, b"row %d" % i, col, value)))
    return out


def write_log(path, records):
    lg = TabletLog(str(path), 0)
    for r in records:
        lg.append(r)
    lg.close()
    return os.path.getsize(path)


def test_records_round_trip(tmp_path):
    p = tmp_path / segment_name(1)
    rs = recs(9, big=True) + [LogRecord(10, 0, Effect(SET, b"\x00\xff", b"%", b""))]
    write_log(p, rs)
    scan = read_segment(str(p))
    assert scan.records == rs
    assert scan.dropped_bytes == 0 and not scan.corrupt_middle


def test_example_record_matches_docs():
    # docs/storage.md shows this record byte for byte
    rec = LogRecord(1, 0, Effect(SET, b"alice", b"greeting", b"hi"))
    data = b"".join(encode_record(rec))
    assert len(data) == encoded_size(rec) == 48
    assert int.from_bytes(data[:4], "little") == zlib.crc32(data[4:])   # CRC covers length + payload
    assert data.hex() == ("bbddd9a5" "28000000" "0100000000000000" "0000000000000000" "01" "0500" "0800"
                          "02000000" "616c696365" "6772656574696e67" "6869")


def test_segment_names_sort_by_seq():
    assert segment_name(42) == "log-00000000000000000042.wal"
    assert segment_first_seq(segment_name(42)) == 42
    assert segment_first_seq("log-x.wal") is None
    assert segment_name(9) < segment_name(10)


def test_cut_at_every_offset_of_last_record(tmp_path):
    rs = recs(5)
    good = tmp_path / "good.wal"
    write_log(good, rs[:4])
    start = os.path.getsize(good)
    full = tmp_path / "full.wal"
    end = write_log(full, rs)
    assert end > start + 20
    data = full.read_bytes()
    for cut in range(start, end):
        p = tmp_path / "cut.wal"
        p.write_bytes(data[:cut])
        scan = recover_segment(str(p))
        assert scan.records == rs[:4], cut
        assert scan.dropped_bytes == cut - start
        assert os.path.getsize(p) == start       # the torn tail is gone
        # new appends after recovery are valid records
        lg = TabletLog(str(p), start)
        new = LogRecord(5, 7, Effect(SET, b"new", b"col", b"after cut %d" % cut))
        lg.append(new)
        lg.close()
        assert read_segment(str(p)).records == rs[:4] + [new]


def test_flip_every_byte_of_last_record(tmp_path):
    rs = recs(5)
    good = tmp_path / "good.wal"
    start = write_log(good, rs[:4])
    full = tmp_path / "full.wal"
    end = write_log(full, rs)
    data = full.read_bytes()
    for off in range(start, end):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[off] ^= mask
            p = tmp_path / "flip.wal"
            p.write_bytes(bytes(bad))
            scan = recover_segment(str(p))
            assert scan.records == rs[:4], (off, mask)
            assert os.path.getsize(p) == start


def test_corruption_in_the_middle_is_reported(tmp_path, caplog):
    rs = recs(6)
    p = tmp_path / "mid.wal"
    write_log(p, rs)
    first_two = sum(encoded_size(r) for r in rs[:2])
    data = bytearray(p.read_bytes())
    data[first_two + 12] ^= 0x40            # inside record 3's payload
    p.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="kvserver.wal"):
        scan = recover_segment(str(p))
    assert scan.records == rs[:2]
    assert scan.corrupt_middle
    assert scan.dropped_bytes == len(data) - first_two
    assert any("corrupt record" in r.message and str(scan.dropped_bytes) in r.message for r in caplog.records)


def test_torn_tail_is_logged_with_byte_count(tmp_path, caplog):
    p = tmp_path / "torn.wal"
    size = write_log(p, recs(3))
    with open(p, "ab") as f:
        f.write(b"\x01\x02\x03")
    with caplog.at_level(logging.WARNING, logger="kvserver.wal"):
        scan = recover_segment(str(p))
    assert len(scan.records) == 3 and os.path.getsize(p) == size
    assert any("torn tail" in r.message and "3 bytes" in r.message for r in caplog.records)


def test_huge_length_field_does_not_allocate(tmp_path):
    p = tmp_path / "huge.wal"
    size = write_log(p, recs(2))
    with open(p, "ab") as f:
        f.write(b"\0\0\0\0\xff\xff\xff\xff" + b"x" * 10)
    assert recover_segment(str(p)).records == recs(2) and os.path.getsize(p) == size


@pytest.mark.parametrize("group", [True, False])
def test_group_commit_shares_fsyncs(tmp_path, group):
    p = tmp_path / "gc.wal"
    lg = TabletLog(str(p), 0, group_commit=group)
    n_threads, per = 8, 40
    lock = threading.Lock()
    seq = [0]

    def writer(t):
        for i in range(per):
            with lock:   # numbering and enqueueing in one step, as Tablet.submit does
                seq[0] += 1
                ticket = lg.enqueue(LogRecord(seq[0], 0, Effect(SET, b"r%d" % t, b"c%d" % i, b"x" * 100)))
            lg.wait_durable(ticket)

    ts = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    lg.close()
    got = read_segment(str(p)).records
    assert [r.seq for r in got] == list(range(1, n_threads * per + 1))
    if group:
        assert lg.syncs < n_threads * per
    else:
        assert lg.syncs == n_threads * per


def test_abandon_drops_unsynced_records(tmp_path):
    p = tmp_path / "kill.wal"
    lg = TabletLog(str(p), 0)
    lg.append(LogRecord(1, 0, Effect(SET, b"a", b"b", b"durable")))
    ticket = lg.enqueue(LogRecord(2, 0, Effect(SET, b"a", b"b", b"never synced")))
    lg.close(abandon=True)
    with pytest.raises(LogError):
        lg.wait_durable(ticket)
    with pytest.raises(LogError):
        lg.enqueue(LogRecord(3, 0, Effect(SET, b"a", b"b", b"x")))
    assert [r.seq for r in read_segment(str(p)).records] == [1]


def test_clean_close_flushes_pending(tmp_path):
    p = tmp_path / "close.wal"
    lg = TabletLog(str(p), 0)
    lg.enqueue(LogRecord(1, 0, Effect(DEL, b"a", b"b")))
    lg.close()
    assert [r.seq for r in read_segment(str(p)).records] == [1]


def test_reopen_appends_after_existing_records(tmp_path):
    p = tmp_path / "re.wal"
    rs = recs(4)
    size = write_log(p, rs[:2])
    shutil.copy(p, tmp_path / "copy.wal")
    lg = TabletLog(str(p), size)
    for r in rs[2:]:
        lg.append(r)
    lg.close()
    assert read_segment(str(p)).records == rs


def test_abandon_keeps_the_batch_being_written(tmp_path, monkeypatch):
    """A record a leader is already writing when KILL comes becomes durable:
    its writer must hear success, not "dropped" (which would promise it was
    not applied)."""
    from kvserver import wal
    p = tmp_path / "race.wal"
    lg = TabletLog(str(p), 0)
    in_sync, release = threading.Event(), threading.Event()
    real_sync = os.fdatasync

    def slow_sync(fd):
        in_sync.set()
        release.wait(10)
        real_sync(fd)

    monkeypatch.setattr(wal.os, "fdatasync", slow_sync)
    t1 = lg.enqueue(LogRecord(1, 0, Effect(SET, b"a", b"b", b"leader's")))
    t2 = lg.enqueue(LogRecord(2, 0, Effect(SET, b"c", b"d", b"in the same batch")))
    leader = threading.Thread(target=lg.wait_durable, args=(t1,))
    leader.start()
    assert in_sync.wait(10)                       # the leader took both records and is syncing
    t3 = lg.enqueue(LogRecord(3, 0, Effect(SET, b"e", b"f", b"still pending")))
    closer = threading.Thread(target=lg.close, kwargs={"abandon": True})
    closer.start()
    wait_until(lambda: lg._closed, timeout=5, what="close to begin")
    result = {}

    def late_waiter():
        try:
            lg.wait_durable(t2)
            result["t2"] = "durable"
        except LogError:
            result["t2"] = "dropped"

    w = threading.Thread(target=late_waiter)
    w.start()
    release.set()
    for t in (leader, closer, w):
        t.join(10)
    assert result["t2"] == "durable"
    with pytest.raises(LogError):
        lg.wait_durable(t3)                       # never written: dropped
    assert [r.seq for r in read_segment(str(p)).records] == [1, 2]


# -- a commit group: one sync for the logs of every tablet ---------------------------


def test_commit_group_one_sync_covers_many_logs(tmp_path, monkeypatch):
    """Writers of 6 different logs, held until all 6 have a record pending,
    are made durable by ONE group flush, which syncs every log in one call."""
    from kvserver import wal
    group = wal.CommitGroup()
    logs = [TabletLog(str(tmp_path / f"t{i}.wal"), 0, group=group) for i in range(6)]
    synced = []
    real_sync_logs = wal.sync_logs

    def recording(lgs):
        synced.append(sorted(lg.path for lg in lgs))
        real_sync_logs(lgs)
    monkeypatch.setattr(wal, "sync_logs", recording)
    tickets = [lg.enqueue(LogRecord(1, 0, Effect(SET, b"r", b"c", b"v%d" % i))) for i, lg in enumerate(logs)]
    done = []
    ts = [threading.Thread(target=lambda lg=lg, t=t: done.append(lg.wait_durable(t)))
          for lg, t in zip(logs, tickets)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert len(done) == 6
    assert synced == [sorted(lg.path for lg in logs)]       # one flush, all six logs
    assert group.flushes == 1 and group.logs_flushed == 6
    for i, lg in enumerate(logs):
        lg.close()
        assert [r.effect.value for r in read_segment(lg.path).records] == [b"v%d" % i]


def test_commit_group_under_concurrent_writers_keeps_every_log_in_order(tmp_path):
    from kvserver import wal
    group = wal.CommitGroup()
    logs = [TabletLog(str(tmp_path / f"t{i}.wal"), 0, group=group) for i in range(4)]
    locks = [threading.Lock() for _ in logs]
    seqs = [0] * len(logs)

    def writer(w):
        for i in range(50):
            k = (w + i) % len(logs)
            with locks[k]:
                seqs[k] += 1
                ticket = logs[k].enqueue(LogRecord(seqs[k], 0, Effect(SET, b"w%d" % w, b"c", b"x" * 50)))
            logs[k].wait_durable(ticket)

    ts = [threading.Thread(target=writer, args=(w,)) for w in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for k, lg in enumerate(logs):
        lg.close()
        assert [r.seq for r in read_segment(lg.path).records] == list(range(1, seqs[k] + 1))
    assert sum(seqs) == 600
    assert group.flushes < 600          # writers of different logs shared flushes


def test_commit_group_sync_failure_fails_every_log_of_the_batch(tmp_path, monkeypatch):
    """A failed shared sync cannot say which log reached the disk: every
    log of that flush is poisoned, every waiter hears LogError."""
    from kvserver import wal
    group = wal.CommitGroup()
    logs = [TabletLog(str(tmp_path / f"t{i}.wal"), 0, group=group) for i in range(3)]

    def broken(lgs):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(wal, "sync_logs", broken)
    tickets = [lg.enqueue(LogRecord(1, 0, Effect(SET, b"r", b"c", b"v"))) for lg in logs]
    for lg, t in zip(logs, tickets):
        with pytest.raises(LogError):
            lg.wait_durable(t)
        assert lg.failed
    for lg in logs:
        lg.close()


@pytest.mark.skipif(SYNCFS is None, reason="no syncfs(2) in this C library")
def test_syncfs_is_callable_and_makes_bytes_durable(tmp_path):
    from kvserver import wal
    logs = [TabletLog(str(tmp_path / f"s{i}.wal"), 0) for i in range(2)]
    for lg in logs:
        os.write(lg._fd, b"abc")
    wal.sync_logs(logs)         # two logs on one file system: one syncfs
    for lg in logs:
        lg.close()
        assert open(lg.path, "rb").read() == b"abc"


def test_no_syncfs_support_falls_back_to_fdatasync(tmp_path, monkeypatch):
    """A file system without syncfs (ENOSYS/EINVAL) must not poison the logs:
    the server syncs each log with fdatasync from then on."""
    import errno
    from kvserver import wal
    calls = []

    def unsupported(fd):
        calls.append(fd)
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(wal, "SYNCFS", unsupported)
    group = wal.CommitGroup()
    logs = [TabletLog(str(tmp_path / f"n{i}.wal"), 0, group=group) for i in range(3)]
    tickets = [lg.enqueue(LogRecord(1, 0, Effect(SET, b"r", b"c", b"v%d" % i))) for i, lg in enumerate(logs)]
    logs[0].wait_durable(tickets[0])                # leads one flush of all three
    assert calls and wal.SYNCFS is None and not any(lg.failed for lg in logs)
    t2 = logs[1].enqueue(LogRecord(2, 0, Effect(SET, b"r", b"c", b"again")))
    logs[1].wait_durable(t2)
    assert len(calls) == 1                          # not tried again
    for i, lg in enumerate(logs):
        lg.close()
        assert read_segment(lg.path).records[0].effect.value == b"v%d" % i
