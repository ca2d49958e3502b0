"""The master's failure detector with a clock the test drives (no sleeps):
a master that itself stands still must not blame the servers for it, and a
master that stutters must still find a server that really went silent."""

from master.server import Master
from src.config import load_config
from tests.clusterkit import write_config


def master(tmp_path):
    m = Master(load_config(write_config(tmp_path, servers=3, tablets=6, replication=3, timeout=1.0)))
    for s in m.servers.values():
        s.heard = True
    return m


def beat(m, now, *ids):
    for sid in ids:
        m.servers[sid].last_seen = now


def run(m, start, seconds, beating):
    """The detector's passes every 50 ms for `seconds`, the `beating` servers heard every 0.2 s."""
    t = start
    while t < start + seconds - 1e-9:
        t += 0.05
        if round(t / 0.05) % 4 == 0:
            beat(m, t, *beating)
        m._detect_once(t)
    return t


def test_a_master_that_stood_still_blames_nobody(tmp_path):
    m = master(tmp_path)
    t = 1000.0
    m._last_pass = t
    beat(m, t, "kv1", "kv2", "kv3")
    t = run(m, t, 1.0, ["kv1", "kv2", "kv3"])
    t += 30.0                               # paused: nothing ran, nothing was read
    m._detect_once(t)
    assert all(s.alive for s in m.servers.values())
    beat(m, t + 0.01, "kv1", "kv2", "kv3")  # the heartbeats that waited in the sockets
    run(m, t, 2.0, ["kv1", "kv2", "kv3"])
    assert all(s.alive for s in m.servers.values())


def test_a_stuttering_master_still_finds_a_silent_server(tmp_path):
    """Gray-failure QA: after each pause the detector counted silence from
    zero again, so with pauses of 0.6 s every 0.9 s a server that had
    stopped beating was never declared dead (16 s, its tablets blocked)."""
    m = master(tmp_path)
    t = 1000.0
    m._last_pass = t
    beat(m, t, "kv1", "kv2", "kv3")
    t = run(m, t, 0.5, ["kv1", "kv2", "kv3"])
    for _ in range(8):                      # kv3 is silent from here on
        t += 0.6                            # the master stands still...
        m._detect_once(t)
        beat(m, t + 0.01, "kv1", "kv2")     # ...then reads what waited
        t = run(m, t, 0.3, ["kv1", "kv2"])  # ...and runs a little
    assert not m.servers["kv3"].alive, "a server silent for 7 s was never declared dead"
    assert m.servers["kv1"].alive and m.servers["kv2"].alive
