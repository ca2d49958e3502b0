"""The streaming multipart/form-data parser: whole, byte by byte, odd pieces,
bounded memory for a large part, errors, and fuzzing."""

import random

import pytest

from httpserver.multipart import (NEED_DATA, Done, MultipartError, MultipartParser, PartData, PartEnd,
                                  PartStart, boundary_from_content_type, parse_header_params)

B = b"----WebKitFormBoundaryAbc123"


def body(*parts: tuple[bytes, bytes], preamble=b"", epilogue=b"") -> bytes:
    out = preamble + b"".join(b"--" + B + b"\r\n" + h + b"\r\n\r\n" + c + b"\r\n" for h, c in parts)
    return out + b"--" + B + b"--" + epilogue


def parse(data: bytes, step: int | None = None):
    """[(headers dict, content bytes)] of every part."""
    p = MultipartParser(B)
    pieces = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    pieces.append(b"")
    parts, cur, done = [], None, False
    for piece in pieces:
        p.feed(piece)
        while not done:
            ev = p.next_event()
            if ev is NEED_DATA:
                break
            if type(ev) is PartStart:
                cur = [dict(ev.headers.items), b""]
            elif type(ev) is PartData:
                cur[1] += ev.data
            elif type(ev) is PartEnd:
                parts.append(tuple(cur))
            elif type(ev) is Done:
                done = True
    assert done
    return parts


CONTENTS = [b"", b"x", b"tok", b"line1\r\nline2", b"\r\n", b"--", b"\r\n--" + B[:-1] + b"X", b"\r" * 5,
            bytes(range(256)) * 3]


@pytest.mark.parametrize("content", CONTENTS)
def test_contents_survive_any_split(content):
    data = body((b'Content-Disposition: form-data; name="csrf"', b"T0k"),
                (b'Content-Disposition: form-data; name="file"; filename="a.bin"\r\n'
                 b"Content-Type: application/octet-stream", content),
                preamble=b"ignored preamble\r\n", epilogue=b"\r\nignored epilogue")
    want = [({"content-disposition": 'form-data; name="csrf"'}, b"T0k"),
            ({"content-disposition": 'form-data; name="file"; filename="a.bin"',
              "content-type": "application/octet-stream"}, content)]
    for step in (None, 1, 2, 3, 7, 64):
        assert parse(data, step) == want


def test_utf8_file_name_and_part_without_headers():
    data = body(('Content-Disposition: form-data; name="f"; filename="résumé \\"v2\\".txt"'.encode(), b"x"))
    data = data.replace(b"--" + B + b"--", b"--" + B + b"\r\n\r\nbare\r\n--" + B + b"--")  # a part with no headers
    parts = parse(data)
    disp, params = parse_header_params(parts[0][0]["content-disposition"])
    assert disp == "form-data" and params == {"name": "f", "filename": 'résumé "v2".txt'}
    assert parts[1] == ({}, b"bare")


# (filename parameter as sent, name meant). Browsers (HTML's multipart/form-data
# encoding) send a backslash raw and a '"' as %22; old clients sent RFC 2616
# quoted-pairs. A backslash is only taken as an escape where it cannot be a real one.
FILENAMES = [
    (r'"back\slash a\b.txt"', r"back\slash a\b.txt"),
    (r'"quote%22semi;colon\back.txt"', r"quote%22semi;colon\back.txt"),
    (r'"trail\"', "trail\\"),                                 # a name ending in a backslash
    (r'"trail\" ; name="file"', "trail\\"),                   # ... followed by another parameter
    (r'"two\\"', "two\\\\"),                                  # two backslashes stay two
    (r'"C:\Users\me\x.txt"', r"C:\Users\me\x.txt"),           # the app, not the parser, strips a path
    (r'"say \"hi\".txt"', 'say "hi".txt'),                    # old-style escaped quotes
    (r'"\"quoted\""', '"quoted"'),
    (r'"a\";b.txt"', 'a";b.txt'),                             # ';' then no parameter: still an escape
]


@pytest.mark.parametrize("sent, meant", FILENAMES)
def test_file_name_backslashes(sent, meant):
    disp, params = parse_header_params(f'form-data; name="file"; filename={sent}')
    assert params["filename"] == meant and params["name"] == "file"
    # and as the first parameter, before name=
    disp, params = parse_header_params(f'form-data; filename={sent}; name="file"')
    assert params["filename"] == meant and params["name"] == "file"


def test_large_part_is_streamed_with_bounded_memory():
    p = MultipartParser(B)
    p.feed(b"--" + B + b'\r\nContent-Disposition: form-data; name="f"; filename="big"\r\n\r\n')
    assert type(p.next_event()) is PartStart
    chunk = bytes(range(256)) * 256  # 64 KiB, full of CRs and dashes
    total = 0
    for _ in range(160):  # 10 MiB
        p.feed(chunk)
        while (ev := p.next_event()) is not NEED_DATA:
            total += len(ev.data)
        assert len(p._buf) < len(B) + 8, "the parser must not hold the content back"
    p.feed(b"\r\n--" + B + b"--\r\n")
    while type(ev := p.next_event()) is PartData:
        total += len(ev.data)
    assert type(ev) is PartEnd and total == 160 * len(chunk)
    assert type(p.next_event()) is Done


@pytest.mark.parametrize("data", [
    b"no delimiter at all",
    b"--" + B + b"\r\nContent-Disposition: form-data\r\n\r\ncut in the content",
    b"--" + B + b"\r\nContent-Disposition: form-data",
    b"--" + B + b"junk-after-delimiter\r\n\r\n\r\n--" + B + b"--",
    b"--" + B + b"\r\nBad Header Line\r\n\r\nx\r\n--" + B + b"--",
    b"--" + B + b"\r\nX: " + b"v" * 20000 + b"\r\n\r\nx\r\n--" + B + b"--",
])
def test_malformed_bodies(data):
    for step in (None, 1):
        with pytest.raises(MultipartError) as ei:
            parse(data, step)
        assert ei.value.status == 400


def test_boundary_from_content_type():
    assert boundary_from_content_type('multipart/form-data; boundary="a b"') == b"a b"
    assert boundary_from_content_type("Multipart/Form-Data; charset=utf-8; boundary=xyz") == b"xyz"
    for bad in (None, "text/plain", "multipart/form-data", "multipart/form-data; boundary=" + "x" * 71,
                "multipart/form-data; boundary=a\x00b"):
        with pytest.raises(MultipartError):
            boundary_from_content_type(bad)


def test_fuzz_only_multipart_errors():
    rng = random.Random(11)
    seed = body((b'Content-Disposition: form-data; name="a"', b"1\r\n2"),
                (b'Content-Disposition: form-data; name="f"; filename="x"', b"\r\n--" + B[:5]))
    alphabet = b"\r\n-:; \"=abcX\x00"
    for _ in range(2000):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            if rng.random() < 0.5:
                data[pos] = rng.choice(alphabet)
            else:
                del data[pos]
        try:
            parse(bytes(data), rng.choice((None, 1, 5, 13)))
        except MultipartError:
            pass
