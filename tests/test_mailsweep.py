"""Reclaiming orphaned mail bodies (src/mailsweep.py).

Unit tests run over MemoryKV with a fake lister over its rows and a fake
clock; crashes are simulated by a store that dies after n writes. Two tests
run against a real standalone tablet server: the sweeper in-process over
`ServerClient.rows`, and the relay worker process sweeping on its own.
"""

import os
import threading

import pytest

from smtp.relay import RelayWorker
from src.kv import KVError, MemoryKV, Unavailable, tablet_of
from src.kvclient import ServerClient
from src.mailstore import MailStore
from src.mailsweep import (
    GRACE_S, MailSweeper, RowLister, id_time, lister_for, parse_body_row, parse_queue_body_row,
)
from tests.harness import wait_until

TABLETS = 4
HOUR = 3600.0
BIG = b"Subject: big\r\n\r\n" + b"0123456789abcdef" * 20      # 336 bytes: 6 chunks of 64
SMALL = b"Subject: small\r\n\r\nhi\r\n"                      # inline: no body row


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        self.t += 0.001
        return self.t


def memory_lister(kv: MemoryKV, tablets: int = TABLETS, broken: set[int] = frozenset()) -> RowLister:
    """ROWS over a MemoryKV: its rows split into tablets as the real store does."""
    def page(tablet, after, limit):
        if tablet in broken:
            raise Unavailable(f"tablet {tablet} has no live server")
        with kv._lock:
            names = sorted(r for r in kv._rows if tablet_of(r, tablets) == tablet)
        return [n for n in names if after is None or n > after][:limit]
    return RowLister(lambda: list(range(tablets)), page)


class CrashAfter(MemoryKV):
    """A store that dies (raises) after `n` successful writes: a crash mid-operation."""

    def __init__(self):
        super().__init__()
        self.left = None

    def _write(self):
        if self.left is not None:
            if self.left == 0:
                raise ConnectionError("crash")
            self.left -= 1

    def put(self, *a):
        self._write()
        super().put(*a)

    def putnx(self, *a):
        self._write()
        super().putnx(*a)

    def delete(self, *a):
        self._write()
        super().delete(*a)

    def delrow(self, *a):
        self._write()
        super().delrow(*a)


def body_rows(kv: MemoryKV) -> list[bytes]:
    with kv._lock:
        return sorted(r for r in kv._rows if r.startswith((b"mmsg/", b"mqmsg/")))


def make(kv=None, clock=None, page_rows=3):
    kv = MemoryKV() if kv is None else kv
    clock = clock or Clock()
    store = MailStore(kv, chunk_bytes=64, inline_bytes=32, clock=clock)
    return kv, clock, store, MailSweeper(store, memory_lister(kv), page_rows=page_rows)


def crash(kv, writes, fn, *args):
    kv.left = writes
    try:
        with pytest.raises(ConnectionError):
            fn(*args)
    finally:
        kv.left = None


# -- names ---------------------------------------------------------------------------


def test_names_and_ages():
    store = MailStore(MemoryKV(), clock=lambda: 1_700_000_123.5)
    assert id_time(store.new_id()) == pytest.approx(1_700_000_123.5)
    assert id_time("not-an-id") is None and id_time("0123") is None
    assert parse_body_row(b"mmsg/alice/0123456789abcdef00ff00ff") == ("alice", "0123456789abcdef00ff00ff")
    for bad in (b"mmsg/Alice/0123456789abcdef", b"mmsg/alice", b"mmsg/al/ice/x", b"mmsg/alice/",
                b"mmsg/\xff/0123456789abcdef", b"mmsg/alice/a b", b"mmsg/alice/0123456789abcdef\n"):
        assert parse_body_row(bad) is None, bad
    assert parse_queue_body_row(b"mqmsg/0123456789abcdef") == "0123456789abcdef"
    assert parse_queue_body_row(b"mqmsg/x/y") is None and parse_queue_body_row(b"mqmsg/\xff") is None
    assert parse_queue_body_row(b"mqmsg/0123456789abcdef\n") is None


# -- crashes leave orphans; the sweep takes exactly those -----------------------------------


@pytest.mark.parametrize("writes", range(6))  # BIG is 6 chunks; the 7th write is the index cell
def test_crash_mid_delivery_orphan_is_reclaimed_after_the_grace_period(writes):
    kv, clock, store, sweeper = make(CrashAfter())
    keep_big = store.deliver("bob", "Inbox", BIG)
    keep_small = store.deliver("bob", "Inbox", SMALL)
    crash(kv, writes, store.deliver, "bob", "Inbox", BIG)
    orphan_rows = [r for r in body_rows(kv) if keep_big.encode() not in r]
    assert len(orphan_rows) == (1 if writes else 0)
    assert [m.id for m in store.list("bob", "Inbox")] == [keep_small, keep_big]   # the crash shows nothing

    s = sweeper.sweep()                      # young: a delivery could still be writing it
    assert s.reclaimed == 0 and body_rows(kv) == sorted([f"mmsg/bob/{keep_big}".encode(), *orphan_rows])
    assert s.young == len(orphan_rows) + 1

    clock.t += GRACE_S + 1
    s = sweeper.sweep()
    assert s.reclaimed == len(orphan_rows) and s.kept == 1
    assert body_rows(kv) == [f"mmsg/bob/{keep_big}".encode()]
    assert store.get_raw("bob", "Inbox", keep_big) == BIG and store.get_raw("bob", "Inbox", keep_small) == SMALL


def test_crash_mid_delete_orphan_is_reclaimed():
    kv, clock, store, sweeper = make(CrashAfter())
    gone = store.deliver("alice", "Inbox", BIG)
    kept = store.deliver("alice", "Inbox", BIG + b"2")
    crash(kv, 1, store.delete, "alice", "Inbox", gone)   # the index cell went, the body did not
    assert [m.id for m in store.list("alice", "Inbox")] == [kept]
    assert f"mmsg/alice/{gone}".encode() in body_rows(kv)
    clock.t += GRACE_S + 1
    assert sweeper.sweep().reclaimed == 1
    assert body_rows(kv) == [f"mmsg/alice/{kept}".encode()]
    assert store.get_raw("alice", "Inbox", kept) == BIG + b"2"


def test_queue_orphans_are_reclaimed_and_queued_mail_kept():
    kv, clock, store, sweeper = make(CrashAfter())
    queued = store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], BIG)
    crash(kv, 3, store.enqueue_outgoing, "alice", "alice@penncloud.local", ["y@remote.test"], BIG)
    finished = store.enqueue_outgoing("alice", "alice@penncloud.local", ["z@remote.test"], BIG)
    [_, item] = store.queue()
    crash(kv, 1, store.done, item)           # the queue cell went, the body did not
    assert [i.id for i in store.queue()] == [queued]
    assert len(body_rows(kv)) == 3
    clock.t += GRACE_S + 1
    s = sweeper.sweep()
    assert s.reclaimed == 2 and s.kept == 1
    assert body_rows(kv) == [f"mqmsg/{queued}".encode()]
    assert store.queue_raw(store.queue()[0]) == BIG and finished not in str(body_rows(kv))


def test_every_referenced_message_stays_in_every_folder():
    kv, clock, store, sweeper = make()
    inbox = [store.deliver("bob", "Inbox", BIG + b"%d" % i) for i in range(4)]
    sent = store.deliver("bob", "Sent", BIG + b"sent", read=True)
    other = store.deliver("carol", "Inbox", BIG + b"carol")
    archived = store.deliver("bob", "Inbox", BIG + b"archived")
    store.move("bob", "Inbox", "Archive", archived)            # a folder beyond Inbox and Sent
    clock.t += 10 * GRACE_S
    s = sweeper.sweep()
    assert s.reclaimed == 0 and s.kept == 7 and s.bodies == 7
    for i, mid in enumerate(inbox):
        assert store.get_raw("bob", "Inbox", mid) == BIG + b"%d" % i
    assert store.get_raw("bob", "Sent", sent) == BIG + b"sent"
    assert store.get_raw("carol", "Inbox", other) == BIG + b"carol"
    assert store.get_raw("bob", "Archive", archived) == BIG + b"archived"


def test_a_pending_bounce_under_an_old_id_is_never_swept():
    """The relay picks a bounce's id, writes it into the queue item, then delivers: maybe much later."""
    kv, clock, store, sweeper = make(CrashAfter())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], SMALL)
    [item] = store.queue()
    bounce_id = store.new_id()
    item = store.update(item, failed=(("x@remote.test", "5.1.1", "550 no"),), bounce_id=bounce_id)
    crash(kv, 2, lambda: store.deliver("alice", "Inbox", BIG, msg_id=bounce_id))   # 2 chunks, then the crash
    clock.t += 3 * GRACE_S                                           # the relay comes back much later
    s = sweeper.sweep()
    assert s.reclaimed == 0 and f"mmsg/alice/{bounce_id}".encode() in body_rows(kv)
    store.deliver("alice", "Inbox", BIG, msg_id=bounce_id)           # the retry completes the bounce
    store.update(item, failed=(), bounce_id="")
    assert sweeper.sweep().reclaimed == 0
    assert store.get_raw("alice", "Inbox", bounce_id) == BIG


def test_names_it_did_not_write_are_left_alone():
    kv, clock, store, sweeper = make()
    strangers = [b"mmsg/Alice/00000000000000000000", b"mmsg/alice/not-a-time-id", b"mmsg/al/ice/x",
                 b"mqmsg/x/y", b"mmsg/\xff\xfe", b"mmsg/alice/0123456789abcdef\n"]
    for row in strangers:
        kv.put(row, b"00000000", b"x")
    kv.put(b"mmsf/alice/0000000000000000", b"00000000", b"not a body row")
    clock.t += GRACE_S * 2
    s = sweeper.sweep()
    assert s.reclaimed == 0 and s.unknown == len(strangers)
    assert len(body_rows(kv)) == len(strangers) and kv.cols(b"mmsf/alice/0000000000000000")


# -- rounds, pages, failures ------------------------------------------------------------


def orphan(kv, store, user="dave", n=1, age_s=0.0):
    """Write `n` body rows by hand, as a crash mid-delivery leaves them, `age_s` old; their row names."""
    rows = []
    for _ in range(n):
        row = f"mmsg/{user}/{old_id(store, age_s)}".encode()
        kv.put(row, b"00000000", b"lost bytes")
        rows.append(row)
    return rows


def test_step_goes_a_page_at_a_time_and_resumes():
    kv, clock, store, sweeper = make(page_rows=2)
    kept = [store.deliver("erin", "Inbox", BIG + b"%d" % i) for i in range(5)]
    lost = orphan(kv, store, n=9)
    clock.t += GRACE_S + 1
    lister = sweeper.lister
    calls = []
    sweeper.lister = RowLister(lister.tablets, lambda *a: calls.append(a) or lister.page(*a))
    steps = 0
    while (stats := sweeper.step(budget_s=0)) is None:
        steps += 1
        assert sweeper.in_round and steps < 100
    assert not sweeper.in_round
    assert stats.reclaimed == 9 and stats.kept == 5 and stats.bodies == 14
    assert all(limit == 2 for _, _, limit in calls)
    assert steps >= 14 // 2                    # at least one step per page of bodies
    assert body_rows(kv) == sorted(f"mmsg/erin/{m}".encode() for m in kept)
    assert not set(lost) & set(body_rows(kv))


def test_an_unlistable_tablet_is_skipped_and_the_rest_swept():
    kv, clock, store, _ = make()
    lost = orphan(kv, store, n=12)
    clock.t += GRACE_S + 1
    broken = tablet_of(lost[0], TABLETS)
    base = memory_lister(kv)

    def page(tablet, after, limit):     # its mailbox rows list, its body rows do not
        if tablet == broken and not after.startswith(b"mbox/"):
            raise Unavailable("gone")
        return base.page(tablet, after, limit)
    s = MailSweeper(store, RowLister(base.tablets, page), page_rows=3).sweep()
    assert s.tablets_skipped == 1
    left = body_rows(kv)
    assert left and all(tablet_of(r, TABLETS) == broken for r in left)
    assert s.reclaimed == len(lost) - len(left)


def test_no_sweep_while_some_mailbox_rows_cannot_be_listed():
    """Without every folder row it could miss a folder that names a body: it sweeps nothing."""
    kv, clock, store, _ = make()
    orphan(kv, store, n=4)
    clock.t += GRACE_S + 1
    sweeper = MailSweeper(store, memory_lister(kv, broken={0}))
    s = sweeper.sweep()
    assert s.reclaimed == 0 and s.tablets_skipped == 1 and len(body_rows(kv)) == 4
    sweeper.lister = memory_lister(kv)
    assert sweeper.sweep().reclaimed == 4 and body_rows(kv) == []


class FlakyCols(MemoryKV):
    def __init__(self):
        super().__init__()
        self.fail = 0

    def cols(self, row):
        if self.fail:
            self.fail -= 1
            raise Unavailable("primary gone")
        return super().cols(row)


def test_a_store_error_mid_page_deletes_nothing_unchecked_and_the_next_step_resumes():
    kv, clock, store, sweeper = make(FlakyCols())
    kept = store.deliver("frank", "Inbox", BIG)
    orphan(kv, store, "frank", n=2)
    clock.t += GRACE_S + 1
    kv.fail = 1
    with pytest.raises(KVError):
        sweeper.step(budget_s=60)
    assert len(body_rows(kv)) == 3 and sweeper.in_round
    while (s := sweeper.step(budget_s=60)) is None:
        pass
    assert body_rows(kv) == [f"mmsg/frank/{kept}".encode()] and s.reclaimed == 2


def test_sweepers_race_each_other_and_live_deliveries_safely():
    kv, clock, store, _ = make()
    old_orphans = orphan(kv, store, "gina", n=20)
    old_kept = [store.deliver("gina", "Inbox", BIG + b"%d" % i) for i in range(10)]
    clock.t += GRACE_S + 1
    fresh, errors, stop = [], [], threading.Event()

    def deliverer():
        try:
            for i in range(40):
                fresh.append((store.deliver("gina", "Sent", BIG * 2 + b"%d" % i), BIG * 2 + b"%d" % i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def sweep_loop():
        try:
            sw = MailSweeper(store, memory_lister(kv), page_rows=4)
            for _ in range(30):
                if stop.is_set():
                    return
                sw.sweep()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=deliverer)] + [threading.Thread(target=sweep_loop) for _ in range(3)]
    for t in threads:
        t.start()
    threads[0].join(30)
    stop.set()
    for t in threads[1:]:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    MailSweeper(store, memory_lister(kv)).sweep()
    assert not set(old_orphans) & set(body_rows(kv))
    for i, mid in enumerate(old_kept):
        assert store.get_raw("gina", "Inbox", mid) == BIG + b"%d" % i
    for mid, raw in fresh:
        assert store.get_raw("gina", "Sent", mid) == raw


def test_a_delivery_stalled_between_body_and_index_survives_a_sweep():
    """The body is written, the delivering process stalls (a long GC, a slow store), a sweep runs."""
    kv, clock, store, sweeper = make()
    real_putnx = kv.putnx
    swept = []

    def putnx(row, col, value):
        if row.startswith(b"mbox/"):
            clock.t += 120                    # two minutes late
            swept.append(sweeper.sweep())
        real_putnx(row, col, value)
    kv.putnx = putnx
    mid = store.deliver("hank", "Inbox", BIG)
    assert swept[0].young == 1 and swept[0].reclaimed == 0
    assert store.get_raw("hank", "Inbox", mid) == BIG


# -- the relay runs it -------------------------------------------------------------------


def test_the_relay_loop_sweeps_every_interval():
    kv, clock, store, sweeper = make()
    worker = RelayWorker(store, domain="penncloud.local", worker_id="relay", clock=clock, poll_s=0.01,
                         sweeper=sweeper, sweep_every_s=300)
    turns = []
    run_once = worker.run_once
    worker.run_once = lambda: turns.append(1) or run_once()
    orphan(kv, store, n=2, age_s=GRACE_S + 1)
    stop = threading.Event()
    t = threading.Thread(target=worker.run, args=(stop,))
    t.start()
    try:
        wait_until(lambda: not body_rows(kv) and not sweeper.in_round, timeout=10, what="the first round")
        second = orphan(kv, store, n=1, age_s=GRACE_S + 1)
        seen = len(turns)
        wait_until(lambda: len(turns) > seen + 20, timeout=10, what="twenty more loop turns")
        assert body_rows(kv) == second             # not due yet: the last round ended moments ago
        clock.t += 300
        wait_until(lambda: not body_rows(kv), timeout=10, what="the next round")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def test_a_relay_without_a_lister_does_not_sweep():
    assert lister_for(MemoryKV()) is None
    kv, clock, store, _ = make()
    worker = RelayWorker(store, domain="penncloud.local", worker_id="relay", clock=clock)
    orphan(kv, store)
    clock.t += GRACE_S + 1
    assert worker.sweep_if_due() is None and len(body_rows(kv)) == 1


# -- over a real tablet server ---------------------------------------------------------------


def start_kv(procs, tmp_path):
    p = procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "kv"), "--tablets", "8"],
                    name="kvserver")
    return ServerClient(f"127.0.0.1:{p.port}")


def old_id(store, age_s):
    return "%016x%s" % (int((store.clock() - age_s) * 1e9), os.urandom(4).hex())


def test_sweep_over_a_real_tablet_server(procs, tmp_path):
    kv = start_kv(procs, tmp_path)
    store = MailStore(kv, chunk_bytes=64, inline_bytes=32)
    day = GRACE_S
    # referenced, and old: in Inbox, in Sent, small (inline), queued
    kept = {(u, f, old_id(store, 2 * day + i)): BIG + b"%d" % i
            for i, (u, f) in enumerate([("alice", "Inbox"), ("alice", "Sent"), ("bob", "Inbox")])}
    for (u, f, mid), raw in kept.items():
        store.deliver(u, f, raw, msg_id=mid)
    small = store.deliver("bob", "Inbox", SMALL, msg_id=old_id(store, 3 * day))
    qid = store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], BIG)
    # the crash, by hand: body rows with no index cell, one old and one fresh, and an old queue body
    old_orphan = f"mmsg/alice/{old_id(store, day + 60)}".encode()
    fresh_orphan = f"mmsg/alice/{store.new_id()}".encode()
    old_queue_orphan = f"mqmsg/{old_id(store, 5 * day)}".encode()
    for row in (old_orphan, fresh_orphan, old_queue_orphan):
        kv.put(row, b"00000000", b"half a message")
        kv.put(row, b"00000001", b"and the rest")

    lister = lister_for(kv)
    assert sorted(lister.tablets()) == list(range(8))
    s = MailSweeper(store, lister, page_rows=2).sweep()
    assert s.reclaimed == 2 and s.young == 2 and s.kept == 3   # young: the fresh orphan and the queued body
    assert kv.cols(old_orphan) == [] and kv.cols(old_queue_orphan) == []
    assert kv.cols(fresh_orphan) == [b"00000000", b"00000001"]
    for (u, f, mid), raw in kept.items():
        assert store.get_raw(u, f, mid) == raw
    assert store.get_raw("bob", "Inbox", small) == SMALL
    assert store.queue_raw(store.queue()[0]) == BIG and store.queue()[0].id == qid


def test_the_relay_process_sweeps_a_real_tablet_server(procs, tmp_path):
    kv = start_kv(procs, tmp_path)
    store = MailStore(kv, chunk_bytes=64, inline_bytes=32)
    kept = store.deliver("alice", "Inbox", BIG, msg_id=old_id(store, 2 * GRACE_S))
    old_orphan = f"mmsg/alice/{old_id(store, GRACE_S + 60)}".encode()
    fresh_orphan = f"mmsg/alice/{store.new_id()}".encode()
    for row in (old_orphan, fresh_orphan):
        kv.put(row, b"00000000", b"lost")
    cfg = tmp_path / "mail.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[mail]\ndomain = "penncloud.local"\n')
    procs.start("smtp", ["--config", str(cfg), "--id", "relay", "--kv-server", f"127.0.0.1:{kv.addr.split(':')[1]}"],
                name="relay")
    wait_until(lambda: kv.cols(old_orphan) == [], timeout=20, what="the relay's sweep")
    assert kv.cols(fresh_orphan) == [b"00000000"]
    assert store.get_raw("alice", "Inbox", kept) == BIG


@pytest.mark.slow
def test_sweep_over_a_replicated_cluster_after_a_primary_dies(procs, tmp_path):
    """ROWS goes to each tablet's primary (with the cluster secret); a dead one is found again via MAP."""
    from src.kvclient import ClusterClient
    from tests.clusterkit import Cluster

    cl = Cluster(procs, tmp_path, servers=3, tablets=6, replication=3, secret="sweep-secret").start_all()
    kv = ClusterClient(cl.master_addr, secret="sweep-secret", deadline=20)
    store = MailStore(kv, chunk_bytes=64, inline_bytes=32)
    kept = [store.deliver(u, "Inbox", BIG + u.encode(), msg_id=old_id(store, 2 * GRACE_S))
            for u in ("alice", "bob", "carol", "dave")]
    lost = orphan(kv, store, "alice", n=8, age_s=GRACE_S + 60)
    fresh = orphan(kv, store, "bob", n=2)
    assert len({tablet_of(r, cl.tablets) for r in lost}) > 1
    victim_tablet = tablet_of(lost[0], cl.tablets)
    before = kv.map(refresh=True)                      # the client's cached map names the victim
    victim = before.primary(victim_tablet)
    cl.kill(cl.by_addr[victim])
    wait_until(lambda: kv.master.map().primary(victim_tablet) not in (None, victim), timeout=20,
               what="a new primary")
    assert kv.map() is before                          # still the stale map: the lister must refresh it
    s = MailSweeper(store, lister_for(kv), page_rows=3).sweep()
    assert s.tablets_skipped == 0 and s.reclaimed == len(lost) and s.young == len(fresh)
    assert all(kv.cols(r) == [] for r in lost) and all(kv.cols(r) == [b"00000000"] for r in fresh)
    for u, mid in zip(("alice", "bob", "carol", "dave"), kept):
        assert store.get_raw(u, "Inbox", mid) == BIG + u.encode()


def test_webmail_send_keys_older_than_their_ttl_are_removed():
    """Each webmail send leaves a key cell in msend/<user> so that sending the
    form again completes it without duplicates; QA's soak counted 1,391
    cells after 1,391 sends. Half a day later they are of no use and go."""
    from src.mailsweep import SEND_KEY_TTL_S
    kv, clock, store, sweeper = make()
    old = [store.id_for_send_key("alice", "k%d" % i) for i in range(5)]
    clock.t += SEND_KEY_TTL_S + 1
    fresh = store.id_for_send_key("alice", "fresh")
    kv.put(b"msend/alice", b"odd", b"not an id")            # never written by us: left alone
    stats = sweeper.sweep()
    assert stats.send_keys == 5 and stats.unknown == 1
    assert sorted(kv.cols(b"msend/alice")) == [b"fresh", b"odd"]
    assert store.id_for_send_key("alice", "fresh") == fresh  # a young key still answers the same id
    assert len(set(old)) == 5


def test_a_send_retried_as_late_as_its_key_allows_writes_a_body_the_sweep_leaves_alone():
    """QA5 D-sweep-safety: a webmail send retried under its send key delivers
    under the first attempt's id, as old as the key. The key may be used
    until a round removes it (up to SEND_KEY_TTL_S plus a round's wait);
    the body such a retry writes, stalled for an hour before its index cell
    (the delivery's crash window), must still be too young to sweep. With
    the TTL equal to the grace period the sweep took it."""
    from src.mailsweep import SEND_KEY_TTL_S, SWEEP_EVERY_S
    kv, clock, store, sweeper = make(CrashAfter())
    msg_id = store.id_for_send_key("alice", "k")             # the first attempt, which failed
    clock.t += SEND_KEY_TTL_S - 1                            # a sweep round has not removed the key yet
    sweeper.sweep()
    clock.t += SWEEP_EVERY_S                                 # the form is sent again just before the next round
    assert store.id_for_send_key("alice", "k") == msg_id
    crash(kv, 6, lambda: store.deliver("bob", "Inbox", BIG, msg_id=msg_id))   # body written, no index cell
    assert body_rows(kv) == [f"mmsg/bob/{msg_id}".encode()]
    clock.t += 3600                                          # the delivery stalls that long
    assert sweeper.sweep().reclaimed == 0
    assert body_rows(kv) == [f"mmsg/bob/{msg_id}".encode()]
