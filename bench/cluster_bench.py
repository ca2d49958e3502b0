"""Replicated store benchmark: durable PUT throughput, and the failover gap.

    .venv/bin/python bench/cluster_bench.py                    # both parts (about a minute)
    .venv/bin/python bench/cluster_bench.py --seconds 5 --trials 5
    .venv/bin/python bench/cluster_bench.py --skip-failover

1. Throughput. PUT ops/s with 32 clients (separate load processes, one
   outstanding request per client: the load generator of bench/kv_bench.py),
   first against one standalone tablet server (`--standalone`, group commit
   on), then against a cluster this script starts: a master and `--servers`
   tablet servers, `--tablets` tablets, R = `--replication`. In the cluster
   each client is pinned to one primary and writes rows of that primary's
   tablets, so every PUT is logged and fsynced on R servers before its reply.
   Target (issue 3): replicated >= 60% of single-node. Also printed, from
   the servers' STATUS before and after: log records per sync (a
   replicated write is R records), which says how well writes share syncs.

2. Failover gap, `--trials` times: a writer keeps PUTting rows of one tablet;
   the tablet's primary is SIGKILLed; the gap is the time from the kill to
   the first acknowledged PUT on that tablet afterwards (the writer re-reads
   the map and retries every 10 ms). The killed server is restarted and
   re-admitted before the next trial. Target: median < 1.5 s.

Everything runs on this machine; the processes it starts are stopped at the
end and their temporary directories removed.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import shutil
import time
import zlib

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)

import kv_bench  # noqa: E402
from kv_bench import Route, _ready_line, run_cell, start_kvserver  # noqa: E402

from src import kv  # noqa: E402
from src.kvclient import OutcomeUnknown, ServerClient, Unreachable  # noqa: E402


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A master and N tablet servers on free ports, in a temp dir."""

    def __init__(self, servers: int, tablets: int, replication: int, heartbeat: float, timeout: float):
        self.tmp = tempfile.mkdtemp(prefix="clusterbench-")
        self.master_port = free_port()
        self.ports = {f"kv{i + 1}": free_port() for i in range(servers)}
        lines = [f'data_dir = "{self.tmp}/data"', "[cluster]", f"tablets = {tablets}",
                 f"replication = {replication}", f"heartbeat_interval_s = {heartbeat}",
                 f"failure_timeout_s = {timeout}", "[master]", f"port = {self.master_port}"]
        for name, port in self.ports.items():
            lines += ["[[kvserver]]", f'id = "{name}"', f"port = {port}"]
        self.config = os.path.join(self.tmp, "cluster.toml")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.procs: dict[str, subprocess.Popen] = {}
        self.master_addr = f"127.0.0.1:{self.master_port}"
        self.addr = {n: f"127.0.0.1:{p}" for n, p in self.ports.items()}
        self.by_addr = {a: n for n, a in self.addr.items()}

    def start(self, name: str) -> None:
        module = "master" if name == "master" else "kvserver"
        env = dict(os.environ, PYTHONPATH=REPO)
        log = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen([sys.executable, "-m", module, "--config", self.config, "--id", name,
                              "--log-level", "WARNING"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        holder = type("H", (), {})()
        holder.popen, holder.name, holder.tmp = p, name, self.tmp
        _ready_line(holder)
        self.procs[name] = p

    def start_all(self) -> None:
        self.start("master")
        for n in self.ports:
            self.start(n)

    def kill(self, name: str) -> None:
        p = self.procs.pop(name)
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdout.close()

    def stop(self) -> None:
        for name in list(self.procs):
            p = self.procs.pop(name)
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            p.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def map(self):
        m = ServerClient(self.master_addr, timeout=2)
        try:
            return m.map()
        finally:
            m.close()

    def wait(self, predicate, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if predicate():
                    return
            except (kv.KVError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    def serving(self, tablets: int) -> bool:
        m = self.map()
        if any(e.primary is None for e in m.entries.values()):
            return False
        for t in range(tablets):
            ServerClient(m.entries[t].primary, timeout=2).put(row_in(t, tablets, "warm"), b"c", b"x")
        return True


def row_in(tablet: int, tablets: int, prefix: str, start: int = 0) -> bytes:
    i = start
    while True:
        row = f"{prefix}{i}".encode()
        if zlib.crc32(row) % tablets == tablet:
            return row
        i += 1


def _counters(addrs) -> dict[str, int]:
    """The servers' STATUS counters, summed: data commands, syncs, loop turns."""
    total = {"ops": 0, "group_flushes": 0, "loop_turns": 0}
    for addr in addrs:
        c = ServerClient(addr, timeout=5)
        try:
            st = c.status()
        finally:
            c.close()
        for k in total:
            total[k] += int(st.get(k, 0))
    return total


def _measured(addrs, copies: int, *cell) -> tuple:
    """run_cell, plus how the servers worked meanwhile: (ops, p50, p99, errors,
    records per sync): each write is logged on `copies` servers; the syncs
    are every server's."""
    before = _counters(addrs)
    result = run_cell(*cell)
    after = _counters(addrs)
    d = {k: after[k] - before[k] for k in before}
    return (*result, d["ops"] * copies / max(1, d["group_flushes"]))


def throughput(args) -> tuple[float, float, tuple]:
    print(f"PUT, {args.clients} clients, {args.seconds:.0f}s per run, value {args.value_size} bytes", flush=True)
    single = start_kvserver(True, args.tablets)
    try:
        addr = f"127.0.0.1:{single.port}"
        s_ops, s50, s99, s_err, s_sync = _measured(
            [addr], 1, "penncloud", [Route(addr)], args.tablets, "PUT", args.clients, args.procs,
            args.seconds, args.keys, args.value_size)
    finally:
        single.stop()
    cl = LocalCluster(args.servers, args.tablets, args.replication, args.heartbeat, args.timeout)
    try:
        cl.start_all()
        cl.wait(lambda: cl.serving(args.tablets), 30, "the cluster to serve")
        routes, total = kv_bench.cluster_routes(cl.master_addr)
        c_ops, c50, c99, c_err, c_sync = _measured(
            list(cl.addr.values()), args.replication, "penncloud", routes, total, "PUT", args.clients, args.procs,
            args.seconds, args.keys, args.value_size)
    finally:
        cl.stop()
    print(f"{'system':44s} {'ops/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'records/sync':>13s}")
    print(f"{'single server (standalone, group commit)':44s} {s_ops:9.0f} {s50:8.2f} {s99:8.2f} {s_err:7d}"
          f" {s_sync:13.1f}")
    name = f"cluster: {args.servers} servers, R={args.replication}, T={args.tablets}"
    print(f"{name:44s} {c_ops:9.0f} {c50:8.2f} {c99:8.2f} {c_err:7d} {c_sync:13.1f}")
    print("(records/sync: log records one sync made durable, on average; a replicated write is R records,\n"
          " one on each server. From the servers' STATUS before and after the run.)")
    ratio = c_ops / s_ops if s_ops else float("nan")
    print(f"replicated / single = {ratio:.0%} (target >= 60%)", flush=True)
    return s_ops, c_ops, (s50, s99, c50, c99)


def failover(args) -> list[float]:
    cl = LocalCluster(args.servers, args.tablets, args.replication, args.heartbeat, args.timeout)
    gaps = []
    try:
        cl.start_all()
        cl.wait(lambda: cl.serving(args.tablets), 30, "the cluster to serve")
        for trial in range(args.trials):
            t = trial % args.tablets
            rows = [row_in(t, args.tablets, f"fo{trial}-", start=i * 1000) for i in range(20)]
            m = cl.map()
            victim = cl.by_addr[m.entries[t].primary]
            current = m.entries[t].primary
            client = ServerClient(current, timeout=2)
            client.put(rows[0], b"c", b"before")
            killed = time.monotonic()
            cl.kill(victim)
            gap = None
            i = 0
            while time.monotonic() - killed < 30:
                i += 1
                try:
                    client.put(rows[i % len(rows)], b"c", b"after%d" % i)
                    gap = time.monotonic() - killed
                    break
                except (kv.Moved, kv.Retry, Unreachable, OutcomeUnknown, kv.Unavailable, OSError):
                    pass
                try:
                    addr = cl.map().entries[t].primary
                except (kv.KVError, OSError):
                    addr = None
                if addr and addr != current:
                    client.close()
                    current = addr
                    client = ServerClient(current, timeout=2)
                time.sleep(0.01)
            client.close()
            if gap is None:
                raise RuntimeError(f"trial {trial}: no write acknowledged within 30s of the kill")
            gaps.append(gap)
            print(f"trial {trial + 1}: tablet {t}, killed {victim}, first acknowledged write after {gap:.3f}s",
                  flush=True)
            cl.start(victim)
            cl.wait(lambda: victim in {cl.by_addr.get(a) for e in [cl.map().entries[t]]
                                       for a in (e.primary, *e.secondaries)}, 30, f"{victim} re-admitted")
    finally:
        cl.stop()
    print(f"failover gap: median {statistics.median(gaps):.3f}s, min {min(gaps):.3f}s, max {max(gaps):.3f}s "
          f"over {len(gaps)} trials (target median < 1.5s; failure_timeout_s = {args.timeout})", flush=True)
    return gaps


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/cluster_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured time per throughput run (default 5)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--procs", type=int, default=2, help="load-generator processes (default 2)")
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--servers", type=int, default=3)
    p.add_argument("--tablets", type=int, default=24)
    p.add_argument("--replication", type=int, default=3)
    p.add_argument("--heartbeat", type=float, default=0.2, help="heartbeat_interval_s (default 0.2)")
    p.add_argument("--timeout", type=float, default=1.0, help="failure_timeout_s (default 1.0)")
    p.add_argument("--trials", type=int, default=5, help="failover trials (default 5)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-failover", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_failover:
        failover(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
