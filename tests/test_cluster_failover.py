"""The replicated store under SIGKILL: primaries, secondaries, KILL/WAKE.

A real master and four tablet servers (6 tablets, 3 replicas each), started
as processes with a config in tmp_path. Writer threads run the whole time;
after the faults every acknowledged write must be readable with its exact
value, and the recorded history of the shared cells must be linearizable.
"""

import socket
import time

from kvserver.cluster import INTERNAL_COMMANDS, MASTER_INTERNAL
from src import kv
from src.kv import tablet_of
from src.kvclient import ServerClient
from src.kvproto import NEED_DATA, Error, ReplyParser, encode_request
from tests.clusterkit import Cluster, Workload, row_in
from tests.harness import wait_until
from tests.linearizability import check


def settle_and_check(cl, wl, min_more=30):
    start = wl.count
    wait_until(lambda: wl.count >= start + min_more, 20, what="writes going on after the fault")
    wl.finish()
    assert not wl.errors, wl.errors[:3]
    n = wl.check_acked()
    ok, key = check(wl.history.ops)
    assert ok, f"history of {key} is not linearizable"
    return n


def test_primary_killed_under_concurrent_writes(procs, tmp_path):
    cl = Cluster(procs, tmp_path).start_all()
    wl = Workload(cl, writers=4).start()
    wait_until(lambda: wl.count >= 40, 20, what="writes before the fault")
    t = tablet_of(wl.shared[0], cl.tablets)
    victim = cl.primary(t)
    killed_at = time.monotonic()
    cl.kill(victim)
    new = wait_until(lambda: (p := cl.primary(t)) not in (None, victim) and p, 10, what="a new primary")
    gap = time.monotonic() - killed_at
    assert new in cl.replicas(t)
    assert gap < 5.0, f"failover took {gap:.2f}s"
    settle_and_check_n = wl.count
    wait_until(lambda: wl.count >= settle_and_check_n + 30, 20, what="writes after failover")
    # the old primary comes back, catches up, and is a member again
    cl.start(victim)
    cl.wait_members(t, set(cl.replicas(t)))
    assert settle_and_check(cl, wl) > 0


def test_secondary_killed_then_rejoins(procs, tmp_path):
    cl = Cluster(procs, tmp_path).start_all()
    wl = Workload(cl, writers=3, seed=2).start()
    wait_until(lambda: wl.count >= 30, 20, what="writes before the fault")
    t = tablet_of(wl.shared[1], cl.tablets)
    primary = cl.primary(t)
    victim = [m for m in cl.members(t) if m != primary][0]
    cl.kill(victim)
    wait_until(lambda: victim not in cl.members(t), 10, what="the dead secondary leaving the view")
    assert cl.primary(t) == primary          # a secondary's death does not move the primary
    n = wl.count
    wait_until(lambda: wl.count >= n + 30, 20, what="writes without the secondary")
    cl.start(victim)
    cl.wait_members(t, set(cl.replicas(t)))
    settle_and_check(cl, wl)


def test_nodes_never_calls_a_killed_server_recovering_and_counts_members(procs, tmp_path):
    """What a student watches during a failover: NODES. A SIGKILLed server is
    `alive` until the failure timeout, then `dead`, never `recovering` (it
    is not being brought up to date: it is gone); and `secondary=` counts
    the views it is a member of, so a dead server is secondary of nothing."""
    cl = Cluster(procs, tmp_path).start_all()
    wl = Workload(cl, writers=2, seed=7).start()
    wait_until(lambda: wl.count >= 20, 20, what="writes before the fault")
    victim = cl.primary(tablet_of(wl.shared[0], cl.tablets))
    cl.kill(victim)
    seen = []

    def dead():
        state = cl.nodes()[victim]["state"]
        seen.append(state)
        return state == "dead"

    wait_until(dead, 10, what="NODES saying dead", interval=0.05)
    assert "recovering" not in seen, seen
    wait_until(lambda: all(victim not in cl.members(t) for t in range(cl.tablets)), 10,
               what="the dead server out of every view")
    nodes = cl.nodes()
    assert (nodes[victim]["primary"], nodes[victim]["secondary"]) == ("0", "0")
    views = cl.map().entries
    assert sum(int(n["secondary"]) for n in nodes.values()) == sum(len(e.secondaries) for e in views.values())
    wl.finish()
    assert not wl.errors, wl.errors[:3]
    wl.check_acked()


def test_after_a_master_restart_map_names_no_primary_it_has_not_heard_from(procs, tmp_path):
    """The master restarts while a primary is dead: for its start-up grace it
    elects nobody (servers get time to say hello), and meanwhile MAP must not
    send clients to a server NODES calls dead: its tablets show `-`."""
    cl = Cluster(procs, tmp_path).start_all()
    t = 0
    victim = cl.primary(t)
    cl.kill("master", victim)
    cl.start("master")
    end = time.monotonic() + 2.0          # well inside the grace (STARTUP_GRACE_S = 5)
    while time.monotonic() < end:
        entries = cl.map().entries
        nodes = cl.nodes()
        assert entries[t].primary is None, "MAP names the dead primary"
        for e in entries.values():
            if e.primary is not None:
                assert nodes[cl.by_addr[e.primary]]["state"] != "dead"
        time.sleep(0.1)
    assert nodes[victim]["state"] == "dead"
    cl.start(victim)
    cl.wait_serving()


def test_a_paused_master_declares_nobody_dead_when_it_resumes(procs, tmp_path):
    """Docs QA: a master paused for twice the failure timeout (SIGSTOP, a
    paused VM) declared every tablet server dead on waking, before reading
    the heartbeats waiting in its sockets: all tablets re-elected from one
    member each. Its own stillness proves nothing about the servers."""
    import os
    import signal
    cl = Cluster(procs, tmp_path).start_all()
    wl = Workload(cl, writers=2, seed=5).start()
    wait_until(lambda: wl.count >= 20, 20, what="writes before the pause")
    before = {t: e for t, e in cl.map().entries.items()}
    pid = cl.proc["master"].popen.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.0)
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.5)                        # a detector that would act has acted by now
    assert all(d["state"] == "alive" for d in cl.nodes().values()), cl.nodes()
    assert cl.map().entries == before, "tablets were re-elected after the master's pause"
    assert settle_and_check(cl, wl) > 0


def test_a_restarted_server_gets_its_primaries_back_without_aborting_writes(procs, tmp_path):
    """After a failover the survivors lead the dead server's tablets. Once it
    is back and current, each of them hands its tablet back to the server
    placed to lead it (a drained, planned change of primary), so the load
    spreads again; no write is lost or left with an unknown outcome."""
    cl = Cluster(procs, tmp_path).start_all()
    wl = Workload(cl, writers=3, seed=11).start()
    wait_until(lambda: wl.count >= 30, 20, what="writes before the fault")
    victim = cl.names[0]
    placed = [t for t in range(cl.tablets) if cl.replicas(t)[0] == victim]
    assert placed
    cl.kill(victim)
    wait_until(lambda: all(cl.primary(t) not in (None, victim) for t in placed), 10, what="failover")
    n = wl.count
    wait_until(lambda: wl.count >= n + 20, 20, what="writes after the failover")
    cl.start(victim)
    for t in placed:
        cl.wait_members(t, set(cl.replicas(t)))
    unknown_before = wl.unknown
    wait_until(lambda: all(cl.primary(t) == victim for t in placed), 20, what="primaries handed back")
    n = wl.count
    wait_until(lambda: wl.count >= n + 30, 20, what="writes after the hand-over")
    assert wl.unknown == unknown_before          # drained first: nothing aborted
    nodes = cl.nodes()
    assert sorted(int(nd["primary"]) for nd in nodes.values()) == sorted(
        sum(1 for t in range(cl.tablets) if cl.replicas(t)[0] == name) for name in cl.names)
    settle_and_check(cl, wl)


def test_kill_and_wake_go_through_the_crash_paths(procs, tmp_path):
    cl = Cluster(procs, tmp_path).start_all()
    wl = Workload(cl, writers=3, seed=3).start()
    wait_until(lambda: wl.count >= 30, 20, what="writes before KILL")
    t = tablet_of(wl.shared[2], cl.tablets)
    victim = cl.primary(t)
    admin = ServerClient(cl.addr[victim], timeout=5)
    try:
        admin.kill()
        wait_until(lambda: cl.nodes()[victim]["state"] == "killed", 5, what="NODES saying killed")
        wait_until(lambda: cl.primary(t) not in (None, victim), 10, what="failover after KILL")
        n = wl.count
        wait_until(lambda: wl.count >= n + 30, 20, what="writes after KILL")
        admin.wake()
    finally:
        admin.close()
    cl.wait_members(t, set(cl.replicas(t)))
    wait_until(lambda: cl.nodes()[victim]["state"] == "alive", 20, what="every tablet of the woken server current")
    settle_and_check(cl, wl)


def test_non_primary_answers_moved_and_master_commands(procs, tmp_path):
    cl = Cluster(procs, tmp_path).start_all()
    row = b"some row"
    t = tablet_of(row, cl.tablets)
    m = cl.master()
    try:
        assert m.ping()
        entry = m.lookup(row)
        assert entry.tablet == t and entry.primary == cl.addr[cl.primary(t)]
        assert {cl.by_addr[a] for a in entry.secondaries} == set(cl.members(t)) - {cl.primary(t)}
        nodes = cl.nodes()
        assert set(nodes) == set(cl.names) and all(n["state"] == "alive" for n in nodes.values())
        assert sum(int(n["primary"]) for n in nodes.values()) == cl.tablets
    finally:
        m.close()
    primary = cl.primary(t)
    for name in cl.names:
        if name == primary:
            continue
        s = ServerClient(cl.addr[name], timeout=5)
        try:
            try:
                s.put(row, b"c", b"v")
                raise AssertionError(f"{name} accepted a write for tablet {t} it does not lead")
            except kv.Moved as e:
                assert (e.tablet, e.addr) == (t, cl.addr[primary])
            status = s.status()
            assert status["id"] == name and status["state"] == "serving"
        finally:
            s.close()


def test_cluster_with_a_secret(procs, tmp_path):
    cl = Cluster(procs, tmp_path, secret="s3cret").start_all()
    wl = Workload(cl, writers=2, seed=7).start()
    wait_until(lambda: wl.count >= 20, 20, what="writes with a secret set")
    t = tablet_of(wl.shared[0], cl.tablets)
    victim = cl.primary(t)
    cl.kill(victim)
    wait_until(lambda: cl.primary(t) not in (None, victim), 10, what="failover with a secret set")
    cl.start(victim)
    cl.wait_members(t, set(cl.replicas(t)))
    # internal commands without AUTH are refused, on the master and on a tablet server
    for addr in (cl.master_addr, cl.addr[victim]):
        s = ServerClient(addr, timeout=5)
        try:
            r = s.request("PING")
            assert r.word == "PONG"
        finally:
            s.close()
    for addr, req in ((cl.master_addr, encode_request("BYE", "kv1", "x", commands=MASTER_INTERNAL)),
                      (cl.addr[victim], encode_request("REPLSTREAM", commands=INTERNAL_COMMANDS))):
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"".join(req))
            p = ReplyParser()
            while (ev := p.next_event()) is NEED_DATA:
                p.feed(sock.recv(4096))
            assert isinstance(ev, Error) and ev.code == "DENIED", ev
    settle_and_check(cl, wl, min_more=10)


def test_big_values_replicate_intact_and_survive_the_primary(procs, tmp_path):
    """Values bigger than a socket buffer (6 MiB) written by several clients
    at once, between small writes: the primary's loop sends what the socket
    takes and its stream thread the rest, in order. After the primary is
    SIGKILLed, the new primary has every acknowledged value, byte for byte."""
    import hashlib
    import threading
    from src.kvclient import ClusterClient
    cl = Cluster(procs, tmp_path).start_all()
    cl.wait_serving()
    t = 1
    victim = cl.primary(t)
    values = {}
    errors = []

    def writer(k):
        c = ClusterClient(cl.master_addr, deadline=30)
        try:
            for i in range(3):
                big = hashlib.sha256(b"%d-%d" % (k, i)).digest() * (6 * 1024 * 1024 // 32)
                row = row_in(t, cl.tablets, f"big{k}-{i}")
                c.put(row, b"v", big)
                c.put(row, b"small", b"after %d" % i)
                values[row] = big
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            c.close()

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for th in ts:
        th.start()
    for th in ts:
        th.join(120)
    assert not errors, errors
    assert len(values) == 9
    cl.kill(victim)
    wait_until(lambda: cl.primary(t) not in (None, victim), 15, what="a new primary")
    c = ClusterClient(cl.master_addr, deadline=30)
    try:
        for row, big in values.items():
            got = c.get(row, b"v")
            assert len(got) == len(big) and got == big, row
            assert c.get(row, b"small").startswith(b"after")
    finally:
        c.close()
