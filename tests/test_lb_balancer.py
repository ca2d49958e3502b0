"""The LB's pure policy: liveness by heartbeat age, round robin, least loaded, enable/disable."""

import pytest

from lb.balancer import Balancer, UnknownFrontend
from src.config import Node

FES = [Node("fe1", "127.0.0.1", 8081), Node("fe2", "127.0.0.1", 8082), Node("fe3", "127.0.0.1", 8083)]


def beat_all(b, now, loads=(0, 0, 0)):
    for n, load in zip(FES, loads):
        b.heartbeat(n.id, n.port, load, now)


def picks(b, now, count):
    return [(fe.id if fe else None) for fe in (b.choose(now) for _ in range(count))]


def test_nobody_is_live_before_a_heartbeat():
    b = Balancer(FES)
    assert b.choose(0.0) is None
    assert [s["live"] for s in b.snapshot(0.0)] == [False, False, False]


def test_round_robin_order():
    b = Balancer(FES, "round_robin", 3.0)
    beat_all(b, 0.0)
    assert picks(b, 0.5, 7) == ["fe1", "fe2", "fe3", "fe1", "fe2", "fe3", "fe1"]


def test_round_robin_skips_dead_and_rejoins():
    b = Balancer(FES, "round_robin", 3.0)
    beat_all(b, 0.0)
    b.heartbeat("fe1", 8081, 0, 2.0)
    b.heartbeat("fe3", 8083, 0, 2.0)
    # at 3.5 fe2's last beat (0.0) is 3.5 s old: out
    assert picks(b, 3.5, 4) == ["fe1", "fe3", "fe1", "fe3"]
    b.heartbeat("fe2", 8082, 0, 3.6)
    assert picks(b, 3.7, 3) == ["fe1", "fe2", "fe3"]  # after fe3 comes fe1, then fe2 again


def test_timeout_is_exact():
    b = Balancer(FES[:1], "round_robin", 3.0)
    b.heartbeat("fe1", 8081, 0, 10.0)
    assert b.choose(12.99).id == "fe1"
    assert b.choose(13.0) is None


def test_least_loaded_picks_lowest():
    b = Balancer(FES, "least_loaded", 3.0)
    beat_all(b, 0.0, loads=(5, 1, 3))
    assert b.choose(0.1).id == "fe2"


def test_least_loaded_spreads_a_burst_between_heartbeats():
    b = Balancer(FES, "least_loaded", 3.0)
    beat_all(b, 0.0, loads=(4, 0, 2))
    got = picks(b, 0.1, 6)
    # fe2 takes visitors until its estimate (0 + sent) reaches fe3's 2, then they alternate
    assert got[:2] == ["fe2", "fe2"]
    assert got.count("fe1") == 0 and sorted(set(got)) == ["fe2", "fe3"]
    # a heartbeat resets the estimate to the reported load
    b.heartbeat("fe1", 8081, 0, 0.2)
    assert b.choose(0.3).id == "fe1"


def test_least_loaded_ties_rotate():
    b = Balancer(FES, "least_loaded", 3.0)
    beat_all(b, 0.0, loads=(1, 1, 1))
    assert picks(b, 0.1, 3) == ["fe1", "fe2", "fe3"]


def test_disabled_gets_no_new_visitors_and_can_come_back():
    b = Balancer(FES, "round_robin", 3.0, disabled={"fe3"})
    beat_all(b, 0.0)
    assert "fe3" not in picks(b, 0.1, 6)
    b.set_enabled("fe3", True)
    b.set_enabled("fe1", False)
    assert set(picks(b, 0.2, 6)) == {"fe2", "fe3"}
    assert b.disabled_ids() == ["fe1"]
    assert [s["state"] for s in b.snapshot(0.3)] == ["disabled", "up", "up"]


def test_mark_failed_until_next_heartbeat():
    b = Balancer(FES, "round_robin", 3.0)
    beat_all(b, 0.0)
    b.mark_failed("fe2")
    assert "fe2" not in picks(b, 0.1, 4)
    b.heartbeat("fe2", 8082, 0, 0.2)
    assert "fe2" in picks(b, 0.3, 3)


def test_exclude_and_none_when_all_excluded():
    b = Balancer(FES, "round_robin", 3.0)
    beat_all(b, 0.0)
    assert b.choose(0.1, exclude={"fe1", "fe2"}).id == "fe3"
    assert b.choose(0.1, exclude={"fe1", "fe2", "fe3"}) is None


def test_heartbeat_port_is_taken_host_is_not():
    b = Balancer([Node("fe1", "10.0.0.5", 0)])
    assert b.choose(0.0) is None  # port 0 in the config: unknown until it beats
    fe = b.heartbeat("fe1", 45678, 2, 0.0)
    assert fe.addr == "10.0.0.5:45678"
    assert b.choose(0.1).addr == "10.0.0.5:45678"


def test_unknown_frontend_and_bad_input():
    b = Balancer(FES)
    with pytest.raises(UnknownFrontend):
        b.heartbeat("evil", 80, 0, 0.0)
    with pytest.raises(UnknownFrontend):
        b.set_enabled("evil", False)
    with pytest.raises(ValueError):
        b.heartbeat("fe1", 0, 0, 0.0)
    with pytest.raises(ValueError):
        Balancer(FES, "random")
