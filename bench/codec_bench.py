"""Codec benchmark: how fast src/kvproto parses, with no sockets involved.

    .venv/bin/python bench/codec_bench.py

Prints one line per case: a 64 MiB literal fed in 64 KiB pieces (the
parser must stay linear: no re-copying of what it holds), the same value as
a reply, and many small pipelined requests and replies.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.kvproto import NEED_DATA, ReplyParser, RequestParser, encode_request, value_parts  # noqa: E402

MiB = 1024 * 1024


def feed_all(parser, data: bytes, piece: int) -> int:
    n = 0
    mv = memoryview(data)
    for i in range(0, len(mv), piece):
        parser.feed(mv[i:i + piece])
        while parser.next_event() is not NEED_DATA:
            n += 1
    return n


def timed(label: str, size: int, count_expected: int, fn) -> None:
    t = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t
    assert n == count_expected, (label, n)
    print(f"{label:<44} {dt * 1000:9.1f} ms {size / MiB / dt:9.0f} MiB/s {n / dt:12.0f} events/s")


def main() -> int:
    print(f"{'case':<44} {'time':>12} {'throughput':>15} {'rate':>19}")
    big = os.urandom(64 * MiB)
    req = b"".join(encode_request("PUT", "row", "col", big))
    timed("request: one 64 MiB literal, 64 KiB pieces", len(req), 1,
          lambda: feed_all(RequestParser(), req, 64 * 1024))
    rep = b"".join(value_parts(big))
    timed("reply: one 64 MiB value, 64 KiB pieces", len(rep), 1,
          lambda: feed_all(ReplyParser(), rep, 64 * 1024))
    small = b"".join(b"".join(encode_request("PUT", b"user%d" % i, b"col", b"v" * 100)) for i in range(100_000))
    timed("request: 100,000 pipelined PUTs of 100 B", len(small), 100_000,
          lambda: feed_all(RequestParser(), small, 64 * 1024))
    gets = b"GET alice greeting\r\n" * 100_000
    timed("request: 100,000 pipelined GET token lines", len(gets), 100_000,
          lambda: feed_all(RequestParser(), gets, 64 * 1024))
    replies = b"".join(b"".join(value_parts(b"v" * 100)) for _ in range(100_000))
    timed("reply: 100,000 values of 100 B", len(replies), 100_000,
          lambda: feed_all(ReplyParser(), replies, 64 * 1024))
    return 0


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()   # --help; no options
    sys.exit(main())
