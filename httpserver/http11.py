"""HTTP/1.1 message framing, pure: bytes in, events out; events in, bytes out.

In the manner of h11, this module knows nothing of sockets, threads or clocks.
The caller feeds what it received with `receive_data(data)` (`b""` means the
peer closed its side) and pulls events with `next_event()`; it turns its own
events into bytes with `send(event)` and writes them wherever it likes. The
same `Connection` class serves both directions: `Connection(SERVER)` parses
requests and formats responses (the frontends), `Connection(CLIENT)` formats
requests and parses responses (the load balancer's proxy, tests).

Events (one message is a head, zero or more `Data`, then `EndOfMessage`):

    Request(method, target, headers, version)     a request head
    Response(status, headers, reason, version)    a final response head
    InformationalResponse(status, headers, ...)   a 1xx head (100 Continue)
    Data(data)                                    a piece of a body
    EndOfMessage(trailers)                        the body is complete
    ConnectionClosed()                            the peer closed cleanly

`next_event()` may also return the sentinels NEED_DATA (feed more bytes) and
PAUSED (a message is complete; call `start_next_cycle()` once your side of the
exchange is done too, so the next pipelined message is parsed).

The state machine of one exchange, per direction:

    HEAD --head parsed--> BODY --last byte--> DONE --start_next_cycle--> HEAD
      \\                                         (only if both sides are DONE
       `--peer closed, nothing buffered--> CLOSED   and keep-alive holds)

(A CLIENT with keep-alive goes from the last byte straight back to HEAD:
responses are parsed back to back.)

Every framing error raises `ProtocolError(status, text)`, the one error root
of this module; `status` is what a server should answer with:

    400  bad request line or header line, obs-fold, both Content-Length and
         Transfer-Encoding, differing or non-numeric lengths, a bad chunk,
         a body cut short, HTTP/1.1 without exactly one Host
    413  a body over max_body_bytes (declared or while reading chunks)
    414  a request line over max_line_bytes
    417  an Expect other than 100-continue
    431  a header line over max_line_bytes or a head over max_header_bytes
    501  a transfer coding other than chunked
    505  an HTTP major version other than 1

Limits are enforced on the buffered bytes as they arrive, so a peer can never
make the parser hold more than max_header_bytes of head (plus what the caller
fed in one go). Bodies are never buffered: each `Data` is what was received.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Iterable

SERVER = "server"
CLIENT = "client"

# Defaults; the frontends pass src.config.HttpConfig's values.
MAX_LINE_BYTES = 8 * 1024          # RFC 9112 §3 recommends at least 8000 octets for the request line
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 ** 3
MAX_LENGTH_DIGITS = 18             # Content-Length: 10**18 bytes is far past any limit
MAX_CHUNK_SIZE_DIGITS = 16         # 16 hex digits = 2**64: longer sizes are an attack, not a file


class ProtocolError(Exception):
    """The peer broke HTTP/1.1 framing (or we were asked to); `status` to answer with."""

    def __init__(self, status: int, text: str):
        super().__init__(f"{status} {text}")
        self.status = status
        self.text = text


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")


class Headers:
    """An ordered, case-insensitive list of (name, value) header fields.

    Parsed headers keep lower-case names; headers given for sending keep the
    case they were given in. Values are str (latin-1, as bytes on the wire).
    """

    __slots__ = ("items", "_lower")

    def __init__(self, items: Iterable[tuple[str, str]] = (), lower: bool = False):
        self.items: list[tuple[str, str]] = list(items)
        self._lower = lower          # every name is lower-case already (parsed headers)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of `name`, or `default`."""
        name = name.lower()
        if self._lower:
            for n, v in self.items:
                if n == name:
                    return v
            return default
        for n, v in self.items:
            if n.lower() == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        if self._lower:
            return [v for n, v in self.items if n == name]
        return [v for n, v in self.items if n.lower() == name]

    def tokens(self, name: str) -> list[str]:
        """Every comma-separated element of every `name` field, lower-cased."""
        out = []
        for v in self.get_all(name):
            for t in v.split(","):
                t = t.strip()
                if t:
                    out.append(t.lower())
        return out

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __eq__(self, other) -> bool:
        return isinstance(other, Headers) and self.items == other.items

    def __repr__(self) -> str:
        return f"Headers({self.items!r})"


def _headers(h) -> Headers:
    if h is None:
        return Headers()
    return h if isinstance(h, Headers) else Headers(h)


class Event:
    __slots__ = ()

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{s}={getattr(self, s)!r}' for s in self.__slots__)})"


class Request(Event):
    __slots__ = ("method", "target", "headers", "version")

    def __init__(self, method: str, target: str, headers=None, version: str = "1.1"):
        self.method = method
        self.target = target
        self.headers = _headers(headers)
        self.version = version


class Response(Event):
    __slots__ = ("status", "headers", "reason", "version")

    def __init__(self, status: int, headers=None, reason: str = "", version: str = "1.1"):
        self.status = status
        self.headers = _headers(headers)
        self.reason = reason or REASONS.get(status, "")
        self.version = version


class InformationalResponse(Response):
    __slots__ = ()


class Data(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


class EndOfMessage(Event):
    __slots__ = ("trailers",)

    def __init__(self, trailers=None):
        self.trailers = _headers(trailers)


class ConnectionClosed(Event):
    __slots__ = ()


REASONS = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    204: "No Content", 206: "Partial Content", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
    416: "Range Not Satisfiable", 417: "Expectation Failed", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
    505: "HTTP Version Not Supported", 507: "Insufficient Storage",
}

# -- grammar (RFC 9110 §5.6.2, RFC 9112 §3) -----------------------------------

_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_STATUS_LINE = re.compile(rb"HTTP/([0-9])\.([0-9]) ([0-9]{3})(?: ([\x09\x20-\x7e\x80-\xff]*))?")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
# RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS token [ BWS "=" BWS ( token / quoted-string ) ] ).
# Checked, not just skipped: a bare LF or CR in there is where a proxy that
# ends lines at a bare LF and this parser would disagree (request smuggling).
_CHUNK_EXT = re.compile(rb'(?:[ \t]*;[ \t]*[-!#$%&\'*+.^_`|~0-9A-Za-z]+'
                        rb'(?:[ \t]*=[ \t]*(?:[-!#$%&\'*+.^_`|~0-9A-Za-z]+|"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]'
                        rb'|\\[\t \x21-\x7e\x80-\xff])*"))?)*[ \t]*')


def _parse_fields(lines: list[bytes], max_line: int, items: list) -> None:
    for line in lines:
        if len(line) > max_line:
            raise ProtocolError(431, "header line too long")
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(400, "obsolete line folding in header")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise ProtocolError(400, "malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise ProtocolError(400, "control character in header value")
        items.append((name.decode("ascii").lower(), value.decode("latin-1")))


def _content_length(headers: Headers, max_body: int) -> int | None:
    values = headers.get_all("content-length")
    if not values:
        return None
    seen = set()
    for v in values:
        for part in v.split(","):
            part = part.strip()
            if not part.isdigit() or not part.isascii():
                raise ProtocolError(400, "Content-Length is not a number")
            part = part.lstrip("0") or "0"
            if len(part) > MAX_LENGTH_DIGITS:       # int() of 4300+ digits even raises
                raise ProtocolError(413, f"a body of {len(part)} digits' length is over the {max_body}-byte limit")
            seen.add(int(part))
    if len(seen) != 1:
        raise ProtocolError(400, "differing Content-Length values")
    n = seen.pop()
    if n > max_body:
        raise ProtocolError(413, f"body of {n} bytes is over the {max_body}-byte limit")
    return n


def _is_chunked(headers: Headers) -> bool | None:
    """True for chunked, None without Transfer-Encoding; errors for anything else."""
    codings = headers.tokens("transfer-encoding")
    if not codings and not headers.get_all("transfer-encoding"):
        return None
    for c in codings:
        if c != "chunked":
            raise ProtocolError(501, f"transfer coding {c!r} is not implemented")
    if codings != ["chunked"]:
        raise ProtocolError(400, "malformed Transfer-Encoding")
    return True


# -- body readers: each turns buffered bytes into Data / EndOfMessage ----------

class _ContentLengthReader:
    __slots__ = ("remaining",)

    def __init__(self, n: int):
        self.remaining = n

    def read(self, buf: bytearray, conn: "Connection"):
        if self.remaining == 0:
            return EndOfMessage()
        if not buf:
            return None
        n = min(self.remaining, len(buf))
        data = bytes(buf[:n])
        del buf[:n]
        self.remaining -= n
        return Data(data)

    def eof(self):
        raise ProtocolError(400, f"body cut short: {self.remaining} bytes missing")


class _UntilCloseReader:
    """A response body without length: everything until the server closes."""

    __slots__ = ("done",)

    def __init__(self):
        self.done = False

    def read(self, buf: bytearray, conn: "Connection"):
        if self.done:
            return EndOfMessage()
        if not buf:
            return None
        data = bytes(buf)
        buf.clear()
        return Data(data)

    def eof(self):
        self.done = True
        return EndOfMessage()


class _ChunkedReader:
    """RFC 9112 §7.1: size-line [; extensions] CRLF, data CRLF, ..., 0 CRLF, trailers CRLF."""

    __slots__ = ("state", "remaining", "total", "max_body", "max_line", "max_header", "trailers")

    def __init__(self, max_body: int, max_line: int, max_header: int):
        self.state = "size"
        self.remaining = 0
        self.total = 0
        self.max_body = max_body
        self.max_line = max_line
        self.max_header = max_header
        self.trailers: list = []

    def read(self, buf: bytearray, conn: "Connection"):
        while True:
            if self.state == "size":
                i = buf.find(b"\r\n", 0, self.max_line + 2)
                if i < 0:
                    if len(buf) > self.max_line:
                        raise ProtocolError(400, "chunk size line too long")
                    return None
                line = bytes(buf[:i])
                del buf[:i + 2]
                size, semi, ext = line.partition(b";")
                size = size.strip(b" \t")
                if not _HEX.fullmatch(size) or len(size) > MAX_CHUNK_SIZE_DIGITS:
                    raise ProtocolError(400, "malformed chunk size")
                if semi and not _CHUNK_EXT.fullmatch(semi + ext):
                    raise ProtocolError(400, "malformed chunk extension")
                n = int(size, 16)
                if n == 0:
                    self.state = "trailers"
                    continue
                self.total += n
                if self.total > self.max_body:
                    raise ProtocolError(413, f"chunked body over the {self.max_body}-byte limit")
                self.remaining = n
                self.state = "data"
            elif self.state == "data":
                if not buf:
                    return None
                n = min(self.remaining, len(buf))
                data = bytes(buf[:n])
                del buf[:n]
                self.remaining -= n
                if self.remaining == 0:
                    self.state = "crlf"
                return Data(data)
            elif self.state == "crlf":
                if len(buf) < 2:
                    return None
                if buf[:2] != b"\r\n":
                    raise ProtocolError(400, "chunk data not followed by CRLF")
                del buf[:2]
                self.state = "size"
            elif self.state == "trailers":
                if buf[:2] == b"\r\n":
                    del buf[:2]
                    self.state = "done"
                    return EndOfMessage(Headers(self.trailers, lower=True) if self.trailers else None)
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > self.max_header:
                        raise ProtocolError(431, "trailers too large")
                    return None
                if end + 4 > self.max_header:
                    raise ProtocolError(431, "trailers too large")
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[:end + 4]
                _parse_fields(lines, self.max_line, self.trailers)
                self.state = "done"
                return EndOfMessage(Headers(self.trailers, lower=True))
            else:
                return EndOfMessage()

    def eof(self):
        raise ProtocolError(400, "chunked body cut short")


# -- the connection --------------------------------------------------------------

_NO_BODY_STATUS = (204, 304)


class Connection:
    """One HTTP/1.1 connection's framing state, for either role.

    `keep_alive` turns False as soon as either side asks to close or a
    message's framing needs the close; after that `start_next_cycle()` refuses
    and the caller should close the socket once its output is written.
    """

    def __init__(self, role: str = SERVER, max_line_bytes: int = MAX_LINE_BYTES,
                 max_header_bytes: int = MAX_HEADER_BYTES, max_body_bytes: int = MAX_BODY_BYTES):
        if role not in (SERVER, CLIENT):
            raise ValueError(f"role must be SERVER or CLIENT, not {role!r}")
        self.role = role
        self.max_line = max_line_bytes
        self.max_header = max_header_bytes
        self.max_body = max_body_bytes
        self._buf = bytearray()
        self._scan = 0               # where to resume searching for the end of the head
        self._eof = False
        self._in = "head"            # head | body | done | closed | error
        self._reader = None
        self._error: ProtocolError | None = None
        self._out = "idle"           # idle | body | done
        self._out_mode = None        # "length" | "chunked" | "none" | "close"
        self._out_remaining = 0
        self.keep_alive = True
        self.their_version: str | None = None
        # server: the request being answered; client: methods of requests sent, oldest first
        self.request: Request | None = None
        self._sent_methods: deque[str] = deque()
        self.they_are_waiting_for_100_continue = False

    # -- input -------------------------------------------------------------

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not yet parsed, and whether the peer has closed."""
        return bytes(self._buf), self._eof

    @property
    def in_state(self) -> str:
        return self._in

    @property
    def out_state(self) -> str:
        return self._out

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; `b""` means the peer closed (EOF)."""
        if data:
            if self._eof:
                raise ProtocolError(400, "data received after the end of the stream")
            self._buf += data
        else:
            self._eof = True

    def next_event(self):
        """The next event, NEED_DATA, or PAUSED. Raises ProtocolError on bad input."""
        if self._in == "error":
            raise self._error  # type: ignore[misc]
        try:
            return self._next_event()
        except ProtocolError as e:
            self._in = "error"
            self._error = e
            self.keep_alive = False
            raise

    def _next_event(self):
        if self._in == "head":
            ev = self._read_head()
            if ev is None:
                if self._eof:
                    if self._buf.strip(b"\r\n"):
                        raise ProtocolError(400, "connection closed in the middle of a message head")
                    self._in = "closed"
                    return ConnectionClosed()
                return NEED_DATA
            return ev
        if self._in == "body":
            ev = self._reader.read(self._buf, self)
            if ev is None:
                if not self._eof:
                    return NEED_DATA
                ev = self._reader.eof()
            if type(ev) is EndOfMessage:
                self._reader = None
                # A client parses pipelined responses back to back; a server
                # pauses until its response is out (start_next_cycle).
                self._in = "head" if self.role == CLIENT and self.keep_alive else "done"
            self.they_are_waiting_for_100_continue = False   # the body is coming (or came)
            return ev
        if self._in == "done":
            if self.role == CLIENT and self._eof:
                return ConnectionClosed()
            return PAUSED
        return ConnectionClosed()

    def _read_head(self):
        buf = self._buf
        if buf[:2] == b"\r\n":  # RFC 9112 §2.2: ignore empty lines before a message
            while buf[:2] == b"\r\n":
                del buf[:2]
            self._scan = 0
        end = buf.find(b"\r\n\r\n", max(0, self._scan - 3))
        if end < 0:
            if buf.find(b"\n\n", max(0, self._scan - 1)) >= 0:
                # A blank line of bare LFs (`nc`, a hand-written client): the
                # CRLF CRLF we wait for will never come; say so now instead
                # of a 408 after the idle timeout.
                raise ProtocolError(400, "lines must end in CRLF (\\r\\n), not a bare LF")
            self._scan = len(buf)
            self._check_partial_head()
            return None
        self._scan = 0
        if end + 4 > self.max_header:
            raise ProtocolError(431, "message head too large")
        head = bytes(buf[:end])
        del buf[:end + 4]
        lines = head.split(b"\r\n")
        if self.role == SERVER:
            return self._request_head(lines)
        return self._response_head(lines)

    def _check_partial_head(self) -> None:
        buf = self._buf
        nl = buf.find(b"\r\n")
        if nl < 0:
            if len(buf) > self.max_line:
                raise ProtocolError(414 if self.role == SERVER else 400, "request line too long")
        elif len(buf) - buf.rfind(b"\n") - 1 > self.max_line:
            raise ProtocolError(431, "header line too long")
        if len(buf) > self.max_header:
            raise ProtocolError(431, "message head too large")

    def _request_head(self, lines: list[bytes]) -> Request:
        first = lines[0]
        if len(first) > self.max_line:
            raise ProtocolError(414, "request line too long")
        parts = first.split(b" ")
        if len(parts) != 3:
            raise ProtocolError(400, "malformed request line")
        method, target, version = parts
        m = _VERSION.fullmatch(version)
        if not m:
            raise ProtocolError(400, "malformed HTTP version")
        if m.group(1) != b"1":
            raise ProtocolError(505, "only HTTP/1.x is supported")
        if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
            raise ProtocolError(400, "malformed request line")
        items: list = []
        _parse_fields(lines[1:], self.max_line, items)
        headers = Headers(items, lower=True)
        v = "1.0" if m.group(2) == b"0" else "1.1"
        hosts = headers.get_all("host")
        if len(hosts) > 1 or (v == "1.1" and not hosts):
            raise ProtocolError(400, "HTTP/1.1 requests need exactly one Host header")
        chunked = _is_chunked(headers)
        length = _content_length(headers, self.max_body)
        if chunked and length is not None:
            raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
        if chunked and v == "1.0":
            raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        req = Request(method.decode("ascii"), target.decode("ascii"), headers, v)
        conn_tokens = headers.tokens("connection") if "connection" in headers else ()
        if v == "1.0":
            self.keep_alive = self.keep_alive and "keep-alive" in conn_tokens
        elif "close" in conn_tokens:
            self.keep_alive = False
        self.their_version = v
        self.request = req
        expect = headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise ProtocolError(417, f"unknown expectation {expect!r}")
            self.they_are_waiting_for_100_continue = v == "1.1" and bool(chunked or length)
        if chunked:
            self._reader = _ChunkedReader(self.max_body, self.max_line, self.max_header)
        else:
            self._reader = _ContentLengthReader(length or 0)
        self._in = "body"
        return req

    def _response_head(self, lines: list[bytes]) -> Response:
        m = _STATUS_LINE.fullmatch(lines[0])
        if not m:
            raise ProtocolError(400, "malformed status line")
        if m.group(1) != b"1":
            raise ProtocolError(505, "only HTTP/1.x is supported")
        status = int(m.group(3))
        items: list = []
        _parse_fields(lines[1:], self.max_line, items)
        headers = Headers(items, lower=True)
        v = "1.0" if m.group(2) == b"0" else "1.1"
        reason = (m.group(4) or b"").decode("latin-1")
        if 100 <= status < 200:
            return InformationalResponse(status, headers, reason, v)
        if not self._sent_methods:
            raise ProtocolError(400, "a response without a request")
        method = self._sent_methods.popleft()
        self.their_version = v
        conn_tokens = headers.tokens("connection")
        if v == "1.0" and "keep-alive" not in conn_tokens or "close" in conn_tokens:
            self.keep_alive = False
        if method == "HEAD" or status in _NO_BODY_STATUS:
            self._reader = _ContentLengthReader(0)
        else:
            chunked = _is_chunked(headers)
            length = _content_length(headers, self.max_body)
            if chunked and length is not None:
                raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
            if chunked:
                self._reader = _ChunkedReader(self.max_body, self.max_line, self.max_header)
            elif length is not None:
                self._reader = _ContentLengthReader(length)
            else:
                self._reader = _UntilCloseReader()
                self.keep_alive = False
        self._in = "body"
        return Response(status, headers, reason, v)

    # -- output ---------------------------------------------------------------

    def send(self, event) -> bytes:
        """The bytes for `event`. Raises ProtocolError(500, ...) when used wrongly."""
        t = type(event)
        if t is Data:
            return self._send_data(event.data)
        if t is EndOfMessage:
            return self._send_end(event)
        if t is InformationalResponse:
            if self.role != SERVER:
                raise ProtocolError(500, "only servers send informational responses")
            self.they_are_waiting_for_100_continue = False
            return self._head_bytes(f"HTTP/1.1 {event.status} {event.reason}", event.headers.items)
        if t is Response:
            return self._send_response(event)
        if t is Request:
            return self._send_request(event)
        if t is ConnectionClosed:
            self.keep_alive = False
            return b""
        raise ProtocolError(500, f"cannot send {event!r}")

    def _head_bytes(self, first: str, items) -> bytes:
        lines = [first]
        for n, v in items:
            if "\n" in v or "\r" in v or "\n" in n or "\r" in n:
                raise ProtocolError(500, f"line break inside header {n!r}")  # response splitting
            lines.append(f"{n}: {v}")
        lines.append("\r\n")
        try:
            return "\r\n".join(lines).encode("latin-1")
        except UnicodeEncodeError:
            raise ProtocolError(500, "header values must be latin-1") from None

    def _send_response(self, resp: Response) -> bytes:
        if self.role != SERVER:
            raise ProtocolError(500, "clients send requests, not responses")
        if self._out != "idle" or self.request is None:
            raise ProtocolError(500, "no request to answer")
        status = resp.status
        items = list(resp.headers.items)
        names = {n.lower() for n, _ in items}
        head_only = self.request.method == "HEAD" or status in _NO_BODY_STATUS
        if "content-length" in names:
            n = resp.headers.get("content-length")
            try:
                self._out_remaining = int(n)
            except (TypeError, ValueError):
                raise ProtocolError(500, "bad Content-Length in response") from None
            self._out_mode = "length"
        elif "transfer-encoding" in names:
            self._out_mode = "chunked"
        elif status in _NO_BODY_STATUS:
            self._out_mode = "none"
        elif self.request.method == "HEAD":
            self._out_mode = "none"
        elif self.their_version == "1.1":
            self._out_mode = "chunked"
            items.append(("Transfer-Encoding", "chunked"))
        else:
            self._out_mode = "close"
            self.keep_alive = False
        if head_only:
            self._out_mode = "none"
        if self.they_are_waiting_for_100_continue and self._in == "body":
            # They have not sent the body; we cannot know where the next request starts.
            self.keep_alive = False
        self.they_are_waiting_for_100_continue = False
        if "connection" in names and "close" in resp.headers.tokens("connection"):
            self.keep_alive = False
        if not self.keep_alive:
            if "connection" not in names:
                items.append(("Connection", "close"))
        elif self.their_version == "1.0":
            items.append(("Connection", "keep-alive"))
        self._out = "body"
        return self._head_bytes(f"HTTP/1.1 {status} {resp.reason}", items)

    def _send_request(self, req: Request) -> bytes:
        if self.role != CLIENT:
            raise ProtocolError(500, "servers send responses, not requests")
        if self._out != "idle":
            raise ProtocolError(500, "the previous request is not finished")
        if "host" not in req.headers:
            raise ProtocolError(500, "HTTP/1.1 requests need a Host header")
        items = req.headers.items
        if req.headers.get("content-length") is not None:
            self._out_mode = "length"
            self._out_remaining = int(req.headers.get("content-length"))
        elif req.headers.get("transfer-encoding") is not None:
            self._out_mode = "chunked"
        else:
            self._out_mode = "length"
            self._out_remaining = 0
        if "close" in req.headers.tokens("connection"):
            self.keep_alive = False
        self._sent_methods.append(req.method)
        self._out = "body"
        return self._head_bytes(f"{req.method} {req.target} HTTP/1.1", items)

    def _send_data(self, data: bytes) -> bytes:
        if self._out != "body":
            raise ProtocolError(500, "data outside a message body")
        mode = self._out_mode
        if mode == "chunked":
            if not data:
                return b""
            return b"%x\r\n%s\r\n" % (len(data), data)
        if mode == "length":
            if len(data) > self._out_remaining:
                raise ProtocolError(500, "more data than Content-Length")
            self._out_remaining -= len(data)
            return bytes(data)
        if mode == "none":
            return b""
        return bytes(data)

    def _send_end(self, ev: EndOfMessage) -> bytes:
        if self._out != "body":
            raise ProtocolError(500, "end of a message that was not started")
        # A client may pipeline its next request at once; a server waits for start_next_cycle.
        self._out = "idle" if self.role == CLIENT else "done"
        if self._out_mode == "chunked":
            if ev.trailers:
                return self._head_bytes("0", ev.trailers.items)
            return b"0\r\n\r\n"
        if self._out_mode == "length" and self._out_remaining:
            self.keep_alive = False
            raise ProtocolError(500, f"{self._out_remaining} bytes short of Content-Length")
        return b""

    # -- cycles ----------------------------------------------------------------

    def start_next_cycle(self) -> None:
        """Server side: reset for the next request (request read, response sent, keep-alive)."""
        if not self.keep_alive:
            raise ProtocolError(500, "the connection is not reusable")
        if self._in != "done" or self._out != "done":
            raise ProtocolError(500, "the current exchange is not finished")
        self._in = "head"
        self._out = "idle"
        self.request = None
        self.they_are_waiting_for_100_continue = False
