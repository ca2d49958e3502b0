"""Helpers for the process tests of the replicated store (tests/test_cluster_*.py).

`Cluster` writes a config with free ports into tmp_path and starts a real
master and real tablet servers through the `procs` fixture; it SIGKILLs and
restarts them on the same data directories. `Client` is a deliberately
simple routed client for fault tests: it follows MOVED and retries RETRY and
refused connections, but NEVER resends a write whose outcome is unknown (it
reports `Unknown`), so the recorded histories say exactly what the store did.
`Workload` runs writer threads that record every operation (for the
linearizability checker) and every acknowledged write (to read back).
"""

from __future__ import annotations

import random
import threading
import time
import zlib

from src import kv
from src.kvclient import OutcomeUnknown, ServerClient, Unreachable
from tests.harness import free_port, wait_until
from tests.linearizability import History


class Unknown(Exception):
    """The write was sent but its outcome is unknown."""


def write_config(tmp_path, servers=4, tablets=6, replication=3, heartbeat=0.1, timeout=1.0, secret="",
                 checkpoint_log_bytes="64MiB"):
    lines = [f'data_dir = "{tmp_path / "data"}"', "[cluster]", f"tablets = {tablets}",
             f"replication = {replication}", f'secret = "{secret}"', f"heartbeat_interval_s = {heartbeat}",
             f"failure_timeout_s = {timeout}", "[storage]", 'memory_budget = "32MiB"',
             f'checkpoint_log_bytes = "{checkpoint_log_bytes}"',
             "[master]", f"port = {free_port()}"]
    for i in range(servers):
        lines += ["[[kvserver]]", f'id = "kv{i + 1}"', f"port = {free_port()}"]
    path = tmp_path / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class Cluster:
    def __init__(self, procs, tmp_path, servers=4, tablets=6, replication=3, **kw):
        self.procs = procs
        self.tmp_path = tmp_path
        self.tablets = tablets
        self.config = write_config(tmp_path, servers, tablets, replication, **kw)
        from src.config import load_config
        self.cfg = load_config(self.config)
        self.names = [n.id for n in self.cfg.kvservers]
        self.addr = {n.id: n.addr for n in self.cfg.kvservers}
        self.by_addr = {v: k for k, v in self.addr.items()}
        self.proc = {}
        self.master_addr = self.cfg.master.addr

    def start_all(self):
        self.start("master")
        for n in self.names:
            self.start(n)
        self.wait_serving()
        return self

    def start(self, name):
        p = self.proc.get(name)
        if p is not None:
            p.start()
            return p
        module = "master" if name == "master" else "kvserver"
        self.proc[name] = self.procs.start(module, ["--config", self.config, "--id", name], name=name)
        return self.proc[name]

    def kill(self, *names):
        for n in names:
            self.proc[n].kill()

    # -- what the master says --

    def master(self):
        return ServerClient(self.master_addr, timeout=2.0)

    def map(self):
        m = self.master()
        try:
            return m.map()
        finally:
            m.close()

    def nodes(self):
        m = self.master()
        try:
            return {d["id"]: d for d in m.nodes()}
        finally:
            m.close()

    def primary(self, tablet) -> str | None:
        e = self.map().entries[tablet]
        return self.by_addr.get(e.primary) if e.primary else None

    def members(self, tablet) -> list[str]:
        e = self.map().entries[tablet]
        out = [self.by_addr[e.primary]] if e.primary else []
        return out + [self.by_addr[a] for a in e.secondaries]

    def replicas(self, tablet) -> list[str]:
        from master.placement import initial_views
        return list(initial_views(self.names, self.tablets, self.cfg.cluster.replication)[tablet].replicas)

    def wait_serving(self, timeout=20.0, tablets=None):
        """Every tablet (or those given) has a primary that accepts a write."""
        c = Client(self.master_addr, deadline=2.0)
        try:
            for t in (range(self.tablets) if tablets is None else tablets):
                row = row_in(t, self.tablets, "probe")
                wait_until(lambda: c.put(row, b"p", b"x") is None, timeout, what=f"tablet {t} serving")
        finally:
            c.close()

    def wait_members(self, tablet, expected: set, timeout=20.0):
        wait_until(lambda: set(self.members(tablet)) == set(expected), timeout,
                   what=f"tablet {tablet} members {sorted(expected)}")


def row_in(tablet, tablets, prefix="r", start=0):
    """A row name that lives in `tablet`."""
    i = start
    while True:
        row = f"{prefix}{i}".encode()
        if zlib.crc32(row) % tablets == tablet:
            return row
        i += 1


class Client:
    """Routes each row to its tablet's primary; never resends an unknown write."""

    def __init__(self, master_addr, deadline=10.0, timeout=3.0):
        self.master = ServerClient(master_addr, timeout=timeout)
        self.deadline = deadline
        self.timeout = timeout
        self._map = None
        self._lock = threading.Lock()
        self._servers: dict[str, ServerClient] = {}

    def close(self):
        for s in list(self._servers.values()):
            s.close()
        self.master.close()

    def _server(self, addr):
        with self._lock:
            s = self._servers.get(addr)
            if s is None:
                s = self._servers[addr] = ServerClient(addr, timeout=self.timeout, pool_size=16)
            return s

    def _primary(self, row, refresh):
        if self._map is None or refresh:
            self._map = self.master.map()
        e = self._map.entries[zlib.crc32(row) % self._map.tablets]
        return e.primary

    def call(self, cmd, row, *args):
        end = time.monotonic() + self.deadline
        refresh, moved, delay = False, None, 0.01
        while True:
            try:
                addr = moved or self._primary(row, refresh)
                moved, refresh = None, False
                if addr is not None:
                    return self._server(addr).call(cmd, row, *args)
            except kv.Moved as e:
                moved = e.addr
                continue
            except OutcomeUnknown as e:
                if cmd in ("GET", "COLS"):
                    refresh = True
                else:
                    raise Unknown(str(e)) from None
            except (kv.Retry, Unreachable, kv.Unavailable, OSError):
                refresh = True
            if time.monotonic() > end:
                raise kv.Unavailable(f"{cmd}: no answer within {self.deadline}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            refresh = True

    def put(self, row, col, value):
        self.call("PUT", row, col, value)

    def get(self, row, col):
        return _value(self.call("GET", row, col))

    def cput(self, row, col, old, new):
        self.call("CPUT", row, col, old, new)


def _value(v):
    return v.data if hasattr(v, "data") else v


class Workload:
    """Writer threads: each writes its own keys (acknowledged values are
    remembered) and does PUT / CPUT / GET on a few shared cells (every
    operation is recorded in `history`)."""

    def __init__(self, cluster: Cluster, writers=4, shared_rows=3, seed=1, deadline=8.0):
        self.cluster = cluster
        self.client = Client(cluster.master_addr, deadline=deadline)
        self.writers = writers
        self.shared = [f"shared{i}".encode() for i in range(shared_rows)]
        self.acked: dict[bytes, bytes] = {}          # own rows: last acknowledged value
        self.maybe: dict[bytes, set] = {}            # own rows: values whose outcome is unknown
        self.history = History()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.count = 0
        self.errors: list[BaseException] = []
        self.unknown = 0                             # writes whose outcome the client could not tell
        self.seed = seed
        self.threads: list[threading.Thread] = []

    def start(self):
        for w in range(self.writers):
            t = threading.Thread(target=self._run, args=(w,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def finish(self, timeout=30.0):
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a writer did not stop"

    def _run(self, w):
        rng = random.Random(self.seed * 100 + w)
        c = self.client
        i = 0
        while not self.stop.is_set() and i < 100000:
            i += 1
            try:
                if rng.random() < 0.5:
                    row = b"own-%d-%d" % (w, rng.randrange(20))
                    val = b"%d.%d" % (w, i)
                    try:
                        c.put(row, b"c", val)
                    except Unknown:
                        with self.lock:
                            self.unknown += 1
                            self.maybe.setdefault(row, set()).add(val)
                        continue
                    with self.lock:
                        self.acked[row] = val
                        self.maybe[row] = set()
                        self.count += 1
                else:
                    self._shared_op(rng, w, i)
            except kv.Unavailable:
                continue
            except Exception as e:       # a bug: the test fails on it
                self.errors.append(e)
                return

    def _shared_op(self, rng, w, i):
        c = self.client
        row = rng.choice(self.shared)
        key = (row, b"c")
        kind = rng.choice(["put", "cput", "get", "get"])
        if kind == "put":
            val = b"p%d.%d" % (w, i)
            with self.history.record(key, "put", (val,)) as r:
                try:
                    c.put(row, b"c", val)
                    r.out = "ok"
                except Unknown:
                    with self.lock:
                        self.unknown += 1
                except kv.Unavailable:
                    r.skip = True     # never sent anywhere that applied it? RETRY / no primary only
        elif kind == "get":
            with self.history.record(key, "get") as r:
                try:
                    r.out = c.get(row, b"c")
                except kv.NotFound:
                    r.out = None
                except kv.Unavailable:
                    r.skip = True
        else:
            try:
                old = c.get(row, b"c")
            except (kv.NotFound, kv.Unavailable):
                return
            new = b"c%d.%d" % (w, i)
            with self.history.record(key, "cput", (old, new)) as r:
                try:
                    c.cput(row, b"c", old, new)
                    r.out = "ok"
                except kv.Mismatch:
                    r.out = "mismatch"
                except kv.NotFound:
                    r.out = "notfound"
                except Unknown:
                    with self.lock:
                        self.unknown += 1
                except kv.Unavailable:
                    r.skip = True

    def check_acked(self, client=None):
        """Every acknowledged write is readable with its exact value (or a
        later write of the same writer whose outcome was unknown)."""
        c = client or Client(self.cluster.master_addr, deadline=15.0)
        bad = []
        for row, val in sorted(self.acked.items()):
            got = c.get(row, b"c")
            if got != val and got not in self.maybe.get(row, set()):
                bad.append((row, val, got))
        assert not bad, f"acknowledged writes lost or wrong: {bad[:5]}"
        return len(self.acked)
