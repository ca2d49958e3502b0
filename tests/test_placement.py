"""Placement and election (master/placement.py) and the master's durable state."""

import json
from collections import Counter

import pytest

from master import placement
from master.placement import TabletView
from master.state import MasterState, StateError

SERVERS = ["kv1", "kv2", "kv3", "kv4", "kv5", "kv6"]


@pytest.mark.parametrize("n,t,r", [(6, 24, 3), (4, 6, 3), (5, 6, 3), (3, 24, 3), (1, 4, 1), (7, 50, 2)])
def test_initial_placement_spreads_primaries_and_replicas(n, t, r):
    servers = SERVERS[:n] if n <= 6 else [f"s{i}" for i in range(n)]
    views = placement.initial_views(servers, t, r)
    assert sorted(views) == list(range(t))
    for v in views.values():
        assert len(set(v.replicas)) == r and v.members == v.replicas and v.primary == v.replicas[0]
        assert v.epoch == 1
    prim = Counter(v.primary for v in views.values())
    reps = Counter(s for v in views.values() for s in v.replicas)
    assert max(prim.values()) - min(prim.get(s, 0) for s in servers) <= 1
    assert max(reps.values()) - min(reps.get(s, 0) for s in servers) <= 1


def test_primaries_of_a_dead_server_move_to_several_servers():
    views = placement.initial_views(SERVERS, 24, 3)
    alive = set(SERVERS) - {"kv1"}
    new = [placement.on_server_dead(v, "kv1", alive, {}) for v in views.values() if v.primary == "kv1"]
    assert len({v.primary for v in new}) >= 2
    assert all(v.primary != "kv1" and v.epoch == 2 and "kv1" not in v.members for v in new)


def test_election_picks_highest_member_and_never_a_non_member():
    v = TabletView(0, 4, "a", ("a", "b"), ("a", "b", "c"))
    reports = {"b": (4, 10), "c": (4, 99)}
    nv = placement.on_server_dead(v, "a", {"b", "c"}, reports)
    assert nv.primary == "b" and nv.epoch == 5 and nv.members == ("b",)
    nv2 = placement.on_server_dead(nv, "b", {"c"}, reports)        # the tablet waits
    assert nv2.primary is None and nv2.members == ("b",)
    assert placement.on_server_alive(nv2, "c", {"c"}, reports) == nv2
    assert placement.on_server_restarted(nv2, "c", {"c"}, reports) == nv2
    nv3 = placement.on_server_restarted(nv2, "b", {"b", "c"}, reports)
    assert nv3.primary == "b" and nv3.epoch == 6 and nv3.members == ("b",)


def test_election_prefers_higher_epoch_over_longer_log():
    v = TabletView(0, 7, "a", ("a", "b", "c"), ("a", "b", "c"))
    nv = placement.on_server_dead(v, "a", {"b", "c"}, {"b": (6, 100), "c": (7, 50)})
    assert nv.primary == "c" and nv.members == ("c", "b")


def test_dead_secondary_is_dropped_only_while_the_primary_lives():
    v = TabletView(0, 1, "a", ("a", "b", "c"), ("a", "b", "c"))
    nv = placement.on_server_dead(v, "c", {"a", "b"}, {})
    assert nv.members == ("a", "b") and nv.epoch == 2
    # every replica dies: the members are kept (they are who the tablet waits for)
    w = placement.on_server_dead(v, "a", set(), {})
    assert w.primary is None and w.members == v.members
    assert placement.on_server_dead(w, "b", set(), {}) == w


def test_restarted_primary_gets_a_new_epoch():
    v = TabletView(0, 3, "a", ("a", "b"), ("a", "b", "c"))
    nv = placement.on_server_restarted(v, "a", {"a", "b"}, {"a": (3, 5), "b": (3, 5)})
    assert nv.epoch == 4 and nv.primary in ("a", "b")
    # a restarted non-primary member changes nothing here (the primary re-syncs it)
    assert placement.on_server_restarted(v, "b", {"a", "b"}, {}) == v


def test_view_changes_are_compare_and_set_on_epoch_and_primary():
    v = TabletView(0, 3, "a", ("a", "b"), ("a", "b", "c"))
    assert placement.remove_member(v, 2, "b", "a") is None          # old epoch
    assert placement.remove_member(v, 3, "b", "b") is None          # not the primary
    assert placement.remove_member(v, 3, "a", "a") is None          # itself
    r = placement.remove_member(v, 3, "b", "a")
    assert r.members == ("a",) and r.epoch == 4
    assert placement.admit_member(v, 3, "c", "a", {"a"}) is None    # c not alive
    assert placement.admit_member(v, 3, "x", "a", {"a", "x"}) is None   # not a replica
    ad = placement.admit_member(v, 3, "c", "a", {"a", "b", "c"})
    assert ad.members == ("a", "b", "c") and ad.epoch == 4


def test_state_round_trip_and_mismatch(tmp_path):
    st = MasterState(str(tmp_path / "m"))
    assert st.load(6, 3, SERVERS[:4]) is None
    views = placement.initial_views(SERVERS[:4], 6, 3)
    views[2] = TabletView(2, 9, None, ("kv3",), views[2].replicas)
    st.save(6, 3, SERVERS[:4], views, {"kv1": "boot1"})
    got, boots = st.load(6, 3, SERVERS[:4])
    assert got == views and boots == {"kv1": "boot1"}
    assert not (tmp_path / "m" / "state.json.tmp").exists()
    with pytest.raises(StateError):
        st.load(24, 3, SERVERS[:4])
    (tmp_path / "m" / "state.json").write_text("{not json")
    with pytest.raises(StateError):
        st.load(6, 3, SERVERS[:4])
    raw = {"version": 1, "tablets": 6, "replication": 3, "servers": SERVERS[:4], "views": []}
    (tmp_path / "m" / "state.json").write_text(json.dumps(raw))
    with pytest.raises(StateError):
        st.load(6, 3, SERVERS[:4])


def test_a_late_member_is_kept_but_not_elected():
    # P dies while S1 is late (maybe dying too): nobody is elected yet, nobody dropped.
    v = TabletView(0, 5, "p", ("p", "s1", "s2"), ("p", "s1", "s2"))
    w = placement.on_server_dead(v, "p", set(), {}, presumed={"s1", "s2"})
    assert w.primary is None and w.members == v.members and w.epoch == 5
    # s1 turns out dead as well: s2 (a member) is still who the tablet waits for
    w2 = placement.on_server_dead(w, "s1", set(), {}, presumed={"s2"})
    assert w2 == w
    # s2 is heard from: elected; the late s1 stays a member only while presumed
    w3 = placement.on_server_alive(w2, "s2", {"s2"}, {}, presumed={"s1"})
    assert w3.primary == "s2" and w3.members == ("s2", "s1") and w3.epoch == 6
    w4 = placement.on_server_alive(w2, "s2", {"s2"}, {})
    assert w4.members == ("s2",)
