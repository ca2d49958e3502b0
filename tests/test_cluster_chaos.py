"""Several SIGKILLs in a row under load: random servers (primaries or not),
each restarted before the next is killed, sometimes before it has caught up.
Afterwards every acknowledged write is there and the shared cells' history
is linearizable."""

import random

import pytest

from tests.clusterkit import Cluster, Workload
from tests.harness import wait_until
from tests.linearizability import check


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_repeated_kills_and_restarts_lose_nothing(procs, tmp_path, seed):
    rng = random.Random(seed)
    cl = Cluster(procs, tmp_path, servers=4).start_all()
    wl = Workload(cl, writers=4, seed=seed, deadline=10).start()
    wait_until(lambda: wl.count >= 20, 20, what="writes before the first kill")
    for _ in range(5):
        victim = rng.choice(cl.names)
        cl.kill(victim)
        n = wl.count
        wait_until(lambda: wl.count >= n + 10, 20, what=f"writes with {victim} dead")
        cl.start(victim)
        if rng.random() < 0.5:      # sometimes let it rejoin every view first
            wait_until(lambda: cl.nodes()[victim]["state"] == "alive", 20, what=f"{victim} current")
    for name in cl.names:
        wait_until(lambda: cl.nodes()[name]["state"] == "alive", 30, what=f"{name} current")
    n = wl.count
    wait_until(lambda: wl.count >= n + 20, 20, what="writes at the end")
    wl.finish()
    assert not wl.errors, wl.errors[:3]
    wl.check_acked()
    ok, key = check(wl.history.ops)
    assert ok, f"history of {key} is not linearizable"
