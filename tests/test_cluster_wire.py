"""The replication wire forms (kvserver/cluster.py's pure codec part)."""

import random

import pytest

from kvserver.cluster import (INTERNAL_COMMANDS, StreamReader, _encode_msg, decode_records, encode_records,
                              parse_reply, reply_text)
from kvserver.replication import Ack, Append, Gap, Record, Stale
from kvserver.wal import DEL, DELROW, SET, Effect
from src.kvproto import Ok, ReplyParser, encode_request

RECS = (Record(5, 2, Effect(SET, b"r o w\x00%", b"c\r\n", b"v\r\n{3}\xff")),
        Record(6, 2, Effect(DEL, b"x", b"y")),
        Record(7, 3, Effect(DELROW, b"\x01\x02")),
        Record(8, 3, Effect(SET, b"big", b"c", b"z" * 100_000)))


def test_records_round_trip():
    meta, values = encode_records(RECS)
    assert decode_records(meta, values) == RECS
    assert decode_records(*encode_records(())) == ()
    with pytest.raises(ValueError):
        decode_records(meta, values[:-1])
    with pytest.raises(ValueError):
        decode_records(b"1 1 9 00 -", [b""])       # unknown effect kind


def test_repl_request_is_exactly_what_the_general_encoder_makes():
    for recs in (RECS, (), RECS[:1]):
        m = Append(3, 2, 4, 2, recs)
        meta, values = encode_records(recs)
        expect = b"".join(encode_request("REPL", 3, 2, 4, 2, meta, *values, commands=INTERNAL_COMMANDS))
        assert b"".join(_encode_msg(m)) == expect


def reqs():
    out = [_encode_msg(Append(t, 1, t * 10, 1, RECS[:t % 4 + 1])) for t in range(4)]
    out.append(encode_request("SNAPCHUNK", 1, 1, 0, b"\x00" * 300, commands=INTERNAL_COMMANDS))
    return b"".join(b"".join(r) for r in out)


def parse_all(data: bytes, step: int):
    r = StreamReader(max_literal=1 << 20)
    got = []
    for i in range(0, len(data), step):
        r.feed(data[i:i + step])
        while (x := r.next()) is not None:
            got.append(x)
    return got, r


@pytest.mark.parametrize("step", [1, 7, 4096, 10 ** 9])
def test_stream_reader_whole_byte_by_byte_and_in_pieces(step):
    data = reqs()
    got, r = parse_all(data, step)
    assert [c for c, _ in got] == ["REPL"] * 4 + ["SNAPCHUNK"]
    for t, (cmd, args) in enumerate(got[:4]):
        assert args[:4] == [str(t), "1", str(t * 10), "1"]
        assert decode_records(args[4], args[5:]) == RECS[:t % 4 + 1]
    assert got[4][1] == ["1", "1", "0", b"\x00" * 300]
    r.feed(b"REPL 1 1 0 0 {0}\r\n")               # trailing bytes: a partial next request
    assert r.next() is None
    r.feed(b"\r\n")
    assert r.next() == ("REPL", ["1", "1", "0", "0", b""])


@pytest.mark.parametrize("bad", [b"REPL 1 {5}\r\nabcdeXX", b"REPL {99999999}\r\n", b"\r\n",
                                 b"REPL {-1}\r\n", b"REPL {x}\r\n"])
def test_stream_reader_refuses_malformed_input(bad):
    r = StreamReader(max_literal=1000)
    r.feed(bad)
    with pytest.raises(ValueError):
        r.next()


def test_stream_reader_random_bytes_give_only_its_error():
    rng = random.Random(3)
    for _ in range(300):
        r = StreamReader(max_literal=100, max_line=200)
        try:
            for _ in range(5):
                r.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))))
                while r.next() is not None:
                    pass
        except ValueError:
            pass
        assert len(r.buf) < 1000


def test_replies_round_trip_through_the_reply_parser():
    for rep in (Ack(1, 2, 3), Gap(4, 5, 6, 7), Stale(8, 9)):
        p = ReplyParser()
        p.feed(reply_text(rep))
        ev = p.next_event()
        assert isinstance(ev, Ok) and parse_reply(ev.text) == rep
    with pytest.raises(ValueError):
        parse_reply("ACK 1 2")


def test_stream_reader_as_the_servers_parser():
    """On a connection that became a stream, only REPL, SNAPCHUNK and
    SNAPSHOT with their least arities pass; anything else ends the stream."""
    from src.kvproto import NEED_DATA, ProtocolErrorEvent, Request
    r = StreamReader(max_literal=100)
    r.feed(b"REPL 1 2 0 0 {0}\r\n\r\nREPL 1 2\r\nREPL 1 2 0 0 {0}\r\n\r\n")
    assert r.next_event() == Request("REPL", ["1", "2", "0", "0", b""])
    ev = r.next_event()
    assert isinstance(ev, ProtocolErrorEvent) and ev.close and "REPL on a replication stream" in ev.text
    assert r.next_event() is NEED_DATA and r.closed      # nothing after the refusal
    r = StreamReader(max_literal=100)
    r.feed(b"GET a b\r\n")
    assert isinstance(r.next_event(), ProtocolErrorEvent)
    r = StreamReader(max_literal=4)
    r.feed(b"REPL 1 2 0 0 {9}\r\n")
    ev = r.next_event()
    assert isinstance(ev, ProtocolErrorEvent) and ev.close      # a literal over the limit


@pytest.mark.parametrize("bad", ["no-port", "host:", "host:http"])
def test_a_bad_peer_address_is_named_in_the_error(bad):
    """QA5 D-addr-split: cluster.py split "host:port" by hand ("not enough
    values to unpack"); it uses src.kvclient.split_addr now, which names the
    address (and strips an IPv6 literal's brackets)."""
    from kvserver.cluster import Conn
    with pytest.raises(ValueError, match="address must be host:port"):
        Conn(bad, "")
