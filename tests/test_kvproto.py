"""The KV protocol codec (src/kvproto.py) against PROTOCOL.md.

Every case runs three ways, in the manner of h11's tests: the whole input in
one piece, one byte at a time, and with a trailing request (or reply) that
must still parse afterwards. Random input (seeded, bounded) must produce only
the codec's own errors.
"""

import random

import pytest

from src import kv
from src.kvproto import (
    COMMANDS, MAX_LINE, NEED_DATA, NAME, RAW, TEXT, VALUE, CommandSpec, Error, KVProtocolError, Listing,
    Ok, ProtocolErrorEvent, ReplyParser, Request, RequestParser, Value, decode_name, encode_name,
    encode_request, error, error_for, listing, name_listing, ok, pong, value, value_parts,
)

# -- helpers -------------------------------------------------------------------


def drain(parser) -> list:
    out = []
    while True:
        ev = parser.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)


def parse_requests(data: bytes, mode: str, **kw) -> tuple[list, RequestParser]:
    p = RequestParser(**kw)
    events = []
    if mode == "whole":
        p.feed(data)
        events += drain(p)
    else:
        for i in range(len(data)):
            p.feed(data[i:i + 1])
            events += drain(p)
    return events, p


def parse_replies(data: bytes, mode: str, **kw) -> list:
    p = ReplyParser(**kw)
    events = []
    pieces = [data] if mode == "whole" else [data[i:i + 1] for i in range(len(data))]
    for piece in pieces:
        p.feed(piece)
        while (ev := p.next_event()) is not NEED_DATA:
            events.append(ev)
    return events


def R(cmd, *args):
    return Request(cmd, list(args))


def E(code, text=None, close=False):
    return (code, text, close)


def matches(ev, want) -> bool:
    if isinstance(want, tuple):
        code, text, close = want
        return (isinstance(ev, ProtocolErrorEvent) and ev.code == code and ev.close == close
                and (text is None or text in ev.text))
    return ev == want


MODES = ["whole", "bytewise", "trailing"]

# -- requests: every form ------------------------------------------------------

REQUESTS = [
    ("ping", b"PING\r\n", [R("PING")]),
    ("lower case, bare LF", b"ping\n", [R("PING")]),
    ("mixed case", b"pUt a b c\r\n", [R("PUT", b"a", b"b", b"c")]),
    ("token value", b"PUT alice greeting hello%20world\r\n", [R("PUT", b"alice", b"greeting", b"hello world")]),
    ("runs of spaces and tabs", b"  PUT \t alice\t\tgreeting   hi  \r\n", [R("PUT", b"alice", b"greeting", b"hi")]),
    ("plus is plus", b"PUT a+b c+d e+f\r\n", [R("PUT", b"a+b", b"c+d", b"e+f")]),
    ("escapes either case", b"PUT %2d%2D %00%ff %7Bx\r\n", [R("PUT", b"--", b"\x00\xff", b"{x")]),
    ("utf-8 travels as is", "PUT ümlaut 名前 ok\r\n".encode(), [R("PUT", "ümlaut".encode(), "名前".encode(), b"ok")]),
    ("literal", b"PUT alice photo {5}\r\nab\r\nc\r\n", [R("PUT", b"alice", b"photo", b"ab\r\nc")]),
    ("literal, LF only", b"PUT a b {3}\nxyz\n", [R("PUT", b"a", b"b", b"xyz")]),
    ("empty literal", b"PUT a b {0}\r\n\r\n", [R("PUT", b"a", b"b", b"")]),
    ("leading zeros", b"PUT a b {003}\r\nxyz\r\n", [R("PUT", b"a", b"b", b"xyz")]),
    ("many leading zeros", b"PUT a b {" + b"0" * 40 + b"3}\r\nxyz\r\n", [R("PUT", b"a", b"b", b"xyz")]),
    ("binary literal", b"PUT a b {4}\r\n\x00\r\n\xff\r\n", [R("PUT", b"a", b"b", b"\x00\r\n\xff")]),
    ("two literals in order", b"CPUT r c {3} {4}\r\nold\r\nnew!\r\n", [R("CPUT", b"r", b"c", b"old", b"new!")]),
    ("literal and token mixed", b"CPUT r c old {2}\r\nhi\r\n", [R("CPUT", b"r", b"c", b"old", b"hi")]),
    ("{5} as a name is a name", b"GET {5} {x}\r\n", [R("GET", b"{5}", b"{x}")]),
    ("blank lines ignored", b"\r\n \t \r\n\nPING\r\n", [R("PING")]),
    ("pipelined", b"PING\r\nGET a b\r\nQUIT\r\n", [R("PING"), R("GET", b"a", b"b"), R("QUIT")]),
    ("putnx", b"PUTNX a b {1}\r\nv\r\n", [R("PUTNX", b"a", b"b", b"v")]),
    ("delete cols delrow", b"DELETE a b\r\nCOLS a\r\nDELROW a\r\n",
     [R("DELETE", b"a", b"b"), R("COLS", b"a"), R("DELROW", b"a")]),
    ("master", b"MAP\r\nLOOKUP alice\r\nNODES\r\n", [R("MAP"), R("LOOKUP", b"alice"), R("NODES")]),
    ("admin", b"STATUS\r\nTABLETS\r\nKILL\r\nWAKE\r\n", [R("STATUS"), R("TABLETS"), R("KILL"), R("WAKE")]),
    ("rows raw", b"ROWS 3 - 10\r\nROWS 3 %2D 10\r\n", [R("ROWS", "3", "-", "10"), R("ROWS", "3", "%2D", "10")]),
    ("auth text", b"AUTH s3cr%20t+x\r\n", [R("AUTH", b"s3cr t+x")]),
    ("longest name", b"GET " + b"n" * 4096 + b" c\r\n", [R("GET", b"n" * 4096, b"c")]),
    ("longest name, encoded", b"GET " + b"%41" * 4096 + b" c\r\n", [R("GET", b"A" * 4096, b"c")]),
    ("longest line", b"PING" + b" " * (MAX_LINE - 4) + b"\r\n", [R("PING")]),
    ("longest line, LF", b"PING" + b" " * (MAX_LINE - 4) + b"\n", [R("PING")]),
]

REQUEST_ERRORS = [
    ("unknown command", b"FROB a b\r\n", [E("BADREQ", "unknown command")]),
    ("unknown command with literals", b"FROB {3} x {2}\r\nabc\r\nde\r\n", [E("BADREQ", "unknown")]),
    ("wrong arity", b"GET a\r\n", [E("BADREQ", "wrong number")]),
    ("wrong arity with literal", b"PUT a {3}\r\nabc\r\n", [E("BADREQ", "wrong number")]),
    ("too many with literals", b"PUT a b {1} {2}\r\nx\r\nyz\r\n", [E("BADREQ", "wrong number")]),
    ("{abc}", b"PUT a b {abc}\r\n", [E("BADREQ", "literal")]),
    ("{-1}", b"PUT a b {-1}\r\n", [E("BADREQ", "literal")]),
    ("{}", b"PUT a b {}\r\n", [E("BADREQ", "literal")]),
    ("{5 unclosed", b"PUT a b {5\r\n", [E("BADREQ", "literal")]),
    # no client can send 10**40 bytes: like {abc}, an error with nothing to skip
    ("absurd literal length", b"PUT a b {" + b"9" * 40 + b"}\r\n", [E("BADREQ", "out of range")]),
    ("absurd literal on an unknown command", b"FROB {" + b"9" * 40 + b"}\r\n", [E("BADREQ", "unknown")]),
    ("19-digit literal, leading zeros do not count", b"PUT a b {" + b"0" * 30 + b"3}\r\nabc\r\n",
     [R("PUT", b"a", b"b", b"abc")]),
    ("bad literal; the other literal still read", b"CPUT a b {x} {3}\r\nabc\r\n", [E("BADREQ", "literal")]),
    ("bad escape", b"GET a%zz b\r\n", [E("BADREQ", "escape")]),
    ("short escape", b"GET a%4 b\r\n", [E("BADREQ", "escape")]),
    ("trailing percent", b"GET a b%\r\n", [E("BADREQ", "escape")]),
    ("signed escape", b"GET a%+f b\r\n", [E("BADREQ", "escape")]),
    ("bad escape in value token", b"PUT a b %g0\r\n", [E("BADREQ", "escape")]),
    ("bad escape; literal still read", b"PUT a%zz b {3}\r\nabc\r\n", [E("BADREQ", "escape")]),
    ("bad escape in auth", b"AUTH %q\r\n", [E("BADREQ", "escape")]),
    ("name too long", b"GET " + b"n" * 4097 + b" c\r\n", [E("BADREQ", "4096")]),
    ("name too long, encoded", b"GET " + b"%41" * 4097 + b" c\r\n", [E("BADREQ", "4096")]),
    ("empty decoded name impossible but %00 is one byte", b"GET %00 c\r\n", [R("GET", b"\x00", b"c")]),
    ("error then usable", b"FROB\r\nPING\r\n", [E("BADREQ"), R("PING")]),
    ("POST with other words is only unknown", b"POST / x\r\nPING\r\n", [E("BADREQ"), R("PING")]),
]

FATAL = [
    ("line too long", b"PING" + b" " * (MAX_LINE - 3) + b"\r\n", [E("BADREQ", "line too long", True)]),
    ("line too long, no newline", b"x" * (MAX_LINE + 10), [E("BADREQ", "line too long", True)]),
    ("literal not followed by CRLF", b"PUT a b {3}\r\nabcd\r\n", [E("BADREQ", "CRLF", True)]),
    ("literal followed by CR then junk", b"PUT a b {3}\r\nabc\rX\r\n", [E("BADREQ", "CRLF", True)]),
    ("discarded literal not followed by CRLF", b"FROB {2}\r\nabc\r\n", [E("BADREQ", "CRLF", True)]),
    # A web page can make a browser post a form (enctype=text/plain) to a KV
    # port: its body would run as commands. HTTP closes the connection at once.
    ("an HTTP request line", b"POST / HTTP/1.1\r\nHost: x\r\n\r\nPUT acct/admin pw x\r\n",
     [E("BADREQ", "not a web server", True)]),
    ("an HTTP GET (a KV GET of row / col HTTP/1.1 otherwise)", b"GET / HTTP/1.1\r\n",
     [E("BADREQ", "not a web server", True)]),
    ("an HTTP header line", b"host: example.org\r\nPUT a b c\r\n", [E("BADREQ", "not a web server", True)]),
]

TRAILER = b"GET next row\r\n"
TRAILER_EVENT = R("GET", b"next", b"row")


def _check(events, want):
    assert len(events) == len(want), events
    for ev, w in zip(events, want):
        assert matches(ev, w), (ev, w)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,data,want", REQUESTS + REQUEST_ERRORS, ids=[c[0] for c in REQUESTS + REQUEST_ERRORS])
def test_request_forms(name, data, want, mode):
    if mode == "trailing":
        events, _ = parse_requests(data + TRAILER, "whole")
        _check(events, want + [TRAILER_EVENT])
    else:
        events, _ = parse_requests(data, mode)
        _check(events, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,data,want", FATAL, ids=[c[0] for c in FATAL])
def test_fatal_errors_close(name, data, want, mode):
    extra = TRAILER if mode == "trailing" else b""
    events, p = parse_requests(data + extra, "whole" if mode == "trailing" else mode)
    _check(events, want)          # nothing after a closing error, not even the trailer
    assert p.closed
    p.feed(b"PING\r\n")
    assert p.next_event() is NEED_DATA


def test_partial_request_needs_data():
    p = RequestParser()
    for piece in (b"PUT a b {5}", b"\r\n", b"hel", b"lo", b"\r"):
        p.feed(piece)
        assert p.next_event() is NEED_DATA
    p.feed(b"\n")
    assert p.next_event() == R("PUT", b"a", b"b", b"hello")


def test_long_line_is_not_buffered_past_the_limit():
    p = RequestParser()
    chunk = b"x" * 4096
    for _ in range(MAX_LINE // 4096):
        p.feed(chunk)
        assert p.next_event() is NEED_DATA
    p.feed(chunk)
    ev = p.next_event()
    assert matches(ev, E("BADREQ", "line too long", True))
    assert p.buffered == 0
    p.feed(chunk * 10)             # a closed parser holds nothing
    assert p.buffered == 0


@pytest.mark.parametrize("mode", ["whole", "chunked"])
def test_toobig_literal_is_discarded_and_connection_stays_usable(mode):
    p = RequestParser(max_literal=100)
    body = bytes(range(256)) * 40          # 10240 bytes, over the 100-byte limit
    data = b"PUT a b {%d}\r\n" % len(body) + body + b"\r\nPUT a b {3}\r\nabc\r\n"
    events = []
    if mode == "whole":
        p.feed(data)
        events = drain(p)
    else:
        for i in range(0, len(data), 1000):
            p.feed(data[i:i + 1000])
            assert p.buffered <= 1000 + 100     # never holds the refused literal
            events += drain(p)
    _check(events, [E("TOOBIG", "100-byte"), R("PUT", b"a", b"b", b"abc")])


def test_toobig_token_value():
    events, _ = parse_requests(b"PUT a b " + b"v" * 101 + b"\r\nPING\r\n", "whole", max_literal=100)
    _check(events, [E("TOOBIG"), R("PING")])


def test_toobig_with_another_literal_reads_both():
    events, _ = parse_requests(b"CPUT a b {3} {200}\r\nabc\r\n" + b"z" * 200 + b"\r\nPING\r\n",
                               "whole", max_literal=100)
    _check(events, [E("TOOBIG"), R("PING")])


def test_refused_line_keeps_no_literal_bytes():
    p = RequestParser()
    p.feed(b"FROB {1000000}\r\n")
    assert p.next_event() is NEED_DATA
    for _ in range(100):
        p.feed(b"y" * 10000)
        assert p.next_event() is NEED_DATA
        assert p.buffered == 0
    p.feed(b"\r\nPING\r\n")
    _check(drain(p), [E("BADREQ", "unknown"), R("PING")])


def test_64mib_literal_in_64kib_pieces():
    size = 64 * 1024 * 1024
    p = RequestParser()
    p.feed(b"PUT big cell {%d}\r\n" % size)
    assert p.next_event() is NEED_DATA
    piece = bytes(range(256)) * 256          # 64 KiB
    for _ in range(size // len(piece)):
        p.feed(piece)
    p.feed(b"\r\nPING\r\n")
    ev = p.next_event()
    assert isinstance(ev, Request) and ev.cmd == "PUT"
    v = ev.args[2]
    assert len(v) == size and v[:256] == piece[:256] and v[-256:] == piece[-256:]
    assert p.next_event() == R("PING")


def test_extended_table_with_literals_and_variadic():
    table = dict(COMMANDS, REPL=CommandSpec((RAW, RAW, VALUE), variadic=True))
    data = b"REPL 7 12 {3} {2} tok\r\nabc\r\nde\r\nREPL 7 13\r\nREPL 7\r\n"
    events, _ = parse_requests(data, "whole", commands=table)
    _check(events, [R("REPL", "7", "12", b"abc", b"de", b"tok"), R("REPL", "7", "13"), E("BADREQ", "at least 2")])
    assert encode_request("REPL", 7, 12, b"abc", commands=table) == [b"REPL 7 12 {3}\r\nabc\r\n"]


def test_every_default_command_parses():
    sample = {NAME: b"n", VALUE: b"v", RAW: "1", TEXT: b"t"}
    for cmd, spec in COMMANDS.items():
        args = [sample[k] for k in spec.args]
        events, _ = parse_requests(b"".join(encode_request(cmd, *args)), "whole")
        assert events == [Request(cmd, args)], cmd


# -- replies (server side encoders) and the reply parser -------------------------

REPLIES = [
    ("ok", ok(), [Ok("")]),
    ("ok text", ok("bye"), [Ok("bye")]),
    ("ok text with spaces", b"+OK 3 127.0.0.1:7001 127.0.0.1:7002,127.0.0.1:7003\r\n",
     [Ok("3 127.0.0.1:7001 127.0.0.1:7002,127.0.0.1:7003")]),
    ("pong", pong(), [Ok("", "PONG")]),
    ("value", value(b"hello world"), [Value(b"hello world")]),
    ("empty value", value(b""), [Value(b"")]),
    ("binary value with CRLF inside", value(b"a\r\n$3\r\n\x00"), [Value(b"a\r\n$3\r\n\x00")]),
    ("value parts", b"".join(value_parts(b"xyz")), [Value(b"xyz")]),
    ("value, LF only", b"$2\nhi\n", [Value(b"hi")]),
    ("empty listing", listing([]), [Listing([])]),
    ("listing", listing(["id=kv1", b"state=serving"]), [Listing([b"id=kv1", b"state=serving"])]),
    ("name listing", name_listing([b"a b", b"%", b"\xff"]), [Listing([b"a%20b", b"%25", b"%FF"])]),
    ("notfound", error("NOTFOUND"), [Error("NOTFOUND")]),
    ("badreq text", error("BADREQ", "line too long"), [Error("BADREQ", "line too long")]),
    ("moved", error_for(kv.Moved(3, "127.0.0.1:7002")), [Error("MOVED", "3 127.0.0.1:7002")]),
    ("pipelined", ok() + value(b"v") + error("EXISTS"), [Ok(""), Value(b"v"), Error("EXISTS")]),
]

REPLY_GARBAGE = [
    ("no type byte", b"hello\r\n"),
    ("empty line", b"\r\n"),
    ("empty status", b"+\r\n"),
    ("bad count", b"$abc\r\n"),
    ("negative count", b"$-1\r\n"),
    ("bad listing count", b"*x\r\n"),
    ("value without CRLF", b"$3\r\nabcX"),
    ("error without ERR", b"-FOO\r\n"),
    ("error without code", b"-ERR\r\n"),
    ("error with empty code", b"-ERR \r\n"),
    ("value too big for the client", b"$2000\r\n"),
    ("line too long", b"+OK " + b"x" * 300 + b"\r\n"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,data,want", REPLIES, ids=[c[0] for c in REPLIES])
def test_reply_forms(name, data, want, mode):
    if mode == "trailing":
        assert parse_replies(data + b"+OK next\r\n", "whole") == want + [Ok("next")]
    else:
        assert parse_replies(data, mode) == want


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("name,data", REPLY_GARBAGE, ids=[c[0] for c in REPLY_GARBAGE])
def test_reply_garbage_raises_protocol_error(name, data, mode):
    with pytest.raises(KVProtocolError):
        parse_replies(data, mode, max_line=256, max_value=1000)


def test_reply_parser_stays_broken():
    p = ReplyParser()
    p.feed(b"?\r\n+OK\r\n")
    with pytest.raises(KVProtocolError):
        p.next_event()
    with pytest.raises(KVProtocolError):
        p.next_event()


@pytest.mark.parametrize("code,cls", [("NOTFOUND", kv.NotFound), ("MISMATCH", kv.Mismatch), ("EXISTS", kv.Exists),
                                      ("RETRY", kv.Retry), ("BADREQ", kv.BadRequest), ("TOOBIG", kv.TooBig),
                                      ("DENIED", kv.Denied), ("INTERNAL", kv.Internal), ("WEIRD", kv.Internal)])
def test_error_maps_to_kv_exceptions(code, cls):
    exc = Error(code, "some text").exception()
    assert type(exc) is cls
    assert "some text" in str(exc)


def test_moved_maps_to_moved():
    exc = Error("MOVED", "5 127.0.0.1:7003").exception()
    assert isinstance(exc, kv.Moved) and exc.tablet == 5 and exc.addr == "127.0.0.1:7003"


def test_reply_text_cannot_break_framing():
    assert ok("a\r\nb") == b"+OK a  b\r\n"
    assert error("INTERNAL", "x\ny") == b"-ERR INTERNAL x y\r\n"
    with pytest.raises(ValueError):
        listing([b"a\nb"])


def test_big_value_reply_in_pieces():
    body = bytes(range(256)) * 4096 * 8       # 8 MiB
    p = ReplyParser()
    data = b"".join([value_parts(body)[0], body, b"\r\n"])
    for i in range(0, len(data), 65536):
        p.feed(data[i:i + 65536])
    assert p.next_event() == Value(body)


# -- names and request encoding --------------------------------------------------

NAMES = [b"alice", b"a b", b"%", b"100%", b"{5}", b"\x00\x01\r\n\t", bytes(range(256)), "ümlaut".encode(),
         b"+plus+", b"-"]


@pytest.mark.parametrize("name", NAMES)
def test_encode_decode_name_round_trip(name):
    enc = encode_name(name)
    assert all(0x21 <= c <= 0x7E for c in enc)
    assert decode_name(enc) == name


def test_encode_name_examples():
    assert encode_name(b"hello world") == b"hello%20world"
    assert encode_name(b"50%") == b"50%25"
    assert encode_name("é") == b"%C3%A9"
    assert encode_name(b"plain-name_1.2") == b"plain-name_1.2"


def test_decode_name_errors():
    for bad in (b"%zz", b"%", b"", b"x" * 4097):
        with pytest.raises(KVProtocolError) as ei:
            decode_name(bad)
        assert ei.value.code == "BADREQ" and not ei.value.close


@pytest.mark.parametrize("name", NAMES)
def test_encode_request_round_trip(name):
    values = [b"", b"\r\n", b"{3}\r\nxyz", bytes(range(256)), b"x" * 100_000]
    for v in values:
        bufs = encode_request("CPUT", name, name, v, v)
        events, _ = parse_requests(b"".join(bufs), "whole")
        assert events == [R("CPUT", name, name, v, v)]


def test_encode_request_does_not_copy_big_values():
    big = b"b" * 200_000
    bufs = encode_request("PUT", "r", "c", big)
    assert any(b is big for b in bufs)
    assert b"".join(bufs) == b"PUT r c {200000}\r\n" + big + b"\r\n"


def test_encode_request_rejects_misuse():
    with pytest.raises(ValueError):
        encode_request("FROB")
    with pytest.raises(ValueError):
        encode_request("GET", "a")
    with pytest.raises(ValueError):
        encode_request("GET", "", "c")
    with pytest.raises(ValueError):
        encode_request("ROWS", 1, "a b", 10)
    with pytest.raises(TypeError):
        encode_request("PUT", "a", "b", "a str value")
    assert encode_request("ROWS", 3, "-", 10) == [b"ROWS 3 - 10\r\n"]
    assert encode_request("auth", "s e") == [b"AUTH s%20e\r\n"]


# -- fuzz: only the codec's own errors, never unbounded buffering ------------------

_PIECES = [b"PUT", b"GET", b"CPUT", b"ROWS", b"FROB", b" ", b"\t", b"\r\n", b"\n", b"\r", b"{3}", b"{0}",
           b"{", b"}", b"%", b"%4", b"%41", b"a", b"b", b"xyz", b"{99}", b"+OK", b"-ERR", b"$3", b"*2", b"$"]


def _random_input(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return rng.randbytes(rng.randrange(1, 400))
    return b"".join(rng.choice(_PIECES) if rng.random() < 0.9 else rng.randbytes(3)
                    for _ in range(rng.randrange(1, 120)))


def test_fuzz_request_parser():
    rng = random.Random(1234)
    max_line, max_literal = 64, 50
    for _ in range(1500):
        data = _random_input(rng)
        p = RequestParser(max_line=max_line, max_literal=max_literal)
        i = 0
        while i < len(data):
            n = rng.randrange(1, 40)
            p.feed(data[i:i + n])
            i += n
            while (ev := p.next_event()) is not NEED_DATA:
                assert isinstance(ev, (Request, ProtocolErrorEvent)), ev
            assert p.buffered <= max_line + 2 + 40 + max_literal


def test_fuzz_reply_parser():
    rng = random.Random(4321)
    for _ in range(1500):
        data = _random_input(rng)
        p = ReplyParser(max_line=64, max_value=100)
        try:
            i = 0
            while i < len(data):
                n = rng.randrange(1, 40)
                p.feed(data[i:i + n])
                i += n
                while (ev := p.next_event()) is not NEED_DATA:
                    assert isinstance(ev, (Ok, Value, Listing, Error)), ev
                assert p.buffered <= 64 + 2 + 40 + 100
        except KVProtocolError:
            pass
