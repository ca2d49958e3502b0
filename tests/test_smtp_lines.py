"""smtp/lines.py: bounded command lines, fed whole and one byte at a time."""

import pytest

from smtp.lines import TOO_LONG, next_line


def lines_of(chunks, limit):
    buf, skipping, got = bytearray(), False, []
    for c in chunks:
        buf += c
        while True:
            line, skipping = next_line(buf, limit, skipping)
            if line is None:
                break
            got.append(line)
        assert len(buf) <= limit + len(c)  # never more than one chunk past the limit
    return got, bytes(buf)


@pytest.mark.parametrize("data, want, rest", [
    (b"NOOP\r\nQUIT\r\n", [b"NOOP\r\n", b"QUIT\r\n"], b""),
    (b"NOOP\nQU", [b"NOOP\n"], b"QU"),
    (b"x" * 20 + b"\r\nNOOP\r\n", [TOO_LONG, b"NOOP\r\n"], b""),       # reported once, at its end
    (b"x" * 9 + b"\n", [b"x" * 9 + b"\n"], b""),                        # exactly the limit
    (b"x" * 10 + b"\n", [TOO_LONG], b""),
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_lines(data, want, rest, bytewise):
    chunks = [data[i:i + 1] for i in range(len(data))] if bytewise else [data]
    got, left = lines_of(chunks, limit=10)
    assert got == want
    assert left == rest
