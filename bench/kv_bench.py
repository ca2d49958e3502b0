"""KV store benchmark: GET, PUT and CPUT throughput and latency, against Redis.

    .venv/bin/python bench/kv_bench.py                  # the full table (about 2 minutes)
    .venv/bin/python bench/kv_bench.py --seconds 1 --clients 1,32 --ops PUT
    .venv/bin/python bench/kv_bench.py --cluster 127.0.0.1:7000   # a running cluster

What it does. It starts its own standalone tablet server
(`python -m kvserver --standalone --port 0 --data <tmpdir>`) twice, with group
commit on and off, and, when `redis-server` is on PATH, a Redis with
`--appendonly yes --appendfsync always` (every write fsynced before the
reply, as ours are). Each is driven by the same load generator: separate
PROCESSES (multiprocessing), each running several client connections from a
selector loop, one outstanding request per connection (no pipelining), for
`--seconds` per cell. A cell is one (system, operation, client count).

  PUT   each client overwrites its own keys (`--keys` of them) in turn
  GET   each client reads its own keys, written before the clock starts
  CPUT  each client increments its own counter cell: CPUT <n> <n+1>
        (Redis: the same compare-and-set as a tiny Lua script, EVALSHA)

Values are `--value-size` bytes. Ops/s counts replies received inside the
measured window; p50/p99 are per-request latencies (send to reply) in ms.

With `--cluster MASTER_ADDR` it skips starting anything and drives the
running cluster instead: it reads the master's MAP and pins each client to one
primary, choosing that client's keys among the tablets that primary owns, so
every request goes straight to the right server (no MOVED hops).

Everything it starts is stopped at the end (SIGTERM, then SIGKILL), and its
temporary directories removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from src.kv import tablet_of  # noqa: E402
from src.kvproto import NEED_DATA, Error, ReplyParser, encode_request  # noqa: E402

OPS = ("GET", "PUT", "CPUT")

# Redis has no CPUT: this script is the same compare-and-set, atomically.
CAS_SCRIPT = (b"if redis.call('GET', KEYS[1]) == ARGV[1] then "
              b"redis.call('SET', KEYS[1], ARGV[2]) return 1 else return 0 end")
CAS_SHA = hashlib.sha1(CAS_SCRIPT).hexdigest().encode()


# -- dialects: how one operation is put on the wire, and how replies are counted --


class PennDialect:
    """PennCloud's protocol (src/kvproto)."""

    name = "penncloud"

    def setup(self) -> list[bytes]:
        return []

    def put(self, key: bytes, value: bytes) -> bytes:
        return b"".join(encode_request("PUT", key, b"v", value))

    def get(self, key: bytes) -> bytes:
        return b"".join(encode_request("GET", key, b"v"))

    def cput(self, key: bytes, old: bytes, new: bytes) -> bytes:
        return b"".join(encode_request("CPUT", key, b"v", old, new))

    def parser(self):
        return _PennReplies()


class _PennReplies:
    def __init__(self):
        self.p = ReplyParser()

    def feed(self, data: bytes) -> None:
        self.p.feed(data)

    def next(self):
        """True for a success, False for an error reply, None when incomplete."""
        ev = self.p.next_event()
        if ev is NEED_DATA:
            return None
        return not isinstance(ev, Error)


def _resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out += (b"$%d\r\n" % len(p), p, b"\r\n")
    return b"".join(out)


class RespDialect:
    """Redis's RESP, just what the benchmark needs (no redis-py)."""

    name = "redis"

    def setup(self) -> list[bytes]:
        return [_resp(b"SCRIPT", b"LOAD", CAS_SCRIPT)]

    def put(self, key, value):
        return _resp(b"SET", key + b":v", value)

    def get(self, key):
        return _resp(b"GET", key + b":v")

    def cput(self, key, old, new):
        return _resp(b"EVALSHA", CAS_SHA, b"1", key + b":v", old, new)

    def parser(self):
        return _RespReplies()


class _RespReplies:
    """Counts RESP replies: +simple, -error, :integer, $bulk (no arrays needed)."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data

    def next(self):
        b = self.buf
        i = b.find(b"\r\n")
        if i < 0:
            return None
        kind = b[:1]
        if kind == b"$":
            n = int(b[1:i])
            end = i + 2 if n < 0 else i + 2 + n + 2
            if len(b) < end:
                return None
            del b[:end]
            return n >= 0
        line = bytes(b[:i])
        del b[:i + 2]
        if kind == b":":
            return line != b":0"          # CAS script: 1 applied, 0 mismatch
        if kind in (b"+", b"*"):
            return True
        return False


DIALECTS = {"penncloud": PennDialect, "redis": RespDialect}


# -- one load process ------------------------------------------------------------


@dataclass
class Route:
    """Where a client sends: an address, and the tablets whose rows it may use (None: any)."""

    addr: str
    tablets: frozenset | None = None


def client_keys(cid: int, n: int, route: Route, total_tablets: int) -> list[bytes]:
    keys, j = [], 0
    while len(keys) < n:
        k = b"bench%d-%d" % (cid, j)
        j += 1
        if route.tablets is None or tablet_of(k, total_tablets) in route.tablets:
            keys.append(k)
    return keys


class _Client:
    __slots__ = ("sock", "parser", "keys", "i", "n", "sent_at", "errors")

    def __init__(self, sock, parser, keys):
        self.sock, self.parser, self.keys = sock, parser, keys
        self.i = self.n = 0
        self.sent_at = 0.0
        self.errors = 0


def _connect(addr: str) -> socket.socket:
    host, _, port = addr.rpartition(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _roundtrip_all(c: _Client, requests: list[bytes]) -> None:
    """Send requests pipelined (set-up only, before the clock starts) and read every reply."""
    if not requests:
        return
    c.sock.sendall(b"".join(requests))
    got = 0
    while got < len(requests):
        r = c.parser.next()
        if r is None:
            data = c.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("server closed the connection during set-up")
            c.parser.feed(data)
            continue
        if r is False:
            raise RuntimeError("set-up request refused")
        got += 1


def load_process(*args):
    """A load process: put (ops, errors, latencies), or an error text, on the results queue."""
    barrier, results = args[-2], args[-1]
    try:
        results.put(_load(*args))
    except BaseException as e:  # report every failure to the parent instead of hanging it
        barrier.abort()
        results.put(f"{type(e).__name__}: {e}")


def _load(dialect_name, routes, total_tablets, op, client_ids, keys_per_client, value_size,
          seconds, barrier, results):
    """Run the clients `client_ids` for `seconds` after the barrier; return (ops, errors, latencies)."""
    dialect = DIALECTS[dialect_name]()
    value = (b"x" * value_size)
    pad = b"." * max(0, value_size - 20)
    sel = selectors.DefaultSelector()
    clients = []
    for cid in client_ids:
        route = routes[cid % len(routes)]
        keys = client_keys(cid, 1 if op == "CPUT" else keys_per_client, route, total_tablets)
        c = _Client(_connect(route.addr), dialect.parser(), keys)
        setup = list(dialect.setup())
        if op == "GET":
            setup += [dialect.put(k, value) for k in keys]
        elif op == "CPUT":
            setup.append(dialect.put(keys[0], b"%020d" % 0 + pad))
        _roundtrip_all(c, setup)
        c.sock.setblocking(False)
        sel.register(c.sock, selectors.EVENT_READ, c)
        clients.append(c)

    def request(c: _Client) -> bytes:
        if op == "PUT":
            c.i = (c.i + 1) % len(c.keys)
            return dialect.put(c.keys[c.i], value)
        if op == "GET":
            c.i = (c.i + 1) % len(c.keys)
            return dialect.get(c.keys[c.i])
        return dialect.cput(c.keys[0], b"%020d" % c.n + pad, b"%020d" % (c.n + 1) + pad)

    def send(c: _Client) -> None:
        data = request(c)
        c.sent_at = time.perf_counter()
        c.sock.setblocking(True)
        c.sock.sendall(data)
        c.sock.setblocking(False)

    barrier.wait(timeout=120)
    start = time.perf_counter()
    end = start + seconds
    lat: list[float] = []
    ops = errors = 0
    for c in clients:
        send(c)
    live = len(clients)
    while live:
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            try:
                data = c.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError("server closed a benchmark connection")
            c.parser.feed(data)
            while (r := c.parser.next()) is not None:
                now = time.perf_counter()
                if now <= end:
                    ops += 1
                    lat.append(now - c.sent_at)
                    if r:
                        c.n += 1
                    else:
                        errors += 1
                if now < end:
                    send(c)
                else:
                    sel.unregister(c.sock)
                    live -= 1
        if time.perf_counter() > end + 30:
            break                       # a server that stopped answering: report what we have
    for c in clients:
        c.sock.close()
    return ops, errors, lat


def run_cell(dialect_name, routes, total_tablets, op, clients, procs, seconds, keys, value_size):
    """One table cell: ops/s, p50 ms, p99 ms, error count."""
    nproc = max(1, min(procs, clients))
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(nproc)
    results = ctx.Queue()
    workers = []
    for w in range(nproc):
        ids = list(range(w, clients, nproc))
        p = ctx.Process(target=load_process, daemon=True,
                        args=(dialect_name, routes, total_tablets, op, ids, keys, value_size, seconds,
                              barrier, results))
        p.start()
        workers.append(p)
    total_ops = total_err = 0
    lat: list[float] = []
    try:
        for _ in workers:
            got = results.get(timeout=seconds + 180)
            if isinstance(got, str):
                raise RuntimeError(f"a load process failed: {got}")
            o, e, l_ = got
            total_ops += o
            total_err += e
            lat += l_
    finally:
        for p in workers:
            p.join(5)
            if p.is_alive():
                p.kill()
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return total_ops / seconds, pct(0.50), pct(0.99), total_err


# -- the systems under test ----------------------------------------------------------


class Started:
    """A server process this benchmark started (and must stop)."""

    def __init__(self, argv: list[str], ready, name: str, env=None):
        self.name = name
        self.tmp = tempfile.mkdtemp(prefix=f"kvbench-{name}-")
        argv = [a.replace("{tmp}", self.tmp) for a in argv]
        self.popen = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=open(os.path.join(self.tmp, "stderr.log"), "wb"),
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        self.port = ready(self)

    def stop(self):
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        if self.popen.stdout:
            self.popen.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _ready_line(proc: Started, timeout=60.0) -> int:
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.popen.stdout.fileno()
    os.set_blocking(fd, False)
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            chunk = None
        if chunk:
            buf += chunk
            for line in buf.split(b"\n"):
                if line.startswith(b"READY "):
                    return int(line.split()[1])
        elif chunk == b"" or proc.popen.poll() is not None:
            break
        time.sleep(0.02)
    raise RuntimeError(f"{proc.name} did not print READY (see {proc.tmp}/stderr.log)")


def start_kvserver(group_commit: bool, tablets: int) -> Started:
    env = dict(os.environ, PYTHONPATH=REPO)
    argv = [sys.executable, "-m", "kvserver", "--standalone", "--port", "0", "--data", "{tmp}/data",
            "--tablets", str(tablets), "--log-level", "WARNING"]
    if not group_commit:
        argv.append("--no-group-commit")
    return Started(argv, _ready_line, "kv-gc" if group_commit else "kv-nogc", env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(binary: str) -> Started:
    port = _free_port()

    def ready(proc: Started) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(_resp(b"PING"))
                    if s.recv(64).startswith(b"+PONG"):
                        return port
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start (see {proc.tmp}/stderr.log)")

    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", "{tmp}", "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--daemonize", "no", "--logfile", ""]
    return Started(argv, ready, "redis")


def cluster_routes(master_addr: str) -> tuple[list[Route], int]:
    """One route per primary of the running cluster, with the tablets it owns."""
    from src.kvclient import ServerClient
    m = ServerClient(master_addr, timeout=5).map()
    owned: dict[str, set] = {}
    for t, e in m.entries.items():
        if e.primary:
            owned.setdefault(e.primary, set()).add(t)
    if not owned:
        raise SystemExit(f"kv_bench: the cluster at {master_addr} has no live primary")
    return [Route(a, frozenset(ts)) for a, ts in sorted(owned.items())], m.tablets


# -- main -----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench/kv_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measured time per cell (default 3)")
    p.add_argument("--clients", default="1,8,32", help="client counts (default 1,8,32)")
    p.add_argument("--ops", default="GET,PUT,CPUT", help="operations (default GET,PUT,CPUT)")
    p.add_argument("--procs", type=int, default=2, help="load-generator processes per cell (default 2)")
    p.add_argument("--keys", type=int, default=200, help="keys per client for GET and PUT (default 200)")
    p.add_argument("--value-size", type=int, default=100, help="value bytes (default 100)")
    p.add_argument("--tablets", type=int, default=24, help="tablets of the standalone server (default 24)")
    p.add_argument("--systems", default="gc,nogc,redis",
                   help="which to run: gc (group commit on), nogc, redis (default all)")
    p.add_argument("--redis", default=shutil.which("redis-server") or "", help="redis-server binary")
    p.add_argument("--cluster", metavar="MASTER_ADDR", help="drive a running cluster instead (no servers started)")
    a = p.parse_args(argv)
    a.clients = [int(x) for x in a.clients.split(",")]
    a.ops = [x.strip().upper() for x in a.ops.split(",")]
    a.systems = [x.strip() for x in a.systems.split(",")]
    for op in a.ops:
        if op not in OPS:
            p.error(f"unknown op {op!r}")
    if a.value_size < 20:
        p.error("--value-size must be at least 20 (CPUT counters)")
    return a


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows: dict[tuple[str, str, int], tuple] = {}
    started: list[Started] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))

    systems: list[tuple[str, str, object]] = []   # (label, dialect, how to get routes)
    if args.cluster:
        systems.append(("cluster", "penncloud", lambda: cluster_routes(args.cluster)))
    else:
        if "gc" in args.systems:
            systems.append(("penncloud gc=on", "penncloud", ("kv", True)))
        if "nogc" in args.systems:
            systems.append(("penncloud gc=off", "penncloud", ("kv", False)))
    if "redis" in args.systems:
        if args.redis:
            systems.append(("redis fsync=always", "redis", ("redis", None)))
        else:
            print("kv_bench: redis-server not found on PATH: no Redis comparison", file=sys.stderr)

    print(f"# kv_bench: {args.seconds:g} s per cell, {args.procs} load processes, values of "
          f"{args.value_size} B, {os.cpu_count()} CPUs", flush=True)
    print(f"{'system':<20} {'op':<5} {'clients':>7} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}",
          flush=True)
    try:
        for label, dialect, how in systems:
            if callable(how):
                routes, tablets = how()
                proc = None
            else:
                kind, gc = how
                proc = start_kvserver(gc, args.tablets) if kind == "kv" else start_redis(args.redis)
                started.append(proc)
                routes, tablets = [Route(f"127.0.0.1:{proc.port}")], args.tablets
            for op in args.ops:
                for n in args.clients:
                    r = run_cell(dialect, routes, tablets, op, n, args.procs, args.seconds, args.keys,
                                 args.value_size)
                    rows[(label, op, n)] = r
                    print(f"{label:<20} {op:<5} {n:>7} {r[0]:>9.0f} {r[1]:>8.2f} {r[2]:>8.2f} {r[3]:>6}",
                          flush=True)
            if proc is not None:
                proc.stop()
                started.remove(proc)
    finally:
        for proc in started:
            proc.stop()

    report_ratios(rows, args)
    return 0


def report_ratios(rows, args):
    ours = "cluster" if args.cluster else "penncloud gc=on"
    redis = "redis fsync=always"
    lines = []
    for op in args.ops:
        for n in args.clients:
            base = rows.get((ours, op, n))
            if not base:
                continue
            parts = []
            if (redis, op, n) in rows and rows[(redis, op, n)][0]:
                parts.append(f"{base[0] / rows[(redis, op, n)][0]:6.0%} of Redis")
            if ("penncloud gc=off", op, n) in rows and rows[("penncloud gc=off", op, n)][0] and not args.cluster:
                parts.append(f"{base[0] / rows[('penncloud gc=off', op, n)][0]:5.1f}x group commit off")
            if parts:
                lines.append(f"{ours} {op:<5} {n:>3} clients: " + ", ".join(parts))
    if lines:
        print("\n# ratios")
        print("\n".join(lines))
    targets = []
    put32, get32 = rows.get((ours, "PUT", 32)), rows.get((ours, "GET", 32))
    rput, rget = rows.get((redis, "PUT", 32)), rows.get((redis, "GET", 32))
    nogc = rows.get(("penncloud gc=off", "PUT", 32))
    if put32 and rput:
        targets.append(f"PUT 32 clients >= 15% of Redis: {put32[0] / rput[0]:.0%} "
                       f"{'MET' if put32[0] >= 0.15 * rput[0] else 'NOT MET'}")
    if put32 and nogc and not args.cluster:
        targets.append(f"PUT 32 clients >= 2x group commit off: {put32[0] / nogc[0]:.1f}x "
                       f"{'MET' if put32[0] >= 2 * nogc[0] else 'NOT MET'}")
    if get32 and rget:
        targets.append(f"GET 32 clients >= 30% of Redis: {get32[0] / rget[0]:.0%} "
                       f"{'MET' if get32[0] >= 0.30 * rget[0] else 'NOT MET'}")
    if targets:
        print("\n# targets (issue 2)")
        print("\n".join(targets))


if __name__ == "__main__":
    sys.exit(main())
