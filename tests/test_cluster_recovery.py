"""Recovery of the replicated store: every replica of a tablet dies, stale
replicas, a replica that missed writes, the master restarting.

Each test builds its situation on purpose with SIGKILL and restarts on the
same data directories, then checks that every acknowledged write is there
with its exact value.
"""

import itertools

import pytest

from src import kv
from tests.clusterkit import Client, Cluster, Workload, row_in
from tests.harness import wait_until
from tests.linearizability import check


def write_rows(client, tablet, tablets, prefix, n, acked):
    for i in range(n):
        row = row_in(tablet, tablets, prefix, start=i * 1000)
        val = b"%s-%d" % (prefix.encode(), i)
        client.put(row, b"c", val)
        acked[row] = val


def check_rows(client, acked):
    bad = [(r, v, client.get(r, b"c")) for r, v in sorted(acked.items())]
    bad = [b for b in bad if b[1] != b[2]]
    assert not bad, f"lost or wrong: {bad[:5]}"


def test_all_replicas_killed_then_restarted_in_every_order(procs, tmp_path):
    cl = Cluster(procs, tmp_path).start_all()
    t = 0
    reps = cl.replicas(t)
    c = Client(cl.master_addr, deadline=20)
    acked = {}
    try:
        for rnd, order in enumerate(itertools.permutations(reps)):
            write_rows(c, t, cl.tablets, f"round{rnd}", 5, acked)
            cl.kill(*reps)
            wait_until(lambda: all(cl.nodes()[n]["state"] == "dead" for n in reps), 10, what="all seen dead")
            assert cl.primary(t) is None
            members = set(cl.members(t))      # the last view: who the tablet waits for
            # The first to return serves if it was in the last view; a replica
            # that was not waits to be re-synced.
            first = [n for n in order if n in members][0]
            for name in order[:order.index(first) + 1]:
                cl.start(name)
            cl.wait_serving(tablets=[t])
            assert cl.primary(t) == first
            check_rows(c, acked)
            for name in order[order.index(first) + 1:]:
                cl.start(name)
            check_rows(c, acked)
        wait_until(lambda: set(cl.members(t)) == set(reps), 20, what="every replica back in the view")
    finally:
        c.close()


def test_stale_replica_is_never_elected(procs, tmp_path):
    cl = Cluster(procs, tmp_path).start_all()
    t = 1
    primary = cl.primary(t)
    stale = [m for m in cl.members(t) if m != primary][0]
    other = [m for m in cl.replicas(t) if m not in (primary, stale)][0]
    c = Client(cl.master_addr, deadline=10)
    acked = {}
    try:
        write_rows(c, t, cl.tablets, "before", 5, acked)
        cl.kill(stale)
        wait_until(lambda: stale not in cl.members(t), 10, what="the stale replica leaving the view")
        write_rows(c, t, cl.tablets, "missed", 5, acked)      # the stale replica misses these
        cl.kill(primary, other)
        cl.start(stale)
        # It is alive, it holds the tablet, and it must not be elected: every
        # write it missed would be lost. The tablet waits.
        wait_until(lambda: cl.nodes()[stale]["state"] in ("alive", "recovering"), 10, what="stale back")
        wait_until(lambda: cl.nodes()[primary]["state"] == "dead", 10, what="primary seen dead")
        short = Client(cl.master_addr, deadline=1.5)
        try:
            with pytest.raises(kv.Unavailable):
                short.put(row_in(t, cl.tablets, "refused"), b"c", b"x")
        finally:
            short.close()
        assert cl.primary(t) is None
        assert stale not in cl.members(t)
        # A member of the last view returns: the tablet serves, nothing is lost,
        # and the stale replica catches up and is admitted.
        cl.start(primary)
        cl.wait_serving(tablets=[t])
        check_rows(c, acked)
        cl.start(other)
        cl.wait_members(t, set(cl.replicas(t)))
        check_rows(c, acked)
    finally:
        c.close()


@pytest.mark.parametrize("catch_up", ["log", "snapshot"])
def test_replica_that_missed_writes_catches_up_and_failover_to_it_loses_nothing(procs, tmp_path, catch_up):
    # "snapshot": checkpoints every 4 KiB of log, so while the lagger is down the
    # primary's log stops reaching back to it and it must be sent the checkpoint.
    cl = Cluster(procs, tmp_path, checkpoint_log_bytes="4KiB" if catch_up == "snapshot" else "64MiB").start_all()
    t = 2
    primary = cl.primary(t)
    lagger = [m for m in cl.members(t) if m != primary][0]
    other = [m for m in cl.replicas(t) if m not in (primary, lagger)][0]
    c = Client(cl.master_addr, deadline=15)
    acked = {}
    try:
        write_rows(c, t, cl.tablets, "a", 5, acked)
        cl.kill(lagger)
        wait_until(lambda: lagger not in cl.members(t), 10, what="the lagger leaving the view")
        write_rows(c, t, cl.tablets, "b", 20, acked)          # missed while down
        if catch_up == "snapshot":
            big = b"y" * 3000                                  # several checkpoints' worth of log
            for i in range(12):
                row = row_in(t, cl.tablets, "big", start=i * 1000)
                c.put(row, b"c", big + b"%d" % i)
                acked[row] = big + b"%d" % i
        cl.start(lagger)
        cl.wait_members(t, {primary, lagger, other})          # caught up and re-admitted
        log = (cl.tmp_path / f"{primary}.log").read_text()
        snap = f"tablet {t}: sending {lagger} a snapshot"
        assert (snap in log) == (catch_up == "snapshot"), "wrong catch-up path taken"
        write_rows(c, t, cl.tablets, "c", 5, acked)
        cl.kill(primary, other)                               # only the lagger is left
        wait_until(lambda: cl.primary(t) == lagger, 10, what="failover to the former lagger")
        check_rows(c, acked)
        write_rows(c, t, cl.tablets, "d", 5, acked)
        check_rows(c, acked)
    finally:
        c.close()


def test_master_restarts_and_resumes_its_views(procs, tmp_path):
    cl = Cluster(procs, tmp_path).start_all()
    wl = Workload(cl, writers=3, seed=5, deadline=15).start()
    wait_until(lambda: wl.count >= 30, 20, what="writes before the master dies")
    before = cl.map()
    cl.kill("master")
    # While the master is down a server dies too: the restarted master must
    # notice (it starts with no heartbeats) and fail its tablets over.
    t = 3
    victim = before.entries[t].primary
    victim = cl.by_addr[victim]
    cl.kill(victim)
    cl.start("master")
    after = cl.map()
    assert after.epoch >= before.epoch            # the views came back from disk, not re-placed
    wait_until(lambda: cl.primary(t) not in (None, victim), 15, what="failover after the master restart")
    n = wl.count
    wait_until(lambda: wl.count >= n + 30, 20, what="writes after the master restart")
    cl.start(victim)
    cl.wait_members(t, set(cl.replicas(t)))
    wl.finish()
    assert not wl.errors, wl.errors[:3]
    wl.check_acked()
    ok, key = check(wl.history.ops)
    assert ok, f"history of {key} is not linearizable"
