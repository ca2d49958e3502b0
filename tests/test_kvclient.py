"""The KV clients (src/kvclient.py) against small fake servers started in the test.

`FakeTabletServer` speaks the real protocol through src/kvproto.py over a
src/server.TCPServer, keeps its data in a MemoryKV, and has fault hooks
(answer MOVED, answer RETRY n times, drop the connection before or after
applying a write). `FakeMaster` serves MAP from a list the test edits.
"""

import os
import threading
import time

import pytest

from src import kv
from src.kv import MemoryKV, tablet_of
from src.kvclient import ClusterClient, OutcomeUnknown, ServerClient, TabletMap, Unreachable, parse_map
from src.kvproto import (
    NEED_DATA, Ok, ProtocolErrorEvent, RequestParser, Value, error, error_for, listing, name_listing, ok,
    pong, value,
)
from src.server import TCPServer
from tests.harness import free_port, wait_until

WRITES = {"PUT", "PUTNX", "CPUT", "DELETE", "DELROW"}


class FakeTabletServer:
    def __init__(self, secret: str = "", store: MemoryKV | None = None):
        self.secret = secret
        self.store = store or MemoryKV()
        self.lock = threading.Lock()
        self.log: list[tuple[str, list]] = []         # every request that reached dispatch
        self.first_commands: list[str] = []           # the first command of each connection
        self.accepted = 0
        self.moved: dict[int, str] = {}               # tablet -> addr to answer MOVED with
        self.tablets = 4
        self.retry_next = 0                           # answer RETRY to this many data commands
        self.drop_before = 0                          # close without applying this many writes
        self.drop_after = 0                           # apply, then close without replying, this many writes
        self.server = TCPServer("127.0.0.1", 0, self._handle, "fake-kv").start()
        self.addr = f"127.0.0.1:{self.server.port}"

    def stop(self):
        self.server.stop()

    def _handle(self, sock, peer):
        with self.lock:
            self.accepted += 1
        parser = RequestParser()
        authed = not self.secret
        first = True
        while True:
            data = sock.recv(1 << 20)
            if not data:
                return
            parser.feed(data)
            while (ev := parser.next_event()) is not NEED_DATA:
                if isinstance(ev, ProtocolErrorEvent):
                    sock.sendall(ev.reply())
                    if ev.close:
                        return
                    continue
                with self.lock:
                    if first:
                        self.first_commands.append(ev.cmd)
                        first = False
                if ev.cmd == "AUTH":
                    authed = ev.args[0] == self.secret.encode()
                    sock.sendall(ok() if authed else error("DENIED", "bad secret"))
                    continue
                if not authed and ev.cmd in ("STATUS", "KILL", "WAKE", "ROWS", "TABLETS"):
                    sock.sendall(error("DENIED", "need AUTH"))
                    continue
                reply = self._dispatch(ev)
                if reply is None:
                    return                             # drop the connection: no reply
                sock.sendall(reply)

    def _dispatch(self, ev):
        with self.lock:
            self.log.append((ev.cmd, ev.args))
            if ev.cmd in WRITES | {"GET", "COLS"}:
                t = tablet_of(ev.args[0], self.tablets)
                if t in self.moved:
                    return error("MOVED", f"{t} {self.moved[t]}")
                if self.retry_next:
                    self.retry_next -= 1
                    return error("RETRY", "election")
                if ev.cmd in WRITES and self.drop_before:
                    self.drop_before -= 1
                    return None
                drop_after = ev.cmd in WRITES and self.drop_after > 0
                if drop_after:
                    self.drop_after -= 1
        handler = getattr(self, "cmd_" + ev.cmd, None)
        if handler is None:
            return error("BADREQ", "not served here")
        try:
            reply = handler(*ev.args)
        except kv.KVError as e:
            reply = error_for(e)
        return None if ev.cmd in WRITES and drop_after else reply

    def cmd_PING(self):
        return pong()

    def cmd_GET(self, r, c):
        return value(self.store.get(r, c))

    def cmd_PUT(self, r, c, v):
        self.store.put(r, c, v)
        return ok()

    def cmd_PUTNX(self, r, c, v):
        self.store.putnx(r, c, v)
        return ok()

    def cmd_CPUT(self, r, c, o, n):
        self.store.cput(r, c, o, n)
        return ok()

    def cmd_DELETE(self, r, c):
        self.store.delete(r, c)
        return ok()

    def cmd_DELROW(self, r):
        self.store.delrow(r)
        return ok()

    def cmd_COLS(self, r):
        return name_listing(self.store.cols(r))

    def cmd_STATUS(self):
        return listing(["id=fake", "state=serving", "keys=0"])

    def cmd_ROWS(self, tablet, after, limit):
        return name_listing([b"-", b"a b"]) if after == "-" else listing([])

    def count(self, cmd):
        with self.lock:
            return sum(1 for c, _ in self.log if c == cmd)


class FakeMaster:
    def __init__(self, tablets: int, primaries: list[str]):
        self.tablets = tablets
        self.primaries = list(primaries)       # one addr (or "-") per tablet; tests edit it
        self.epoch = 1
        self.map_requests = 0
        self.lock = threading.Lock()
        self.server = TCPServer("127.0.0.1", 0, self._handle, "fake-master").start()
        self.addr = f"127.0.0.1:{self.server.port}"

    def set_all(self, addr: str):
        with self.lock:
            self.primaries = [addr] * self.tablets
            self.epoch += 1

    def _handle(self, sock, peer):
        parser = RequestParser()
        while data := sock.recv(65536):
            parser.feed(data)
            while (ev := parser.next_event()) is not NEED_DATA:
                if isinstance(ev, ProtocolErrorEvent) or ev.cmd != "MAP":
                    sock.sendall(error("BADREQ", "fake master"))
                    continue
                with self.lock:
                    self.map_requests += 1
                    lines = [f"tablets={self.tablets} epoch={self.epoch}"]
                    lines += [f"{t} {p} -" for t, p in enumerate(self.primaries)]
                sock.sendall(listing(lines))

    def stop(self):
        self.server.stop()


@pytest.fixture
def fakes():
    made = []

    def make(cls, *a, **kw):
        f = cls(*a, **kw)
        made.append(f)
        return f

    yield make
    for f in made:
        f.stop()


def row_in_tablet(tablet: int, tablets: int = 4, prefix: str = "row") -> bytes:
    for i in range(10000):
        r = f"{prefix}{i}".encode()
        if tablet_of(r, tablets) == tablet:
            return r
    raise AssertionError("no row found")


# -- ServerClient ----------------------------------------------------------------


def test_server_client_kv_methods(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr)
    try:
        weird = b"a b%\x00\xff{5}"
        c.put(weird, "col 1", b"v\r\n1")
        assert c.get(weird, "col 1") == b"v\r\n1"
        c.putnx("r", "c", b"")
        with pytest.raises(kv.Exists):
            c.putnx("r", "c", b"x")
        with pytest.raises(kv.Mismatch):
            c.cput("r", "c", b"nope", b"x")
        c.cput("r", "c", b"", b"x")
        assert c.get("r", "c") == b"x"
        c.put("r", "b", b"y")
        assert c.cols("r") == [b"b", b"c"]
        assert c.cols(weird) == [b"col 1"]
        c.delete("r", "c")
        with pytest.raises(kv.NotFound):
            c.delete("r", "c")
        c.delrow("r")
        with pytest.raises(kv.NotFound):
            c.get("r", "b")
        with pytest.raises(kv.NotFound):
            c.delrow("r")
        assert c.ping()
        assert c.status()["state"] == "serving"
        assert c.rows(0, None, 10) == [b"-", b"a b"]
        with pytest.raises(kv.BadRequest):
            c.get("", "c")
        with pytest.raises(TypeError):
            c.put("r", "c", "not bytes")
    finally:
        c.close()


def test_pool_reuses_connections_across_threads(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr, pool_size=12)
    errors = []

    def work(i):
        try:
            for j in range(40):
                c.put(f"r{i}", f"c{j}", b"%d-%d" % (i, j))
                assert c.get(f"r{i}", f"c{j}") == b"%d-%d" % (i, j)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert s.count("PUT") == 12 * 40
    assert s.accepted <= 12                 # a connection per concurrent thread at most, not one per request
    c.close()
    assert len(c._idle) == 0
    with pytest.raises(Unreachable):
        c.ping()


def test_pool_keeps_at_most_pool_size_idle(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr, pool_size=2)
    barrier = threading.Barrier(6)

    def work():
        barrier.wait()
        for _ in range(10):
            c.ping()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(c._idle) <= 2
    wait_until(lambda: s.server.connection_count <= 2, 5, what="surplus connections closed")
    c.close()


def test_stale_pooled_connection_is_replaced(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr)
    c.put("r", "c", b"1")
    s.server.close_connections()            # the server drops idle connections (as KILL does)
    wait_until(lambda: s.server.connection_count == 0, 5, what="connections closed")
    c.put("r", "c", b"2")
    assert c.get("r", "c") == b"2"
    assert s.count("PUT") == 2
    c.close()


def test_auth_is_sent_first_when_secret_set(fakes):
    s = fakes(FakeTabletServer, secret="s3 cret")
    c = ServerClient(s.addr, secret="s3 cret")
    assert c.status()["id"] == "fake"
    c.put("r", "c", b"v")
    assert s.first_commands and all(cmd == "AUTH" for cmd in s.first_commands)
    c.close()
    bad = ServerClient(s.addr, secret="wrong")
    with pytest.raises(kv.Denied):
        bad.ping()
    bad.close()
    none = ServerClient(s.addr)
    with pytest.raises(kv.Denied):
        none.status()
    none.close()


def test_pipeline_replies_in_order(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr)
    reqs = []
    for i in range(100):
        reqs.append(("PUT", (b"r", b"c%d" % i, b"v%d" % i)))
        reqs.append(("GET", (b"r", b"c%d" % i)))
        reqs.append(("GET", (b"r", b"missing%d" % i)))
    out = c.pipeline(reqs)
    assert len(out) == 300
    for i in range(100):
        assert out[3 * i] == Ok("")
        assert out[3 * i + 1] == Value(b"v%d" % i)
        assert isinstance(out[3 * i + 2], kv.NotFound)
    assert s.accepted == 1
    c.close()


def test_big_pipeline_does_not_deadlock(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr, timeout=20)
    big = bytes(range(256)) * 1024          # 256 KiB each, 16 MiB in, 16 MiB out
    reqs = [("PUT", (b"r", b"c%d" % i, big)) for i in range(64)] + [("GET", (b"r", b"c%d" % i)) for i in range(64)]
    out = c.pipeline(reqs)
    assert out[:64] == [Ok("")] * 64
    assert all(o == Value(big) for o in out[64:])
    c.close()


def test_a_pipeline_cut_while_sending_says_which_requests_may_have_run():
    """Reader QA: when a send failed half-way, every request was reported
    Unreachable ("surely never reached the server"), also those sent whole
    before it, which the server may have run: a caller would resend them."""
    import socket
    import struct
    from src.kvproto import encode_request
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    first = encode_request("PUT", b"r", b"c", b"small")

    def server():
        conn, _ = ls.accept()
        got = b""
        while len(got) < sum(len(b) for b in first):
            got += conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()                            # a reset: the client's next sends fail
    t = threading.Thread(target=server, daemon=True)
    t.start()
    c = ServerClient(f"127.0.0.1:{ls.getsockname()[1]}", timeout=10)
    try:
        out = c.pipeline([("PUT", (b"r", b"c", b"small"))] +
                         [("PUT", (b"r", b"big%d" % i, b"x" * (4 << 20))) for i in range(4)])
    finally:
        c.close()
        ls.close()
        t.join(5)
    assert isinstance(out[0], OutcomeUnknown)
    assert isinstance(out[-1], Unreachable)     # never sent whole: cannot have run


def test_big_value_round_trip(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr)
    big = bytes(range(256)) * 4096 * 8      # 8 MiB
    c.put("big", "cell", big)
    assert c.get("big", "cell") == big
    c.close()


def test_write_broken_after_send_is_outcome_unknown_and_not_resent(fakes):
    s = fakes(FakeTabletServer)
    c = ServerClient(s.addr)
    s.drop_after = 1
    with pytest.raises(OutcomeUnknown):
        c.put("r", "c", b"v")
    assert s.count("PUT") == 1              # sent exactly once
    assert c.get("r", "c") == b"v"          # it had been applied
    c.close()


def test_connect_refused_is_unreachable():
    c = ServerClient(f"127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(Unreachable):
        c.ping()
    c.close()


def test_parse_map():
    m = parse_map([b"tablets=3 epoch=7", b"0 h:1 h:2,h:3", b"1 - -", b"2 h:2 -"])
    assert m == TabletMap(3, 7, m.entries)
    assert m.primary(0) == "h:1" and m.entries[0].secondaries == ("h:2", "h:3")
    assert m.primary(1) is None and m.primary(2) == "h:2" and m.entries[2].secondaries == ()


# -- ClusterClient ----------------------------------------------------------------


def _cluster(fakes, n_servers=2, tablets=4, **kw):
    servers = [fakes(FakeTabletServer) for _ in range(n_servers)]
    for s in servers:
        s.tablets = tablets
    master = fakes(FakeMaster, tablets, [servers[t % n_servers].addr for t in range(tablets)])
    client = ClusterClient(master.addr, **kw)
    return servers, master, client


def test_cluster_routes_rows_to_their_primary(fakes):
    (a, b), master, c = _cluster(fakes)
    try:
        for i in range(40):
            c.put(f"user{i}", "name", b"n%d" % i)
        for i in range(40):
            assert c.get(f"user{i}", "name") == b"n%d" % i
            owner = a if tablet_of(f"user{i}".encode(), 4) % 2 == 0 else b
            assert owner.store.get(f"user{i}", "name") == b"n%d" % i
        assert master.map_requests == 1     # the map is cached
    finally:
        c.close()


def test_cluster_follows_moved(fakes):
    (a, b), master, c = _cluster(fakes)
    try:
        row = row_in_tablet(0)              # the map says a
        a.moved[0] = b.addr
        c.put(row, "c", b"v")
        assert b.store.get(row, "c") == b"v"
        before = a.count("PUT")
        c.put(row, "c", b"w")               # the cache now points at b: a is not asked again
        assert a.count("PUT") == before
        assert c.get(row, "c") == b"w"
    finally:
        c.close()


def test_cluster_get_many_pipelines_and_falls_back_cell_by_cell(fakes):
    """get_many (a POP3 log-in reads every message's index cell): one
    pipeline per batch to the row's primary, absent cells left out; a cell
    answered MOVED or RETRY is read again by get, which follows the answer."""
    (a, b), master, c = _cluster(fakes)
    try:
        row = row_in_tablet(0)                          # the map says a
        cols = [b"m%04d" % i for i in range(600)]       # three batches
        for col in cols[::2]:
            a.store.put(row, col, b"v" + col)
        got = c.get_many(row, cols)
        assert got == {col: b"v" + col for col in cols[::2]}
        assert a.count("GET") == 600 and a.accepted == 1        # one connection, no round trip each
        assert MemoryKV().get_many("r", ["x"]) == {}
        a.retry_next = 1                                # the first GET of the next call: RETRY
        assert c.get_many(row, cols[:4]) == {cols[0]: b"v" + cols[0], cols[2]: b"v" + cols[2]}
        for col in cols[::2]:                           # the tablet moves to b
            b.store.put(row, col, b"w" + col)
        a.moved[0] = b.addr
        assert c.get_many(row, cols[:10]) == {col: b"w" + col for col in cols[:10:2]}
    finally:
        c.close()


def test_cluster_retries_retry_then_succeeds(fakes):
    (a, b), master, c = _cluster(fakes)
    try:
        row = row_in_tablet(0)
        a.retry_next = 3
        c.put(row, "c", b"v")
        assert a.store.get(row, "c") == b"v"
        assert a.count("PUT") == 4          # three refused, one applied
    finally:
        c.close()


def test_cluster_dead_server_then_map_refresh(fakes):
    (a, b), master, c = _cluster(fakes)
    try:
        row = row_in_tablet(0)
        c.put(row, "c", b"v1")
        a.stop()                            # the primary dies; the master moves its tablets to b
        master.set_all(b.addr)
        c.put(row, "c", b"v2")
        assert b.store.get(row, "c") == b"v2"
        assert master.map_requests >= 2
    finally:
        c.close()


def test_cluster_deadline_gives_unavailable(fakes):
    dead = f"127.0.0.1:{free_port()}"
    master = fakes(FakeMaster, 4, [dead] * 4)
    c = ClusterClient(master.addr, deadline=0.6, timeout=1)
    t0 = time.monotonic()
    with pytest.raises(kv.Unavailable) as ei:
        c.get("r", "c")
    assert not isinstance(ei.value, OutcomeUnknown)
    assert 0.6 <= time.monotonic() - t0 < 6     # kept trying until the deadline, then gave up
    c.close()


def test_cluster_no_master_gives_unavailable():
    c = ClusterClient(f"127.0.0.1:{free_port()}", deadline=0.4, timeout=1)
    with pytest.raises(kv.Unavailable):
        c.put("r", "c", b"v")
    c.close()


def test_cluster_tablet_without_primary_waits_for_one(fakes):
    (a,), master, c = _cluster(fakes, n_servers=1, deadline=5)
    try:
        master.primaries = ["-"] * 4

        def heal():                         # once the client has asked again, a primary appears
            wait_until(lambda: master.map_requests >= 3, 5, what="the client re-reading the map")
            master.set_all(a.addr)

        t = threading.Thread(target=heal)
        t.start()
        c.put("r", "c", b"v")
        t.join()
        assert a.store.get("r", "c") == b"v"
    finally:
        c.close()


def test_cluster_put_after_unknown_outcome_is_resent(fakes):
    (a,), master, c = _cluster(fakes, n_servers=1)
    try:
        a.drop_before = 1                   # the first attempt never applied
        c.put("r", "c", b"v")
        assert a.store.get("r", "c") == b"v"
        assert a.count("PUT") == 2
    finally:
        c.close()


def test_cluster_delete_and_delrow_after_unknown_outcome_succeed(fakes):
    (a,), master, c = _cluster(fakes, n_servers=1)
    try:
        c.put("r", "c", b"v")
        c.put("r2", "c", b"v")
        a.drop_after = 1                    # applied, but the reply was lost
        c.delete("r", "c")                  # the resend says NOTFOUND: reported as success
        a.drop_after = 1
        c.delrow("r2")
        assert c.cols("r") == [] and c.cols("r2") == []
        with pytest.raises(kv.NotFound):    # without an unknown outcome NOTFOUND is NOTFOUND
            c.delete("r", "c")
    finally:
        c.close()


def test_cluster_putnx_after_unknown_outcome(fakes):
    (a,), master, c = _cluster(fakes, n_servers=1)
    try:
        a.drop_after = 1
        c.putnx("r", "c", b"mine")          # created by the first attempt: success
        assert a.store.get("r", "c") == b"mine"
        with pytest.raises(kv.Exists):
            c.putnx("r", "c", b"mine")      # a plain second create is still EXISTS
        a.store.put("r", "d", b"theirs")
        a.drop_before = 1
        with pytest.raises(kv.Exists):
            c.putnx("r", "d", b"mine")      # someone else's cell: EXISTS
    finally:
        c.close()


def test_cluster_cput_after_unknown_outcome(fakes):
    (a,), master, c = _cluster(fakes, n_servers=1)
    try:
        c.put("r", "n", b"0")
        a.drop_after = 1                    # applied, reply lost: re-read shows our new value
        c.cput("r", "n", b"0", b"1")
        assert a.store.get("r", "n") == b"1"
        assert a.count("CPUT") == 1         # never blindly resent
        a.drop_before = 1                   # not applied: re-read shows old, so it is sent again
        c.cput("r", "n", b"1", b"2")
        assert a.store.get("r", "n") == b"2"
        assert a.count("CPUT") == 3
        with pytest.raises(kv.Mismatch):
            c.cput("r", "n", b"1", b"3")
    finally:
        c.close()


def test_cluster_many_threads(fakes):
    (a, b), master, c = _cluster(fakes, tablets=8, pool_size=10)
    errors = []

    def work(i):
        try:
            for j in range(30):
                c.put(f"t{i}-{j}", "c", b"%d" % j)
                if j:
                    c.cput(f"t{i}-{j}", "c", b"%d" % j, b"x")
                assert c.get(f"t{i}-{j}", "c") == (b"x" if j else b"0")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    c.close()
    assert not errors
    assert a.count("PUT") + b.count("PUT") == 300
    assert a.accepted + b.accepted <= 20


# -- against the real tablet server ------------------------------------------------


def test_server_client_against_real_kvserver(procs, tmp_path):
    p = procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "kv"),
                                 "--tablets", "4", "--secret", "adm in"], name="kv1")
    c = ServerClient(f"127.0.0.1:{p.port}", secret="adm in")
    try:
        assert c.ping()
        weird = b"r %\x00\xff-{5}"
        c.put(weird, "c", b"v\r\n")
        assert c.get(weird, "c") == b"v\r\n"
        big = bytes(range(256)) * 4096 * 8          # 8 MiB
        c.put("big", "cell", big)
        assert c.get("big", "cell") == big
        c.putnx("r", "n", b"0")
        with pytest.raises(kv.Exists):
            c.putnx("r", "n", b"0")
        c.cput("r", "n", b"0", b"1")
        with pytest.raises(kv.Mismatch):
            c.cput("r", "n", b"0", b"2")
        assert c.cols("r") == [b"n"]
        out = c.pipeline([("GET", (b"r", b"n")), ("GET", (b"r", b"x")), ("PUT", (b"r", b"x", b"y")), ("PING", ())])
        assert out[0] == Value(b"1") and isinstance(out[1], kv.NotFound) and out[2] == Ok("") and out[3].word == "PONG"
        c.delete("r", "x")
        c.delrow("r")
        with pytest.raises(kv.NotFound):
            c.get("r", "n")
        st = c.status()
        assert st["state"] == "serving" and "keys" in st
        assert len(c.tablets()) == 4
        t = tablet_of(weird, 4)
        assert weird in c.rows(t, None, 100)
        c.put("-", "c", b"dash")
        t_dash = tablet_of(b"-", 4)
        after_dash = c.rows(t_dash, b"-", 100)
        assert b"-" not in after_dash and all(r > b"-" for r in after_dash)
        with pytest.raises(kv.Denied):
            ServerClient(f"127.0.0.1:{p.port}").status()
        # KILL drops the store as a crash would; WAKE recovers it from disk.
        c.kill()
        with pytest.raises(kv.Retry):
            c.get(weird, "c")
        c.wake()
        wait_until(lambda: c.status()["state"] == "serving", 20, what="server serving after WAKE")
        assert c.get(weird, "c") == b"v\r\n" and c.get("big", "cell") == big
    finally:
        c.close()


def test_cluster_write_unknown_until_deadline_is_outcome_unknown(fakes):
    (a,), master, c = _cluster(fakes, n_servers=1, deadline=0.5)
    try:
        a.drop_after = 1000                 # every attempt applied, no reply ever
        with pytest.raises(OutcomeUnknown):
            c.put("r", "c", b"v")
        assert a.store.get("r", "c") == b"v"
    finally:
        c.close()


def test_pool_works_with_descriptors_over_1023(fakes):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip("needs a descriptor limit of at least 1200")
    s = fakes(FakeTabletServer)
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]   # push new sockets past 1023
    try:
        c = ServerClient(s.addr)
        for i in range(5):
            c.put("r", "c", b"%d" % i)
        assert c._idle[0].sock.fileno() > 1023
        assert s.accepted == 1              # the pooled connection was reused, not thrown away
        c.close()
    finally:
        for fd in filler:
            os.close(fd)


def test_sliced_wait_bounds_silence_not_a_slow_steady_reply():
    """A reply awaited in slices (the cluster client's way, asking the master
    between them) may take longer than `timeout` as a whole while bytes keep
    coming; `timeout` bounds only the silence, as a socket timeout does; and
    the wait stops as soon as `still_worth_waiting` says so."""
    import socket as _socket
    import threading as _threading
    import time as _time
    srv = _socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve():
        for mode in ("trickle", "silent", "silent"):
            try:
                conn, _ = srv.accept()
            except OSError:                        # the test is over and closed it
                return
            with conn:
                conn.recv(1024)
                if mode == "trickle":
                    conn.sendall(b"$4\r\n")
                    for ch in b"abcd":
                        _time.sleep(0.6)           # 2.4 s in all, never 1 s without a byte
                        conn.sendall(bytes([ch]))
                    conn.sendall(b"\r\n")
                else:
                    _time.sleep(3)
    t = _threading.Thread(target=serve, daemon=True)
    t.start()
    c = ServerClient("127.0.0.1:%d" % srv.getsockname()[1], timeout=1.0)
    try:
        assert c.call("GET", b"r", b"c", still_worth_waiting=lambda: True).data == b"abcd"
        t0 = _time.monotonic()
        with pytest.raises(OutcomeUnknown):       # silent for `timeout`: given up
            c.call("GET", b"r", b"c", still_worth_waiting=lambda: True)
        assert 0.9 < _time.monotonic() - t0 < 2.0
        patient = ServerClient("127.0.0.1:%d" % srv.getsockname()[1], timeout=30.0)
        asked = []
        t0 = _time.monotonic()
        with pytest.raises(OutcomeUnknown):       # called off at the second question
            patient.call("GET", b"r", b"c", still_worth_waiting=lambda: asked.append(1) or len(asked) < 2)
        assert _time.monotonic() - t0 < 2.0 and len(asked) == 2
        patient.close()
    finally:
        c.close()
        srv.close()
