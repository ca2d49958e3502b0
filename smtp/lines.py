"""Bounded command lines, shared by the pure SMTP and POP3 dialogues.

Both protocols read commands as lines ending in LF (CRLF in practice) with a
length limit (RFC 5321 4.5.3.1.4, RFC 2449 4). An over-long line must not be
buffered without bound, and must not be half-read: its first bytes would
otherwise be taken as a command. So an over-long line is discarded as it
arrives and reported once, when its end (the LF) is in.
"""

from __future__ import annotations

TOO_LONG = object()  # next_line's answer for a line over the limit, read to its end


def next_line(buf: bytearray, limit: int, skipping: bool) -> tuple[bytes | object | None, bool]:
    """Take one line, LF included, off the front of `buf`.

    `skipping` is True while an over-long line is being discarded; the caller
    keeps it between calls. Returns `(line, skipping)` where `line` is the
    line's bytes, TOO_LONG for a line over `limit` bytes, or None when no
    whole line is buffered yet.
    """
    i = buf.find(b"\n")
    if i < 0:
        if len(buf) > limit:
            del buf[:]
            return None, True
        return None, skipping
    line = bytes(buf[: i + 1])
    del buf[: i + 1]
    if skipping or len(line) > limit:
        return TOO_LONG, False
    return line, False
