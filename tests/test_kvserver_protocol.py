"""The tablet server over real sockets: every command, and bad input that must
get the documented error without hurting the server or other clients."""

import os
import random
import select
import socket
import threading
import time

import pytest

from src.kv import Denied, Exists, Mismatch, NotFound, tablet_of
from src.kvclient import ServerClient
from tests.harness import ProcSet

TABLETS = 4
MAX_CELL = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kvproto")
    ps = ProcSet(tmp)
    try:
        p = ps.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp / "data"),
                                  "--tablets", str(TABLETS), "--max-cell-bytes", str(MAX_CELL)], name="kv")
        yield p
    finally:
        ps.cleanup()


@pytest.fixture
def kv(server):
    c = ServerClient(f"127.0.0.1:{server.port}", timeout=10)
    yield c
    c.close()


class Raw:
    """A raw connection: send bytes, read reply lines."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)
        return self

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            d = self.sock.recv(65536)
            if not d:
                raise ConnectionError(f"closed; have {self.buf!r}")
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            d = self.sock.recv(1 << 20)
            if not d:
                raise ConnectionError("closed")
            self.buf += d
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def closed(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


@pytest.fixture
def raw(server):
    conns = []

    def make():
        c = Raw(server.port)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


def alive(server):
    c = Raw(server.port)
    try:
        return c.send(b"PING\r\n").line() == b"+PONG"
    finally:
        c.close()


def test_the_session_by_hand(raw):
    c = raw()
    c.send(b"PUT alice greeting hello%20world\r\n")
    assert c.line() == b"+OK"
    c.send(b"GET alice greeting\r\n")
    assert c.line() == b"$11" and c.line() == b"hello world"
    c.send(b"CPUT alice greeting hello%20world bye\r\nPUT alice photo {5}\r\n\x00\x01\r\n\xff\r\n")
    assert c.line() == b"+OK" and c.line() == b"+OK"
    c.send(b"cols alice\r\n")
    assert [c.line() for _ in range(3)] == [b"*2", b"greeting", b"photo"]
    c.send(b"GET alice photo\r\n")
    assert c.line() == b"$5" and c.exactly(7) == b"\x00\x01\r\n\xff\r\n"
    c.send(b"GET nobody x\r\n\r\n  \t \r\nPING\nQUIT\r\n")
    assert [c.line() for _ in range(3)] == [b"-ERR NOTFOUND", b"+PONG", b"+OK bye"]
    assert c.closed()


def test_data_commands(kv):
    kv.put(b"r1", b"a", b"1")
    with pytest.raises(Exists):
        kv.putnx(b"r1", b"a", b"2")
    kv.putnx(b"r1", b"b", b"")
    assert kv.get(b"r1", b"b") == b""
    with pytest.raises(Mismatch):
        kv.cput(b"r1", b"a", b"x", b"y")
    with pytest.raises(NotFound):
        kv.cput(b"r1", b"zz", b"x", b"y")
    kv.cput(b"r1", b"a", b"1", b"3")
    assert kv.get(b"r1", b"a") == b"3"
    assert kv.cols(b"r1") == [b"a", b"b"]
    with pytest.raises(NotFound):
        kv.delete(b"r1", b"nope")
    kv.delete(b"r1", b"a")
    kv.delete(b"r1", b"b")                     # the last column: the row is gone
    assert kv.cols(b"r1") == []
    assert b"r1" not in kv.rows(tablet_of(b"r1", TABLETS), None, 1000)
    with pytest.raises(NotFound):
        kv.delrow(b"r1")
    kv.put(b"r2", b"x", b"1")
    kv.put(b"r2", b"y", b"2")
    kv.delrow(b"r2")
    assert kv.cols(b"r2") == []
    with pytest.raises(NotFound):
        kv.get(b"r2", b"x")


def test_binary_names_round_trip(kv):
    row, col = bytes(range(1, 256)), b"% +\x00\r\n"
    kv.put(row, col, b"v")
    assert kv.get(row, col) == b"v"
    assert kv.cols(row) == [col]


def test_rows_pagination(kv, raw):
    names = sorted({b"page/%03d" % i for i in range(200)} | {b"-"})
    for n in names:
        kv.put(n, b"c", b"v")
    for t in range(TABLETS):
        want = sorted(n for n in names if tablet_of(n, TABLETS) == t)
        got, after = [], None
        while True:
            page = kv.rows(t, after, 7)
            got += page
            if len(page) < 7:
                break
            after = page[-1]
        assert [g for g in got if g in want] == want
    c = raw()
    t = tablet_of(b"-", TABLETS)
    c.send(b"ROWS %d - 1000\r\n" % t)
    n = int(c.line()[1:])
    assert b"%2D" in [c.line() for _ in range(n)]      # a row named '-' is sent escaped
    for bad in (b"ROWS 99 - 5", b"ROWS x - 5", b"ROWS 0 - -1", b"ROWS 0 - many", b"ROWS 0 %zz 5"):
        c.send(bad + b"\r\n")
        assert c.line().startswith(b"-ERR BADREQ"), bad


def test_status_and_tablets(kv):
    kv.put(b"st", b"c", b"v")
    s = kv.status()
    for key in ("id", "state", "tablets", "keys", "disk_bytes", "log_records", "ops"):
        assert key in s
    assert s["state"] == "serving"
    assert s["tablets"] == ",".join(f"{t}:primary" for t in range(TABLETS))
    assert int(s["keys"]) >= 1 and int(s["disk_bytes"]) > 0 and int(s["ops"]) >= 1
    lines = kv.tablets()
    assert len(lines) == TABLETS and lines[0].startswith("0 primary rows=")


def test_pipelined_requests_answered_in_order(raw):
    c = raw()
    c.send(b"".join(b"PUT pipe c%d %d\r\n" % (i, i) for i in range(200))
           + b"".join(b"GET pipe c%d\r\n" % i for i in range(200)))
    assert all(c.line() == b"+OK" for _ in range(200))
    for i in range(200):
        assert c.line() == b"$%d" % len(b"%d" % i) and c.line() == b"%d" % i


@pytest.mark.parametrize("request_bytes,reply", [
    (b"FROB x y\r\n", b"-ERR BADREQ unknown command"),
    (b"GET onlyrow\r\n", b"-ERR BADREQ wrong number of arguments"),
    (b"PUT a b c d\r\n", b"-ERR BADREQ wrong number of arguments"),
    (b"PUT a b {abc}\r\n", b"-ERR BADREQ bad literal"),
    (b"PUT a b {-1}\r\n", b"-ERR BADREQ bad literal"),
    (b"GET a%zz b\r\n", b"-ERR BADREQ bad percent escape"),
    (b"PUT a b val%4\r\n", b"-ERR BADREQ bad percent escape"),
    (b"GET " + b"x" * 4097 + b" c\r\n", b"-ERR BADREQ name must be 1 to 4096"),
    (b"STATUS extra\r\n", b"-ERR BADREQ wrong number of arguments"),
    (b"PUT a b {%d}\r\n" % (MAX_CELL + 1) + b"z" * (MAX_CELL + 1) + b"\r\n", b"-ERR TOOBIG"),
    (b"FROB {3} {2}\r\nabc\r\nde\r\n", b"-ERR BADREQ unknown command"),
    (b"GET a b {4}\r\nabcd\r\n", b"-ERR BADREQ wrong number of arguments"),
])
def test_bad_requests_get_an_error_and_the_connection_stays_usable(raw, request_bytes, reply):
    c = raw()
    c.send(request_bytes + b"PING\r\n")
    assert c.line().startswith(reply)
    assert c.line() == b"+PONG"


def test_refused_write_changes_nothing(kv, raw):
    kv.put(b"keep", b"c", b"old")
    c = raw()
    c.send(b"PUT keep c {%d}\r\n" % (MAX_CELL + 1) + b"z" * (MAX_CELL + 1) + b"\r\n")
    assert c.line().startswith(b"-ERR TOOBIG")
    assert kv.get(b"keep", b"c") == b"old"


def test_over_long_line_is_refused_and_closed(raw, server):
    c = raw()
    c.send(b"GET " + b"a" * 70000 + b"\r\n")
    assert c.line() == b"-ERR BADREQ line too long"
    assert c.closed()
    assert alive(server)


def test_literal_without_crlf_closes_the_connection(raw, server):
    c = raw()
    c.send(b"PUT a b {3}\r\nabcXY\r\n")
    assert c.line().startswith(b"-ERR BADREQ")
    assert c.closed()
    assert alive(server)


def test_client_disconnecting_mid_literal(kv, raw, server):
    other = raw()
    other.send(b"PING\r\n")
    assert other.line() == b"+PONG"
    for _ in range(5):
        c = Raw(server.port)
        c.send(b"PUT midlit c {100000}\r\n" + b"q" * 5000)
        c.close()
    other.send(b"PING\r\n")
    assert other.line() == b"+PONG"
    with pytest.raises(NotFound):
        kv.get(b"midlit", b"c")                # a half-sent write is never applied


def test_random_garbage_never_kills_the_server(server, kv):
    rnd = random.Random(1234)
    for i in range(60):
        c = Raw(server.port)
        blob = rnd.randbytes(rnd.randrange(1, 3000))
        if i % 3 == 0:
            blob = blob.replace(b"\n", b" ") + b"\r\n"
        try:
            c.send(blob + b"\r\nPING\r\n")
            c.sock.settimeout(2)
            got = b""
            deadline = time.monotonic() + 2
            while b"+PONG" not in got and time.monotonic() < deadline:
                try:
                    d = c.sock.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not d:
                    break
                got += d
            for line in got.split(b"\r\n"):
                # garbage gets errors (or, rarely, forms a valid request)
                assert not line.startswith(b"-ERR INTERNAL"), line
        finally:
            c.close()
        assert alive(server)
    kv.put(b"after", b"garbage", b"fine")
    assert kv.get(b"after", b"garbage") == b"fine"


def test_big_value_round_trip(kv):
    big = os.urandom(MAX_CELL)
    kv.put(b"big", b"v", big)
    assert kv.get(b"big", b"v") == big
    with pytest.raises(Exception) as e:
        kv.put(b"big", b"v", big + b"x")
    assert "TOOBIG" in str(e.value)


def test_admin_commands_need_the_secret(procs, tmp_path):
    p = procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "d"),
                                 "--tablets", "2", "--secret", "s3cret"])
    addr = f"127.0.0.1:{p.port}"
    c = ServerClient(addr)
    c.put(b"a", b"b", b"c")                   # data commands need no secret
    for call in (c.status, c.tablets, lambda: c.rows(0, None, 5), c.kill):
        with pytest.raises(Denied):
            call()
    with pytest.raises(Denied):
        ServerClient(addr, secret="wrong").status()
    good = ServerClient(addr, secret="s3cret")
    assert good.status()["state"] == "serving"
    good.kill()
    assert good.status()["state"] == "killed"
    good.wake()
    assert good.get(b"a", b"b") == b"c"
    for x in (c, good):
        x.close()


def test_concurrent_big_uploads_take_turns(procs, tmp_path):
    """Big literals in flight are bounded (here 2 at once), so many clients
    uploading 64 MiB values cannot exhaust the server's memory; small
    requests are served meanwhile."""
    p = procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "d"),
                                 "--tablets", "2", "--max-cell-bytes", "16MiB", "--memory-budget", "4MiB"],
                    name="kvbig")
    size = 12 * 1024 * 1024
    body = b"B" * size
    holders = [Raw(p.port), Raw(p.port)]
    for i, c in enumerate(holders):                 # two uploads stall half-way, holding both slots
        c.send(b"PUT big%d v {%d}\r\n" % (i, size) + body[:6 * 1024 * 1024])
    third = Raw(p.port)
    sender = threading.Thread(target=lambda: third.send(b"PUT big2 v {%d}\r\n" % size + body + b"\r\n"))
    sender.start()
    third.sock.settimeout(30)
    readable, _, _ = select.select([third.sock], [], [], 1.0)
    assert not readable                             # no answer: it waits for a slot
    assert alive(p)                                 # small requests go on
    holders[0].send(body[6 * 1024 * 1024:] + b"\r\n")
    assert holders[0].line() == b"+OK"
    assert third.line() == b"+OK"                   # got the freed slot
    sender.join(30)
    holders[1].send(body[6 * 1024 * 1024:] + b"\r\n")
    assert holders[1].line() == b"+OK"
    c = ServerClient(f"127.0.0.1:{p.port}", timeout=30)
    assert [len(c.get(b"big%d" % i, b"v")) for i in range(3)] == [size] * 3
    c.close()
    for x in holders + [third]:
        x.close()


# -- one event loop serves every connection (kvserver/loop.py) --------------------------


def in_threads(fn, n, timeout=30):
    """Run fn(0) .. fn(n-1) on n threads at once and wait for all."""
    ts = [threading.Thread(target=fn, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)


def test_concurrent_cputs_on_one_cell_are_atomic(server):
    """Eight connections increment one counter with CPUT as fast as they can:
    a write holds its row until it is durable, so no two CPUTs both win on
    the same old value and every success is one increment."""
    port = server.port
    c = ServerClient(f"127.0.0.1:{port}", timeout=10)
    c.put(b"counter", b"n", b"0")
    wins = []

    def worker(_):
        k = ServerClient(f"127.0.0.1:{port}", timeout=10)
        won = 0
        deadline = time.monotonic() + 20
        while won < 40 and time.monotonic() < deadline:
            cur = k.get(b"counter", b"n")
            try:
                k.cput(b"counter", b"n", cur, b"%d" % (int(cur) + 1))
                won += 1
            except Mismatch:
                pass
        wins.append(won)
        k.close()

    in_threads(worker, 8)
    assert sum(wins) == 8 * 40
    assert c.get(b"counter", b"n") == b"%d" % (8 * 40)
    c.close()


def test_pipelined_writes_to_one_row_from_two_connections_keep_each_order(server):
    """Two pipelines write the same cells; each connection's writes apply in
    its own order and its replies come in order; the last value of each
    cell is one of the two last writes."""
    a, b = Raw(server.port), Raw(server.port)
    for who, conn in ((b"a", a), (b"b", b)):
        conn.send(b"".join(b"PUT shared c%d %s%d\r\n" % (i % 3, who, i) for i in range(60))
                  + b"GET shared c0\r\n")
    for conn in (a, b):
        assert [conn.line() for _ in range(60)] == [b"+OK"] * 60
        assert conn.line().startswith(b"$")
        conn.line()
    kv = ServerClient(f"127.0.0.1:{server.port}", timeout=10)
    assert kv.get(b"shared", b"c0") in (b"a57", b"b57")
    kv.close()
    a.close()
    b.close()


def test_a_client_that_does_not_read_does_not_stall_the_others(server):
    """One connection pipelines 200 GETs of a 64 KiB value (13 MB of replies)
    and does not read: its socket buffers fill, the server holds its
    replies, and every other client is served meanwhile."""
    kv = ServerClient(f"127.0.0.1:{server.port}", timeout=10)
    kv.put(b"fat", b"v", b"F" * (64 * 1024))
    hog = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    hog.sendall(b"GET fat v\r\n" * 200)
    time.sleep(0.2)
    for i in range(50):
        kv.put(b"other", b"c", b"%d" % i)
        assert kv.get(b"other", b"c") == b"%d" % i
    reply = b"$65536\r\n" + b"F" * 65536 + b"\r\n"
    got = bytearray()                                # the hog still gets everything, in order
    hog.settimeout(30)
    while len(got) < 200 * len(reply):
        d = hog.recv(1 << 20)
        assert d
        got += d
    assert got == reply * 200
    hog.close()
    kv.close()


def test_requests_sent_before_a_half_close_are_all_answered(server):
    """`printf 'PUT ...\\r\\nGET ...\\r\\n' | nc`: the client shuts its side
    down right after sending; every request is still answered, then the
    server closes."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"PUT half c {5}\r\nhello\r\nGET half c\r\nCOLS half\r\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    assert data == b"+OK\r\n$5\r\nhello\r\n*1\r\nc\r\n"
    s.close()


def test_writes_to_many_tablets_share_syncs(server):
    """Concurrent writes to every tablet: the server's commit group makes
    them durable with fewer syncs than writes (STATUS group_flushes)."""
    port = server.port
    kv = ServerClient(f"127.0.0.1:{port}", timeout=10)
    before = kv.status()
    rows = [next(b"gs%d-%d" % (t, i) for i in range(1000) if tablet_of(b"gs%d-%d" % (t, i), TABLETS) == t)
            for t in range(TABLETS)]

    def writer(k):
        c = ServerClient(f"127.0.0.1:{port}", timeout=10)
        for i in range(50):
            c.put(rows[k % TABLETS], b"c%d" % k, b"%d" % i)
        c.close()

    in_threads(writer, 8)
    after = kv.status()
    flushes = int(after["group_flushes"]) - int(before["group_flushes"])
    logs = int(after["logs_flushed"]) - int(before["logs_flushed"])
    assert 0 < flushes < 400
    assert logs > flushes            # some flushes covered several tablets' logs at once
    kv.close()


def test_writes_to_different_cells_of_one_row_go_on_together(server):
    """Ten connections write their own cells of ONE row (as mail deliveries
    to one mailbox do): a write holds only its cell, so they are made
    durable together, with far fewer syncs than writes."""
    port = server.port
    kv = ServerClient(f"127.0.0.1:{port}", timeout=10)
    before = int(kv.status()["group_flushes"])

    def writer(k):
        c = ServerClient(f"127.0.0.1:{port}", timeout=10)
        for i in range(40):
            c.putnx(b"mailbox", b"msg-%d-%d" % (k, i), b"body")
        c.close()

    in_threads(writer, 10)
    assert len(kv.cols(b"mailbox")) == 400
    assert int(kv.status()["group_flushes"]) - before < 300     # one each would be 400
    kv.close()


def test_delrow_waits_for_the_row_and_each_connection_keeps_its_order(server):
    """A DELROW holds the whole row: writes to its cells before it (on its
    connection) are deleted by it, writes after it survive, whatever other
    connections write to other cells of the row meanwhile."""
    a, others = Raw(server.port), [Raw(server.port) for _ in range(3)]
    for k, o in enumerate(others):
        o.send(b"".join(b"PUT dr other%d-%d x\r\n" % (k, i) for i in range(30)))
    a.send(b"PUT dr mine before\r\nDELROW dr\r\nPUT dr mine after\r\nGET dr mine\r\n")
    assert [a.line() for _ in range(3)] == [b"+OK"] * 3
    assert a.line() == b"$5" and a.line() == b"after"
    for o in others:
        assert [o.line() for _ in range(30)] == [b"+OK"] * 30
    kv = ServerClient(f"127.0.0.1:{server.port}", timeout=10)
    assert kv.get(b"dr", b"mine") == b"after"
    kv.close()
    for c in [a, *others]:
        c.close()


def test_out_of_file_descriptors_pauses_accepting_and_serves_on(procs, tmp_path):
    """The server's file descriptor limit is reached by a crowd of
    connections: it stops accepting for a moment instead of spinning on
    accept(), keeps serving the connections it has, and accepts again
    once descriptors are free."""
    import resource
    p = procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "d"),
                                 "--tablets", "2"], name="kvfd")
    kv = ServerClient(f"127.0.0.1:{p.port}", timeout=10)
    kv.put(b"fd", b"c", b"before")
    pid = p.popen.pid
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")) + 5, 4096))
    crowd = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(30)]

    def cpu_seconds():
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    c0 = cpu_seconds()
    time.sleep(1.5)
    assert cpu_seconds() - c0 < 0.5              # not a busy loop on accept()
    kv.put(b"fd", b"c", b"during")               # the connection it has still works
    assert kv.get(b"fd", b"c") == b"during"
    for s in crowd:
        s.close()
    later = ServerClient(f"127.0.0.1:{p.port}", timeout=10)
    assert later.get(b"fd", b"c") == b"during"
    later.close()
    kv.close()
