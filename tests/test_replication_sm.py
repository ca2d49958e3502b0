"""The replication state machine (kvserver/replication.py), driven by hand.

A tiny simulated cluster: every node has a TabletReplica and a log (a list of
records); the network is a list of in-flight messages that the test delivers
in the order it likes, delays, duplicates or drops. The master's decisions
come from master/placement.py. No sockets, no threads, no sleeps.
"""

import random

import pytest

from kvserver.replication import (
    HANDOVER_TICKS, Aborted, Ack, Append, AskAdmit, AskHandover, AskRemove, CatchUp, Committed, Gap, NotPrimary, NotReady, Record,
    RefreshView, Send, Snapshot, Stale, TabletReplica, View,
)
from master import placement


class Node:
    def __init__(self, name):
        self.name = name
        self.sm = TabletReplica(0, name)
        self.log: list[Record] = []          # durable records, in order

    def reboot(self):
        """A crash: memory gone, the log stays."""
        last = self.log[-1] if self.log else Record(0, 0)
        self.sm = TabletReplica(0, self.name, last_seq=last.seq, last_epoch=last.epoch)


class Net:
    """Nodes + in-flight messages + the master's view of the one tablet."""

    def __init__(self, names=("a", "b", "c")):
        self.nodes = {n: Node(n) for n in names}
        self.wire: list[tuple[str, str, object]] = []    # (src, dst, msg)
        self.committed: dict[str, int] = {n: 0 for n in names}
        self.aborted: list[int] = []
        self.acked: dict[int, object] = {}               # seq -> effect acknowledged to a client
        self.view = placement.TabletView(0, 1, names[0], tuple(names), tuple(names))
        self.requests: list[object] = []                  # AskRemove / AskAdmit / RefreshView seen

    def sv(self, v=None):
        v = v or self.view
        return View(v.tablet, v.epoch, v.primary, v.members, v.replicas)

    def tell_all(self, alive=None):
        for n in (alive or self.nodes):
            self.run(n, self.nodes[n].sm.set_view(self.sv()))

    def run(self, src, actions):
        node = self.nodes[src]
        for a in actions:
            if isinstance(a, Send):
                self.wire.append((src, a.peer, a.msg))
            elif isinstance(a, Committed):
                self.committed[src] = max(self.committed[src], a.seq)
                for r in node.log:
                    if r.seq <= a.seq:
                        self.acked.setdefault(r.seq, r)
            elif isinstance(a, Aborted):
                self.aborted += a.seqs
            elif isinstance(a, CatchUp):
                self.catch_up(src, a)
            else:
                self.requests.append((src, a))

    def catch_up(self, src, a: CatchUp):
        """What the glue does: records after the peer's last one, or a snapshot."""
        node = self.nodes[src]
        log = node.log
        sm = node.sm
        ok = a.after_seq == 0 or (a.after_seq <= len(log) and
                                  (a.after_epoch is None or log[a.after_seq - 1].epoch == a.after_epoch))
        if ok:
            recs = tuple(log[a.after_seq:])
            prev_epoch = log[a.after_seq - 1].epoch if a.after_seq else 0
            self.wire.append((src, a.peer, Append(0, sm.epoch, a.after_seq, prev_epoch, recs)))
        else:
            self.wire.append((src, a.peer, Snapshot(0, sm.epoch, len(log), log[-1].epoch if log else 0,
                                                    tuple(log))))
        last = log[-1] if log else Record(0, 0)
        self.run(src, sm.caught_up(a.peer, last.seq, last.epoch))

    def propose(self, src, effect):
        node = self.nodes[src]
        rec, actions = node.sm.propose(effect)
        node.log.append(rec)                                   # local append ...
        self.run(src, actions)
        self.run(src, node.sm.local_durable(rec.seq))          # ... durable at once here
        return rec

    def deliver(self, i=0, drop=False):
        src, dst, msg = self.wire.pop(i)
        if drop:
            return
        node = self.nodes[dst]
        if isinstance(msg, Append):
            recs, reply = node.sm.on_append(msg)
            for r in recs:
                assert r.seq == len(node.log) + 1
                node.log.append(r)
            self.wire.append((dst, src, reply))
        elif isinstance(msg, Snapshot):
            install, reply = node.sm.on_snapshot(msg)
            if install:
                node.log = list(msg.data)
            self.wire.append((dst, src, reply))
        else:
            self.run(dst, self.nodes[dst].sm.on_reply(src, msg))

    def deliver_to(self, dst):
        i = next(i for i, m in enumerate(self.wire) if m[1] == dst)
        self.deliver(i)

    def settle(self, rng=None, limit=10000):
        n = 0
        while self.wire:
            self.deliver(rng.randrange(len(self.wire)) if rng else 0)
            n += 1
            assert n < limit, "did not settle"

    def connect_all(self, primary):
        for p in self.nodes:
            if p != primary:
                self.run(primary, self.nodes[primary].sm.peer_up(p))

    def master_apply(self, nv):
        assert nv is not None
        self.view = nv


def started(names=("a", "b", "c")):
    net = Net(names)
    net.tell_all()
    net.connect_all(names[0])
    net.settle()
    assert net.nodes[names[0]].sm.ready
    return net


def test_commit_needs_every_member_and_is_in_order():
    net = started()
    a = net.nodes["a"].sm
    r1 = net.propose("a", "x=1")
    r2 = net.propose("a", "x=2")
    assert a.commit == 0 and len(net.wire) == 4
    net.deliver_to("b")                # b gets r1
    net.deliver_to("c")                # c gets r1 ... replies queued
    assert a.commit == 0
    # deliver everything but c's reply to r2
    while len(net.wire) > 0:
        src, dst, msg = net.wire[0]
        if isinstance(msg, Ack) and src == "c" and msg.seq == 2:
            break
        net.deliver(0)
    assert a.commit == 1              # c acked only r1
    net.settle()
    assert a.commit == 2 and net.committed["a"] == 2
    for n in "abc":
        assert [r.effect for r in net.nodes[n].log] == ["x=1", "x=2"]
    assert r1.seq == 1 and r2.seq == 2


def test_replica_refuses_older_epoch_so_deposed_primary_commits_nothing():
    net = started()
    old = net.nodes["a"]
    rec = net.propose("a", "lost?")
    # The master elects b (a is thought dead) before a's messages arrive.
    net.master_apply(placement.on_server_dead(net.view, "a", {"b", "c"}, {"b": (1, 0), "c": (1, 0)}))
    assert net.view.primary == "b" and net.view.epoch == 2
    net.tell_all(alive=["b", "c"])
    net.settle()                       # a's Append(epoch 1) reaches b and c: refused
    assert old.sm.commit == 0
    assert net.acked == {}
    assert all(r.seq != rec.seq or n == "a" for n in "bc" for r in net.nodes[n].log)
    # a hears of the new view: its pending write is aborted (outcome unknown)
    net.run("a", old.sm.set_view(net.sv()))
    assert rec.seq in net.aborted and not old.sm.is_primary
    with pytest.raises(NotPrimary):
        old.sm.propose("x")


def test_new_primary_serves_only_after_members_hold_its_log():
    net = started()
    net.propose("a", "w1")
    # b gets w1, c does not (a dies with it in flight to c)
    net.deliver_to("b")
    net.wire = [m for m in net.wire if m[1] != "c"]
    net.master_apply(placement.on_server_dead(net.view, "a", {"b", "c"}, {"b": (1, 1), "c": (0, 0)}))
    assert net.view.primary == "b"             # the higher (epoch, seq)
    net.wire.clear()
    net.tell_all(alive=["b", "c"])
    b = net.nodes["b"].sm
    assert b.is_primary and not b.ready
    with pytest.raises(NotReady):
        b.propose("too early")
    net.run("b", b.peer_up("c"))
    net.settle()
    assert b.ready
    assert [r.effect for r in net.nodes["c"].log] == ["w1"]


def test_divergent_tail_is_replaced_by_snapshot():
    net = started()
    net.propose("a", "w1")
    net.settle()
    net.propose("a", "only-on-a")                # never reaches b or c
    net.wire.clear()
    net.master_apply(placement.on_server_dead(net.view, "a", {"b", "c"}, {"b": (1, 1), "c": (1, 1)}))
    net.tell_all(alive=["b", "c"])
    new = net.view.primary
    net.connect_all(new)
    net.wire = [m for m in net.wire if m[1] != "a"]
    net.settle()
    net.propose(new, "w2-new")
    net.wire = [m for m in net.wire if m[1] != "a"]
    net.settle()
    # a comes back with its divergent record at seq 2
    net.nodes["a"].reboot()
    net.tell_all()
    net.run(new, net.nodes[new].sm.peer_up("a"))
    net.settle()
    assert [r.effect for r in net.nodes["a"].log] == ["w1", "w2-new"]
    assert net.nodes[new].sm.peers["a"].match == 2


@pytest.mark.parametrize("seed", range(20))
def test_random_drop_delay_reorder_converges_without_losing_acks(seed):
    rng = random.Random(seed)
    net = started()
    for i in range(30):
        net.propose("a", f"w{i}")
        for _ in range(rng.randrange(3)):
            if net.wire:
                j = rng.randrange(len(net.wire))
                net.deliver(j, drop=rng.random() < 0.15)
        if rng.random() < 0.1:
            net.run("a", net.nodes["a"].sm.tick())
    # let the network heal: deliver everything, tick until settled
    for _ in range(50):
        net.settle(rng)
        net.run("a", net.nodes["a"].sm.tick())
        if net.nodes["a"].sm.commit == 30 and not net.wire:
            break
    a = net.nodes["a"].sm
    assert a.commit == 30
    for n in "bc":
        assert [r.effect for r in net.nodes[n].log] == [f"w{i}" for i in range(30)]


def test_member_that_stops_answering_is_removed_then_writes_commit():
    net = started()
    a = net.nodes["a"].sm
    net.propose("a", "w1")
    net.wire = [m for m in net.wire if m[1] != "c"]
    net.settle()
    assert a.commit == 0
    net.run("a", a.peer_down("c"))
    asks = [r for s, r in net.requests if isinstance(r, AskRemove)]
    assert asks == [AskRemove("c", 1)]
    net.master_apply(placement.remove_member(net.view, 1, "c", "a"))
    net.run("a", a.set_view(net.sv()))
    net.settle()
    assert a.commit == 1 and net.view.members == ("a", "b")


def test_recovering_replica_is_admitted_only_when_current():
    net = started()
    net.master_apply(placement.remove_member(net.view, 1, "c", "a"))
    net.tell_all()
    for i in range(5):
        net.propose("a", f"w{i}")
    net.wire = [m for m in net.wire if m[1] != "c"]
    net.settle()
    a = net.nodes["a"].sm
    assert a.commit == 5                       # c is not a member: not waited for
    net.run("a", a.peer_up("c"))
    net.settle()
    asks = [r for s, r in net.requests if isinstance(r, AskAdmit)]
    assert asks == [AskAdmit("c", 2)]
    assert [r.effect for r in net.nodes["c"].log] == [f"w{i}" for i in range(5)]
    # From the request on, c counts for commits, even before the master answers.
    net.propose("a", "w5")
    net.wire = [m for m in net.wire if m[1] != "c"]
    net.settle()
    assert a.commit == 5
    net.master_apply(placement.admit_member(net.view, 2, "c", "a", {"a", "b", "c"}))
    net.run("a", a.set_view(net.sv()))
    net.settle()
    net.run("a", a.tick())
    net.run("a", a.tick())
    net.run("a", a.tick())
    net.settle()
    assert a.commit == 6 and net.view.members == ("a", "b", "c")


def test_stale_reply_asks_for_the_view():
    net = started()
    net.nodes["b"].sm.set_view(View(0, 5, "a", ("a", "b", "c"), ("a", "b", "c")))
    net.propose("a", "w")
    net.settle()
    assert any(isinstance(r, RefreshView) for _, r in net.requests)
    assert net.nodes["a"].sm.commit == 0


def test_duplicate_and_overlapping_appends_are_idempotent():
    sm = TabletReplica(0, "b")
    sm.set_view(View(0, 1, "a", ("a", "b"), ("a", "b")))
    r = [Record(i, 1, f"w{i}") for i in range(1, 4)]
    recs, rep = sm.on_append(Append(0, 1, 0, 0, tuple(r[:2])))
    assert recs == tuple(r[:2]) and rep == Ack(0, 1, 2)
    recs, rep = sm.on_append(Append(0, 1, 0, 0, tuple(r)))        # overlap: keeps only r3
    assert recs == (r[2],) and rep == Ack(0, 1, 3)
    recs, rep = sm.on_append(Append(0, 1, 1, 1, tuple(r[1:])))   # all held already
    assert recs == () and rep == Ack(0, 1, 3)
    recs, rep = sm.on_append(Append(0, 1, 5, 1, (Record(6, 1),)))
    assert recs == () and rep == Gap(0, 1, 3, 1)
    recs, rep = sm.on_append(Append(0, 0, 3, 1, (Record(4, 0),)))
    assert recs == () and rep == Stale(0, 1)




def test_primary_deposed_by_a_newer_primary_message_aborts_its_pending_writes():
    net = started()
    a = net.nodes["a"]
    rec = net.propose("a", "pending")
    net.wire.clear()
    recs, reply = a.sm.on_append(Append(0, 7, 0, 0, ()))      # b became primary at epoch 7
    assert not a.sm.is_primary and a.sm.epoch == 7
    assert isinstance(reply, Gap) and (reply.last_seq, reply.last_epoch) == (1, 1)
    assert a.sm.take_aborted() == [Aborted((rec.seq,))]
    assert a.sm.take_aborted() == []
    with pytest.raises(NotPrimary):
        a.sm.propose("x")


# -- hand-over: a planned change of primary ---------------------------------------------


def handover_asked(net):
    return [a for src, a in net.requests if isinstance(a, AskHandover)]


def test_handover_drains_in_flight_writes_then_asks_and_aborts_nothing():
    net = started()
    a = net.nodes["a"].sm
    r1 = net.propose("a", "w1")                  # in flight when the hand-over begins
    net.run("a", a.begin_handover("b"))
    with pytest.raises(NotReady):                # no new writes meanwhile
        a.propose("w2")
    assert handover_asked(net) == []             # w1 is not committed yet: not drained
    net.settle()
    assert a.commit == r1.seq and handover_asked(net) == [AskHandover("b", 1)]
    net.master_apply(placement.hand_over(net.view, 1, "b", "a", {"a", "b", "c"}))
    assert net.view.primary == "b" and net.view.epoch == 2 and set(net.view.members) == {"a", "b", "c"}
    net.tell_all()
    net.connect_all("b")
    net.settle()
    b = net.nodes["b"].sm
    assert b.ready and not a.is_primary and net.aborted == []
    net.propose("b", "w2")
    net.settle()
    for n in "abc":
        assert [r.effect for r in net.nodes[n].log] == ["w1", "w2"]
    assert sorted(net.acked) == [1, 2]


def test_handover_refused_or_undrained_serves_on():
    net = started()
    a = net.nodes["a"].sm
    net.run("a", a.begin_handover("b"))          # nothing in flight: asks at once
    assert handover_asked(net) == [AskHandover("b", 1)]
    # the master refuses (say the view changed meanwhile): writes go on
    assert placement.hand_over(net.view, 0, "b", "a", {"a", "b", "c"}) is None
    net.run("a", a.handover_refused())
    net.propose("a", "after refusal")
    net.settle()
    assert a.commit == 1
    # a member that never acknowledges: the hand-over gives up after HANDOVER_TICKS
    net.propose("a", "stuck")
    net.wire = [m for m in net.wire if m[1] != "c"]
    net.settle()
    net.run("a", a.begin_handover("b"))
    for _ in range(HANDOVER_TICKS):
        net.run("a", a.tick())
    net.wire = [m for m in net.wire if m[1] != "c"]
    assert a.handing_to is None and len(handover_asked(net)) == 1
    a.propose("served again")                    # raises nothing


def test_handover_only_to_a_live_member():
    v = placement.TabletView(0, 4, "a", ("a", "b"), ("c", "a", "b"))
    assert placement.hand_over(v, 4, "c", "a", {"a", "b", "c"}) is None     # c is recovering
    assert placement.hand_over(v, 4, "b", "c", {"a", "b", "c"}) is None     # not the primary asking
    assert placement.hand_over(v, 4, "b", "a", {"a"}) is None               # b is dead
    nv = placement.hand_over(v, 4, "b", "a", {"a", "b"})
    assert (nv.primary, nv.members, nv.epoch) == ("b", ("b", "a"), 5)
    sm = TabletReplica(0, "a")
    sm.set_view(View(0, 4, "a", ("a", "b"), ("c", "a", "b")))
    assert sm.begin_handover("c") == [] and sm.handing_to is None          # not a member
