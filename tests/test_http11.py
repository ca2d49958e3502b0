"""The pure HTTP/1.1 codec: every framing case and error, fed whole, byte by
byte, and with trailing data; random and mutated input raise only ProtocolError."""

import random

import pytest

from httpserver import http11
from httpserver.http11 import (CLIENT, NEED_DATA, PAUSED, SERVER, Connection, ConnectionClosed, Data,
                               EndOfMessage, InformationalResponse, ProtocolError, Request, Response)

LIMITS = dict(max_line_bytes=256, max_header_bytes=1024, max_body_bytes=1000)


def events(data: bytes, step: int | None = None, role=SERVER, eof=False, **limits):
    """Feed `data` in pieces of `step` bytes (all at once if None); the events up to PAUSED.

    Consecutive Data events are merged, so results do not depend on the pieces.
    """
    conn = Connection(role, **(limits or LIMITS))
    out = []
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    if eof:
        pieces.append(b"")
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA or ev is PAUSED:
                break
            if type(ev) is Data and out and type(out[-1]) is Data:
                out[-1] = Data(out[-1].data + ev.data)
            else:
                out.append(ev)
            if type(ev) is ConnectionClosed:
                return out, conn
        if ev is PAUSED:
            break
    return out, conn


def all_ways(data: bytes, **kw):
    """The events for whole input, byte by byte, and whole + trailing bytes; all must agree."""
    whole, _ = events(data, **kw)
    bytewise, _ = events(data, step=1, **kw)
    trailing, conn = events(data + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n", **kw)
    assert whole == bytewise == trailing
    return whole


def status_of(data: bytes, step: int | None = None, eof=False, **kw) -> int:
    with pytest.raises(ProtocolError) as ei:
        events(data, step=step, eof=eof, **kw)
    return ei.value.status


H = http11.Headers


GOOD = [
    ("simple GET", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
     [Request("GET", "/", H([("host", "a")])), EndOfMessage()]),
    ("content-length body", b"POST /up?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
     [Request("POST", "/up?x=1", H([("host", "a"), ("content-length", "5")])), Data(b"hello"), EndOfMessage()]),
    ("chunked with extension and trailer",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5;name=val\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Sum: 15\r\n\r\n",
     [Request("POST", "/", H([("host", "a"), ("transfer-encoding", "chunked")])), Data(b"hello0123456789"),
      EndOfMessage(H([("x-sum", "15")]))]),
    ("chunked, upper-case coding, no trailer",
     b"PUT /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
     [Request("PUT", "/f", H([("host", "a"), ("transfer-encoding", "Chunked")])), Data(b"abc"), EndOfMessage()]),
    ("leading empty lines are ignored", b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
     [Request("GET", "/", H([("host", "a")])), EndOfMessage()]),
    ("HTTP/1.0 needs no Host", b"GET /old HTTP/1.0\r\n\r\n",
     [Request("GET", "/old", H(), "1.0"), EndOfMessage()]),
    ("repeated equal lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok",
     [Request("POST", "/", H([("host", "a"), ("content-length", "2, 2"), ("content-length", "2")])),
      Data(b"ok"), EndOfMessage()]),
    ("values trimmed, names lower-cased", b"GET / HTTP/1.1\r\nHOST: \t a \t\r\nX-Y:z\r\n\r\n",
     [Request("GET", "/", H([("host", "a"), ("x-y", "z")])), EndOfMessage()]),
    ("HTTP/1.9 is served as 1.1", b"GET / HTTP/1.9\r\nHost: a\r\n\r\n",
     [Request("GET", "/", H([("host", "a")])), EndOfMessage()]),
    ("zero length body", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
     [Request("POST", "/", H([("host", "a"), ("content-length", "0")])), EndOfMessage()]),
]


@pytest.mark.parametrize("name,data,want", GOOD, ids=[g[0] for g in GOOD])
def test_good_requests(name, data, want):
    assert all_ways(data) == want


BAD = [
    ("request line without version", b"GET /\r\nHost: a\r\n\r\n", 400),
    ("double space in request line", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("bad method token", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("control char in target", b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("garbage version", b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("HTTP/0.9", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    ("no Host in 1.1", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ("both CL and TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("non-numeric CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n", 400),
    ("negative CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("plus-signed CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", 400),
    ("differing CLs", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    ("differing CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", 400),
    ("gzip coding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("gzip then chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("chunked twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n", 400),
    ("bare LF lines (at once, not a 408 later)", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("no colon", b"GET / HTTP/1.1\r\nHost: a\r\nnonsense\r\n\r\n", 400),
    ("control char in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    ("bare CR in value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    ("request line too long", b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    ("header line too long", b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 300 + b"\r\n\r\n", 431),
    ("head too large", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 12345678901234567890\r\n" * 60 + b"\r\n", 431),
    ("CL over the body cap", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n", 413),
    ("chunked over the body cap", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"1F4\r\n" + b"x" * 500 + b"\r\n1F5\r\n", 413),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ("huge chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"11111111111111111\r\n", 400),
    ("chunk without CRLF", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", 400),
    ("chunk size line too long", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;"
                                 + b"e" * 300 + b"\r\n", 400),
    ("unknown expectation", b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\n", 417),
    # Chunk extensions must be token[=token|quoted-string] (HTTP QA: bare LF, CR, NUL and a whole
    # request line were skipped over, the request-smuggling class behind a LF-ending proxy).
    ("bare LF in a chunk extension", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"3;a\nbc\r\nabc\r\n0\r\n\r\n", 400),
    ("bare CR in a chunk extension", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"3;a\rb\r\nabc\r\n0\r\n\r\n", 400),
    ("NUL in a chunk extension", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"3;a\x00b\r\nabc\r\n0\r\n\r\n", 400),
    ("a request in the last chunk's extension", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                b"3\r\nabc\r\n0;x\nGET /smuggled HTTP/1.1\r\n\r\n", 400),
    ("a bare ; as a chunk extension", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      b"3;\r\nabc\r\n0\r\n\r\n", 400),
]


@pytest.mark.parametrize("name,data,status", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(name, data, status):
    assert status_of(data) == status
    assert status_of(data, step=1) == status
    assert status_of(data + b"trailing junk\r\n\r\n") == status


@pytest.mark.parametrize("data", [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nshort",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: 1\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n",
])
def test_message_cut_short_by_eof_is_400(data):
    assert status_of(data, eof=True) == 400
    assert status_of(data, step=1, eof=True) == 400


def test_clean_close_between_requests():
    evs, conn = events(b"", eof=True)
    assert evs == [ConnectionClosed()]
    evs, conn = events(b"\r\n", eof=True)
    assert evs == [ConnectionClosed()]


def test_error_is_sticky_and_disables_keep_alive():
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(b"BROKEN\r\n\r\n")
    with pytest.raises(ProtocolError):
        conn.next_event()
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert not conn.keep_alive


def test_pipelined_requests_need_the_response_first():
    data = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    for step in (None, 1, 7):
        conn = Connection(SERVER, **LIMITS)
        pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
        for p in pieces:
            conn.receive_data(p)
        targets, bodies = [], []
        while True:
            ev = conn.next_event()
            if type(ev) is Request:
                targets.append(ev.target)
            elif type(ev) is Data:
                bodies.append(ev.data)
            elif ev is PAUSED:
                out = conn.send(Response(200, [("Content-Length", "0")])) + conn.send(EndOfMessage())
                assert out.startswith(b"HTTP/1.1 200 OK\r\n")
                if not conn.keep_alive:
                    assert b"Connection: close" in out
                    break
                conn.start_next_cycle()
            elif ev is NEED_DATA:
                pytest.fail("all data was fed")
        assert targets == ["/1", "/2", "/3"]
        assert b"".join(bodies) == b"abc"


def test_start_next_cycle_refuses_before_the_response():
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.next_event(), conn.next_event()
    with pytest.raises(ProtocolError):
        conn.start_next_cycle()


def _serve(request: bytes, response: Response, body: bytes = b"") -> tuple[bytes, Connection]:
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(request)
    while conn.next_event() not in (PAUSED,):
        pass
    out = conn.send(response)
    if body:
        out += conn.send(Data(body))
    out += conn.send(EndOfMessage())
    return out, conn


def test_response_framing():
    get = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    out, conn = _serve(get, Response(200, [("Content-Length", "2")]), b"hi")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi" and conn.keep_alive
    out, conn = _serve(get, Response(200, [("Content-Type", "text/plain")]), b"hello")
    assert out == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n0\r\n\r\n")
    out, conn = _serve(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", Response(200, [("Content-Length", "5")]), b"hello")
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    out, conn = _serve(get, Response(304, [("ETag", '"x"')]))
    assert out == b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n' and conn.keep_alive
    out, conn = _serve(b"GET / HTTP/1.0\r\n\r\n", Response(200), b"old")
    assert out == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nold" and not conn.keep_alive
    out, conn = _serve(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", Response(200, [("Content-Length", "3")]),
                       b"old")
    assert b"Connection: keep-alive\r\n" in out and conn.keep_alive
    out, conn = _serve(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                       Response(200, [("Content-Length", "0")]))
    assert b"Connection: close\r\n" in out and not conn.keep_alive


def test_response_misuse_is_refused():
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.next_event()
    conn.send(Response(200, [("Content-Length", "2")]))
    with pytest.raises(ProtocolError):
        conn.send(Data(b"too long"))
    with pytest.raises(ProtocolError):
        conn.send(EndOfMessage())       # 2 bytes promised, none sent
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.next_event()
    with pytest.raises(ProtocolError):
        conn.send(Response(200, [("X-Bad", "a\r\nSet-Cookie: evil=1")]))


def test_expect_100_continue():
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert type(conn.next_event()) is Request
    assert conn.they_are_waiting_for_100_continue
    assert conn.send(InformationalResponse(100)) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not conn.they_are_waiting_for_100_continue
    conn.receive_data(b"abc")
    assert conn.next_event() == Data(b"abc")
    # Answering without reading the body the client holds back: no reuse.
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    conn.next_event()
    out = conn.send(Response(413, [("Content-Length", "0")]))
    assert b"Connection: close" in out and not conn.keep_alive
    # Nothing to wait for without a body: the connection stays reusable.
    conn = Connection(SERVER, **LIMITS)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n")
    conn.next_event()
    assert not conn.they_are_waiting_for_100_continue
    conn.send(Response(200, [("Content-Length", "0")]))
    assert conn.keep_alive


# -- the client direction (used by the load balancer's proxy) -------------------------

def test_client_parses_pipelined_responses():
    c = Connection(CLIENT, **LIMITS)
    out = c.send(Request("GET", "/a", [("Host", "x")])) + c.send(EndOfMessage())
    out += c.send(Request("HEAD", "/b", [("Host", "x")])) + c.send(EndOfMessage())
    out += c.send(Request("POST", "/c", [("Host", "x"), ("Content-Length", "2")])) + c.send(Data(b"hi"))
    out += c.send(EndOfMessage())
    assert out == (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nHEAD /b HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    for step in (None, 1):
        c2 = Connection(CLIENT, **LIMITS)
        for m in ("GET", "HEAD", "POST"):
            c2.send(Request(m, "/", [("Host", "x")]))
            c2.send(EndOfMessage())
        pieces = [data] if step is None else [data[i:i + 1] for i in range(len(data))]
        got = []
        for p in pieces:
            c2.receive_data(p)
            while (ev := c2.next_event()) is not NEED_DATA:
                got.append((type(ev).__name__, getattr(ev, "status", None) or getattr(ev, "data", None)))
        merged = []
        for g in got:
            if g[0] == "Data" and merged and merged[-1][0] == "Data":
                merged[-1] = ("Data", merged[-1][1] + g[1])
            else:
                merged.append(g)
        assert merged == [("InformationalResponse", 100), ("Response", 200), ("Data", b"hi"),
                          ("EndOfMessage", None), ("Response", 200), ("EndOfMessage", None),
                          ("Response", 201), ("Data", b"ok"), ("EndOfMessage", None)]


def test_client_reads_close_delimited_body():
    c = Connection(CLIENT, **LIMITS)
    c.send(Request("GET", "/", [("Host", "x")]))
    c.send(EndOfMessage())
    c.receive_data(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert type(c.next_event()) is Response
    assert c.next_event() == Data(b"all of it")
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    assert type(c.next_event()) is EndOfMessage
    assert c.next_event() == ConnectionClosed()
    assert not c.keep_alive


def test_client_response_errors():
    for data, status in [(b"HTTP/1.1 2OO OK\r\n\r\n", 400), (b"HTTP/2.0 200 OK\r\n\r\n", 505),
                         (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400)]:
        c = Connection(CLIENT, **LIMITS)
        c.send(Request("GET", "/", [("Host", "x")]))
        c.send(EndOfMessage())
        c.receive_data(data)
        with pytest.raises(ProtocolError) as ei:
            c.next_event()
        assert ei.value.status == status


# -- fuzzing: random and mutated input raise ProtocolError or parse, nothing else -------

SEEDS = [g[1] for g in GOOD] + [b[1] for b in BAD]


def _drive(conn: Connection, data: bytes, rng: random.Random) -> None:
    i = 0
    steps = 0
    while i < len(data) and steps < 10_000:
        n = rng.randint(1, 64)
        conn.receive_data(data[i:i + n])
        i += n
        for _ in range(1000):
            steps += 1
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            if ev is PAUSED:
                conn.send(Response(200, [("Content-Length", "0")]))
                conn.send(EndOfMessage())
                if not conn.keep_alive:
                    return
                conn.start_next_cycle()
            if type(ev) is ConnectionClosed:
                return
    conn.receive_data(b"")
    for _ in range(1000):
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED or type(ev) is ConnectionClosed:
            return


def test_fuzz_random_bytes_only_protocol_errors():
    rng = random.Random(4)
    for _ in range(1500):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
        if rng.random() < 0.5:
            data = b"GET / HTTP/1.1\r\n" + data
        conn = Connection(SERVER, **LIMITS)
        try:
            _drive(conn, data, rng)
        except ProtocolError as e:
            assert e.status in (400, 413, 414, 417, 431, 501, 505)


def test_fuzz_mutated_requests_only_protocol_errors():
    rng = random.Random(7)
    alphabet = b"\r\n :;,0123456789abcdefABCDEF-\t\x00\x7f\xff/"
    for _ in range(3000):
        data = bytearray(rng.choice(SEEDS) * rng.randint(1, 2))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(data) + 1)
            if op < 0.4 and data:
                data[min(pos, len(data) - 1)] = rng.choice(alphabet)
            elif op < 0.7:
                data[pos:pos] = bytes([rng.choice(alphabet)])
            elif data:
                del data[min(pos, len(data) - 1)]
        conn = Connection(SERVER, **LIMITS)
        try:
            _drive(conn, bytes(data), rng)
        except ProtocolError as e:
            assert e.status in (400, 413, 414, 417, 431, 501, 505)


def test_a_content_length_of_thousands_of_digits_is_413_not_a_crash():
    """Python refuses int() of more than 4300 digits (ValueError, not a
    ProtocolError): the server closed the connection unanswered and logged a
    traceback for every such request."""
    for digits in (b"1" * 5000, b"0" * 5000 + b"5" * 20, b"0" * 5000 + b"1001"):
        conn = Connection(SERVER, max_line_bytes=8192, max_header_bytes=16384, max_body_bytes=1000)
        conn.receive_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + digits + b"\r\n\r\n")
        with pytest.raises(http11.ProtocolError) as e:
            conn.next_event()
        assert e.value.status == 413
