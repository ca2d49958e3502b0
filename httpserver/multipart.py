"""A streaming multipart/form-data parser (RFC 7578, RFC 2046 §5.1), pure.

Like the HTTP codec it does no I/O: `feed(data)` (`b""` for the end of the
body) and `next_event()`, which returns one of

    PartStart(headers)   a part's header block (a `http11.Headers`)
    PartData(data)       a piece of the current part's content
    PartEnd()            the current part is complete
    Done()               the closing delimiter was seen (the epilogue is ignored)
    NEED_DATA            feed more bytes

Memory stays bounded whatever the size of a part: a part's content is handed
out as it arrives, holding back only the last len(delimiter) bytes that
might be the start of the delimiter. Part headers are capped at
MAX_PART_HEADER_BYTES and the number of parts at MAX_PARTS. Bad input raises
`MultipartError` (a 400).

Grammar, with delimiter = CRLF "--" boundary:

    preamble  "--" boundary [transport-padding] CRLF
    headers CRLF CRLF  content  CRLF "--" boundary [transport-padding] CRLF
    ...                content  CRLF "--" boundary "--"  [epilogue]
"""

from __future__ import annotations

import re

from httpserver.http11 import NEED_DATA, Headers, ProtocolError, _parse_fields

MAX_PART_HEADER_BYTES = 16 * 1024
MAX_PARTS = 10_000
MAX_BOUNDARY = 70          # RFC 2046 §5.1.1


class MultipartError(ProtocolError):
    def __init__(self, text: str):
        super().__init__(400, text)


class PartStart:
    __slots__ = ("headers",)

    def __init__(self, headers: Headers):
        self.headers = headers

    def __repr__(self):
        return f"PartStart({self.headers!r})"


class PartData:
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __repr__(self):
        return f"PartData({self.data!r})"


class PartEnd:
    __slots__ = ()

    def __repr__(self):
        return "PartEnd()"


class Done:
    __slots__ = ()

    def __repr__(self):
        return "Done()"


_BOUNDARY_CHARS = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")


def boundary_from_content_type(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` header; MultipartError if none."""
    if not content_type:
        raise MultipartError("no Content-Type")
    mtype, params = parse_header_params(content_type)
    if mtype != "multipart/form-data":
        raise MultipartError("not multipart/form-data")
    b = params.get("boundary", "")
    if not _BOUNDARY_CHARS.fullmatch(b):
        raise MultipartError("missing or malformed boundary")
    return b.encode("ascii")


# What may follow the closing quote of a parameter: the end, or the next parameter.
_AFTER_QUOTE = re.compile(r'[ \t]*(?:$|;[ \t]*(?:$|[^ \t;="\\]+[ \t]*=))')


def parse_header_params(value: str) -> tuple[str, dict[str, str]]:
    r"""`type; a=1; b="x y"` -> ("type", {"a": "1", "b": "x y"}).

    Quoted values are read the way browsers write them (HTML's
    multipart/form-data encoding): a '"' in a file name is sent as %22 and a
    backslash as it is, so `filename="a\b.txt"` names `a\b.txt`. Old clients
    escaped '"' as an RFC 2616 quoted-pair (`\"`); that is still understood,
    but only where it cannot be a real backslash: a `\"` that could close the
    value (the end or another parameter follows) closes it, so a name ending
    in a backslash stays whole. `\\` stays two backslashes: a name may hold
    two, and guessing would lose one.
    """
    i, n = 0, len(value)
    semi = value.find(";")
    main = (value if semi < 0 else value[:semi]).strip().lower()
    params: dict[str, str] = {}
    i = n if semi < 0 else semi + 1
    while i < n:
        eq = value.find("=", i)
        if eq < 0:
            break
        name = value[i:eq].strip().lower()
        i = eq + 1
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            i += 1
            out = []
            while i < n and value[i] != '"':
                if value.startswith('\\"', i) and not _AFTER_QUOTE.match(value, i + 2):
                    i += 1  # an old-style escaped quote: keep the quote only
                out.append(value[i])
                i += 1
            v = "".join(out)
            semi = value.find(";", i)
            i = n if semi < 0 else semi + 1
        else:
            semi = value.find(";", i)
            end = n if semi < 0 else semi
            v = value[i:end].strip()
            i = end + 1
        if name and name not in params:
            params[name] = v
    return main, params


class MultipartParser:
    def __init__(self, boundary: bytes, max_part_header_bytes: int = MAX_PART_HEADER_BYTES,
                 max_parts: int = MAX_PARTS):
        if not 1 <= len(boundary) <= MAX_BOUNDARY:
            raise MultipartError("boundary must be 1 to 70 characters")
        self._first = b"--" + boundary
        self._delim = b"\r\n--" + boundary
        self._buf = bytearray()
        self._eof = False
        self._state = "preamble"   # preamble | after_delim | headers | body | done
        self._max_header = max_part_header_bytes
        self._max_parts = max_parts
        self._parts = 0

    def feed(self, data: bytes) -> None:
        if data:
            if self._state != "done":
                self._buf += data
        else:
            self._eof = True

    def next_event(self):
        while True:
            st = self._state
            buf = self._buf
            if st == "body":
                i = buf.find(self._delim)
                if i == 0:
                    del buf[:len(self._delim)]
                    self._state = "after_delim"
                    return PartEnd()
                if i > 0:
                    data = bytes(buf[:i])
                    del buf[:i]
                    return PartData(data)
                # Only a CR among the last len(delimiter)-1 bytes can start a
                # delimiter that is still arriving: hold back from there on.
                j = buf.find(b"\r", max(0, len(buf) - len(self._delim) + 1))
                cut = len(buf) if j < 0 else j
                if cut > 0:
                    data = bytes(buf[:cut])
                    del buf[:cut]
                    return PartData(data)
                if self._eof:
                    raise MultipartError("body ended inside a part")
                return NEED_DATA
            if st == "after_delim":
                if len(buf) < 2:
                    if self._eof:
                        raise MultipartError("body ended after a delimiter")
                    return NEED_DATA
                if buf[:2] == b"--":
                    self._state = "done"
                    buf.clear()
                    return Done()
                i = buf.find(b"\r\n")
                if i < 0:
                    if len(buf) > 256 or self._eof:
                        raise MultipartError("malformed delimiter line")
                    return NEED_DATA
                if buf[:i].strip(b" \t"):
                    raise MultipartError("malformed delimiter line")
                del buf[:i + 2]
                self._parts += 1
                if self._parts > self._max_parts:
                    raise MultipartError("too many parts")
                self._state = "headers"
                continue
            if st == "headers":
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    self._state = "body"
                    return PartStart(Headers())
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(buf) > self._max_header:
                        raise MultipartError("part headers too large")
                    if self._eof:
                        raise MultipartError("body ended inside part headers")
                    return NEED_DATA
                if i + 4 > self._max_header:
                    raise MultipartError("part headers too large")
                lines = bytes(buf[:i]).split(b"\r\n")
                del buf[:i + 4]
                items: list = []
                try:
                    _parse_fields(lines, self._max_header, items)
                except ProtocolError as e:
                    raise MultipartError(f"bad part header: {e.text}") from None
                # Browsers send file names as raw UTF-8: re-decode what latin-1 gave us.
                items = [(n, _utf8(v)) for n, v in items]
                self._state = "body"
                return PartStart(Headers(items, lower=True))
            if st == "preamble":
                if buf.startswith(self._first):
                    del buf[:len(self._first)]
                    self._state = "after_delim"
                    continue
                i = buf.find(self._delim)
                if i >= 0:
                    del buf[:i + len(self._delim)]
                    self._state = "after_delim"
                    continue
                keep = len(self._delim)
                if len(buf) > keep:
                    del buf[:len(buf) - keep]
                if self._eof:
                    raise MultipartError("no multipart delimiter in the body")
                return NEED_DATA
            return Done()


def _utf8(v: str) -> str:
    try:
        return v.encode("latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return v
