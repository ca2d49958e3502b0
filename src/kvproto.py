"""The KV wire protocol (PROTOCOL.md), as a pure codec: bytes in, events out.

No sockets, threads or clocks here. A server feeds what it receives into a
`RequestParser` and pulls `Request`s (or `ProtocolErrorEvent`s to answer)
out; it builds replies with `ok`, `pong`, `value`, `listing`, `error`. A
client builds requests with `encode_request` and feeds replies into a
`ReplyParser`. Both parsers are incremental, so one `recv` need not be one
message, and several pipelined messages may arrive in one `recv`.

The request parser is a small state machine:

      +--------+  line with literals  +----------+  N bytes + CRLF  +----------+
      |  LINE  | -------------------> | LITERAL  | ---------------> | (next    |
      |        | <------------------- | (1 by 1) |                  | literal) |
      +--------+   all read: event    +----------+                  +----------+
          |  line too long / literal not followed by CRLF
          v
      +--------+
      | CLOSED |   the event says close=True; everything later is ignored
      +--------+

Invariants:
- Nothing is buffered beyond one request line (at most `max_line` bytes plus
  whatever the caller fed in one piece) and the literal being kept (at most
  `max_literal` bytes). A literal that will be refused (over the limit, or on
  a line that is already refused) is counted down, never stored.
- Every literal announced on a line is read before the line's event is
  returned, so the next request starts at the right byte.
- Every error but two leaves the connection usable: a line over `max_line`
  bytes and a literal not followed by CRLF/LF close it (the parser cannot know
  where the next request starts).

The command table is data (`CommandSpec`: one argument kind per position), so
the master and the replication layer pass extended tables instead of
subclassing the parser.

Argument kinds:
  NAME   percent-decoded, 1..4096 bytes (`{5}` is an ordinary name)
  VALUE  a percent-decoded token, or a literal `{N}` (N raw bytes follow)
  RAW    the token as it is, a `str` (e.g. ROWS's `<tablet> <after> <limit>`)
  TEXT   percent-decoded bytes of any length (e.g. the AUTH secret)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Union

from src.kv import KVError, error_from_reply

__all__ = [
    "MAX_LINE", "MAX_NAME", "MAX_VALUE", "NAME", "VALUE", "RAW", "TEXT", "CommandSpec",
    "DATA_COMMANDS", "ADMIN_COMMANDS", "MASTER_COMMANDS", "COMMANDS", "KVProtocolError",
    "NEED_DATA", "Request", "ProtocolErrorEvent", "RequestParser", "ok", "pong", "value",
    "value_parts", "listing", "name_listing", "error", "error_for", "encode_name", "decode_name",
    "encode_request", "Ok", "Value", "Listing", "Error", "ReplyParser", "error_from_reply",
]

# -- limits (PROTOCOL.md "Framing") --------------------------------------------

MAX_LINE = 65536                 # bytes of a request line before its CRLF
MAX_NAME = 4096                  # bytes of a row or column name, decoded
MAX_VALUE = 64 * 1024 * 1024     # default cell limit; servers pass their configured one
MAX_LITERAL_DIGITS = 18          # `{N}` with more significant digits cannot be a real value: BADREQ,
                                 # like `{abc}` (no bytes follow it that anyone could send)
MAX_REPLY_LINE = 1024 * 1024     # a reply's status or listing line (generous: clients trust servers)
MAX_REPLY_VALUE = 1024 * 1024 * 1024   # a `$N` value or a whole `*N` listing, in bytes

# -- argument kinds and the command table --------------------------------------

NAME = "name"
VALUE = "value"
RAW = "raw"
TEXT = "text"
_KINDS = (NAME, VALUE, RAW, TEXT)


@dataclass(frozen=True)
class CommandSpec:
    """The arguments of one command: one kind per position.

    With `variadic=True` the last kind may repeat zero or more times beyond
    the fixed positions (`args[:-1]` are required), for internal commands
    such as a batch of log records.
    """

    args: tuple[str, ...] = ()
    variadic: bool = False

    def __post_init__(self):
        for k in self.args:
            if k not in _KINDS:
                raise ValueError(f"unknown argument kind {k!r}")
        if self.variadic and not self.args:
            raise ValueError("a variadic command needs at least one argument kind")

    def kind_at(self, i: int) -> str:
        return self.args[i] if i < len(self.args) else self.args[-1]

    def accepts(self, n: int) -> bool:
        if self.variadic:
            return n >= len(self.args) - 1
        return n == len(self.args)

    def arity_text(self) -> str:
        if self.variadic:
            return f"at least {len(self.args) - 1}"
        return str(len(self.args))


def _spec(*kinds: str) -> CommandSpec:
    return CommandSpec(tuple(kinds))


DATA_COMMANDS: dict[str, CommandSpec] = {
    "PING": _spec(),
    "PUT": _spec(NAME, NAME, VALUE),
    "PUTNX": _spec(NAME, NAME, VALUE),
    "GET": _spec(NAME, NAME),
    "CPUT": _spec(NAME, NAME, VALUE, VALUE),
    "DELETE": _spec(NAME, NAME),
    "COLS": _spec(NAME),
    "DELROW": _spec(NAME),
    "QUIT": _spec(),
}

ADMIN_COMMANDS: dict[str, CommandSpec] = {
    "STATUS": _spec(),
    "TABLETS": _spec(),
    "ROWS": _spec(RAW, RAW, RAW),
    "AUTH": _spec(TEXT),
    "KILL": _spec(),
    "WAKE": _spec(),
}

MASTER_COMMANDS: dict[str, CommandSpec] = {
    "PING": _spec(),
    "MAP": _spec(),
    "LOOKUP": _spec(NAME),
    "NODES": _spec(),
    "AUTH": _spec(TEXT),
    "QUIT": _spec(),
}

# Every command of PROTOCOL.md; a server passes the subset (or superset) it serves.
COMMANDS: dict[str, CommandSpec] = {**DATA_COMMANDS, **ADMIN_COMMANDS, **MASTER_COMMANDS}


def _normalise_table(commands) -> dict[str, CommandSpec]:
    table = {}
    for name, spec in commands.items():
        if not isinstance(spec, CommandSpec):
            spec = CommandSpec(tuple(spec))
        table[name.upper()] = spec
    return table


# -- errors and events ---------------------------------------------------------


class KVProtocolError(Exception):
    """Input the codec cannot make sense of.

    The request parser never raises it for bad requests (those become
    `ProtocolErrorEvent`s to answer); the reply parser raises it for a reply
    that breaks the protocol, after which the connection must be dropped.
    `code`/`text` are what a server would answer; `close` says the stream
    cannot be resynchronised.
    """

    def __init__(self, code: str, text: str, close: bool = True):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text
        self.close = close


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()   # "feed me more bytes"


@dataclass(slots=True)
class Request:
    """A well-formed request: `cmd` upper-cased, `args` decoded by kind
    (NAME/VALUE/TEXT -> bytes, RAW -> str)."""

    cmd: str
    args: list = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ProtocolErrorEvent:
    """A refused request: answer `reply()`; if `close`, then close the connection."""

    code: str
    text: str
    close: bool = False

    def reply(self) -> bytes:
        return error(self.code, self.text)


# -- the receive buffer shared by both parsers ---------------------------------


class _ReceiveBuffer:
    """Bytes received but not yet parsed, with a remembered newline scan position
    so that a line fed one byte at a time is scanned once, not quadratically."""

    __slots__ = ("data", "_scanned")

    def __init__(self):
        self.data = bytearray()
        self._scanned = 0

    def __len__(self) -> int:
        return len(self.data)

    def append(self, b) -> None:
        self.data += b

    def clear(self) -> None:
        self.data.clear()
        self._scanned = 0

    def take_line(self, max_line: int):
        """The next line without its CRLF/LF; None if incomplete; False if over max_line."""
        d = self.data
        i = d.find(b"\n", self._scanned)
        if i < 0:
            # Allow one extra byte for a CR whose LF has not arrived yet.
            if len(d) > max_line + 1:
                return False
            self._scanned = len(d)
            return None
        end = i - 1 if i > 0 and d[i - 1] == 13 else i
        if end > max_line:
            return False
        line = bytes(d[:end])
        del d[:i + 1]          # bytearray deletes from the front in O(1) amortised
        self._scanned = 0
        return line

    def take_into(self, out: bytearray | None, n: int) -> int:
        """Move up to `n` bytes to `out` (or drop them if None); return how many."""
        d = self.data
        k = min(n, len(d))
        if k:
            if out is not None:
                with memoryview(d) as mv:
                    out += mv[:k]
            del d[:k]
            self._scanned = 0
        return k

    def take_crlf(self):
        """Consume a CRLF or LF: True when done, None if more bytes are needed, False if absent."""
        d = self.data
        if not d:
            return None
        if d[0] == 10:
            del d[:1]
            return True
        if d[0] == 13:
            if len(d) < 2:
                return None
            if d[1] == 10:
                del d[:2]
                return True
        return False


# -- names and text: percent-encoding ------------------------------------------

_HEX = b"0123456789abcdefABCDEF"
_HEX_PAIRS = {bytes((a, b)): int(bytes((a, b)), 16) for a in _HEX for b in _HEX}
_SAFE = bytes(range(0x21, 0x7F)).replace(b"%", b"")
_ENCODE = [b"%%%02X" % i if i not in _SAFE else bytes((i,)) for i in range(256)]


class _BadEscape(Exception):
    pass


def _unquote(token: bytes) -> bytes:
    if b"%" not in token:
        return token
    parts = token.split(b"%")
    out = bytearray(parts[0])
    for p in parts[1:]:
        b = _HEX_PAIRS.get(p[:2])
        if b is None:
            raise _BadEscape()
        out.append(b)
        out += p[2:]
    return bytes(out)


def decode_name(token: bytes | str) -> bytes:
    """Percent-decode a name token (`%XX` in either case is one byte; `+` is plus).

    Raises KVProtocolError(BADREQ, close=False) on a bad escape or a decoded
    length outside 1..4096 bytes. Servers use it for RAW arguments that carry
    a name (ROWS's `after`).
    """
    if isinstance(token, str):
        token = token.encode("latin-1")
    try:
        name = _unquote(token)
    except _BadEscape:
        raise KVProtocolError("BADREQ", "bad percent escape in name", close=False) from None
    if not 1 <= len(name) <= MAX_NAME:
        raise KVProtocolError("BADREQ", f"name must be 1 to {MAX_NAME} bytes, got {len(name)}", close=False)
    return name


def encode_name(name: bytes | str) -> bytes:
    """The wire form of a name (or value token): every byte outside 0x21-0x7E,
    and `%`, as `%XX`; everything else as it is."""
    if isinstance(name, str):
        name = name.encode()
    if not name.translate(None, _SAFE):
        return bytes(name)
    return b"".join([_ENCODE[c] for c in name])


# -- the request parser (server side) ------------------------------------------

_TOKENS = re.compile(rb"[^ \t]+")
_LITERAL = re.compile(rb"\{([0-9]+)\}")
# A browser can be made (by any web page: a form with enctype="text/plain")
# to send an HTTP request to a KV port; its body would then run as KV
# commands. Such a request line, or a Host: header line, closes the
# connection at once (Redis does the same). No KV client sends either.
_HTTP_METHODS = frozenset({b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT",
                           b"TRACE"})
_HTTP_VERSION = re.compile(rb"HTTP/[0-9](\.[0-9])?")


class _Body:
    """The bytes of a literal (`{N}` in a request) or of a `$N` reply value,
    arriving in pieces, and then the CRLF after them."""

    __slots__ = ("index", "remaining", "data", "in_body")

    def __init__(self, n: int, keep: bool = True, index: int = -1):
        self.index = index                       # a request literal's place in args (-1: discarded)
        self.remaining = n
        self.data = bytearray() if keep else None
        self.in_body = True                      # False once the bytes are in and CRLF is next

    def take_direct(self, data) -> memoryview:
        """feed()'s fast path for big bodies: take what belongs to the body
        straight from `data`, never via the buffer; return the rest."""
        mv = memoryview(data)
        k = min(self.remaining, len(mv))
        if self.data is not None:
            self.data += mv[:k]
        self.remaining -= k
        if not self.remaining:
            self.in_body = False
        return mv[k:]

    def read_from(self, buf: "_ReceiveBuffer"):
        """Take the rest of the body and its CRLF from `buf`: True once both
        are in, None while bytes are missing, False if the body is not
        followed by CRLF."""
        if self.in_body:
            self.remaining -= buf.take_into(self.data, self.remaining)
            if self.remaining:
                return None
            self.in_body = False
        return buf.take_crlf()


class _Pending:
    """A request line whose literals are still arriving."""

    __slots__ = ("cmd", "args", "literals", "next", "error")

    def __init__(self, cmd, args, literals, err):
        self.cmd = cmd
        self.args = args
        self.literals = literals
        self.next = 0
        self.error = err


class RequestParser:
    """Incremental parser of requests: `feed(bytes)`, then `next_event()` until NEED_DATA.

    Events: `Request`, `ProtocolErrorEvent` (answer it; close the connection
    if its `close` is set), or NEED_DATA. After a closing error the parser
    ignores everything (`closed` is True) and returns NEED_DATA.
    """

    def __init__(self, commands=COMMANDS, max_line: int = MAX_LINE, max_literal: int = MAX_VALUE):
        self.commands = _normalise_table(commands)
        self.max_line = max_line
        self.max_literal = max_literal
        self.closed = False
        self._buf = _ReceiveBuffer()
        self._pending: _Pending | None = None

    @property
    def buffered(self) -> int:
        """Bytes held: unparsed input plus the literal being kept."""
        n = len(self._buf)
        p = self._pending
        if p is not None and p.next < len(p.literals) and p.literals[p.next].data is not None:
            n += len(p.literals[p.next].data)
        return n

    def feed(self, data) -> None:
        if self.closed or not data:
            return
        p = self._pending
        if p is not None and not self._buf and p.next < len(p.literals):
            # Fast path for big literals: straight from `data`, never via the buffer.
            lit = p.literals[p.next]
            if lit.in_body:
                data = lit.take_direct(data)
                if not data:
                    return
        self._buf.append(data)

    def next_event(self):
        while not self.closed:
            p = self._pending
            if p is None:
                line = self._buf.take_line(self.max_line)
                if line is None:
                    return NEED_DATA
                if line is False:
                    return self._fatal("line too long")
                p = self._start(line)
                if p is None:
                    continue               # blank line: no request, no reply
                if isinstance(p, ProtocolErrorEvent):
                    return p
                self._pending = p
            while p.next < len(p.literals):
                lit = p.literals[p.next]
                done = lit.read_from(self._buf)
                if done is None:
                    return NEED_DATA
                if done is False:
                    return self._fatal("literal not followed by CRLF")
                if lit.data is not None:
                    p.args[lit.index] = bytes(lit.data)
                p.next += 1
            self._pending = None
            if p.error is not None:
                return p.error
            return Request(p.cmd, p.args)
        return NEED_DATA

    # -- internals --

    def _fatal(self, text: str) -> ProtocolErrorEvent:
        self.closed = True
        self._buf.clear()
        self._pending = None
        return ProtocolErrorEvent("BADREQ", text, close=True)

    def _start(self, line: bytes):
        """Parse a request line: a `_Pending` (literals may follow), None for a blank line,
        or a closing ProtocolErrorEvent."""
        tokens = _TOKENS.findall(line)
        if not tokens:
            return None
        if (len(tokens) == 3 and tokens[0] in _HTTP_METHODS and _HTTP_VERSION.fullmatch(tokens[2])) \
                or tokens[0].lower() == b"host:":
            return self._fatal("this is a PennCloud KV server, not a web server; closing")
        cmd = tokens[0].upper().decode("ascii", "replace")
        toks = tokens[1:]
        spec = self.commands.get(cmd)
        if spec is None or not spec.accepts(len(toks)):
            return self._refuse_line(cmd, tokens[0], spec, toks)
        literals: list[_Body] = []
        err: ProtocolErrorEvent | None = None      # the first problem, answered after the literals
        args: list = []
        kinds = spec.args if not spec.variadic else [spec.kind_at(i) for i in range(len(toks))]
        for i, (kind, t) in enumerate(zip(kinds, toks)):
            if kind == NAME:
                if b"%" not in t and len(t) <= MAX_NAME:     # the common case, without a call
                    args.append(t)
                    continue
                try:
                    args.append(decode_name(t))
                    continue
                except KVProtocolError as e:
                    problem = ProtocolErrorEvent(e.code, e.text)
            elif kind == VALUE:
                if t[:1] == b"{":
                    m = _LITERAL.fullmatch(t)
                    if m is None:
                        problem = ProtocolErrorEvent(
                            "BADREQ", "bad literal (a value token may not begin with '{'; send %7B)")
                    elif len(m.group(1).lstrip(b"0")) > MAX_LITERAL_DIGITS:
                        problem = ProtocolErrorEvent(
                            "BADREQ", f"literal length out of range (at most {MAX_LITERAL_DIGITS} digits)")
                    else:
                        n = int(m.group(1))
                        literals.append(_Body(n, keep=True, index=i))
                        args.append(None)                  # filled in when the bytes are in
                        if n <= self.max_literal:
                            continue
                        problem = ProtocolErrorEvent(
                            "TOOBIG", f"value of {n} bytes is over the {self.max_literal}-byte cell limit")
                else:
                    try:
                        v = _unquote(t)
                    except _BadEscape:
                        v, problem = None, ProtocolErrorEvent("BADREQ", "bad percent escape in value")
                    else:
                        if len(v) <= self.max_literal:
                            args.append(v)
                            continue
                        problem = ProtocolErrorEvent(
                            "TOOBIG", f"value of {len(v)} bytes is over the {self.max_literal}-byte cell limit")
            elif kind == TEXT:
                try:
                    args.append(_unquote(t))
                    continue
                except _BadEscape:
                    problem = ProtocolErrorEvent("BADREQ", "bad percent escape")
            else:
                args.append(t.decode("latin-1"))
                continue
            # Only a refused argument gets here: remember the first problem, keep reading
            # the line so that every literal on it is still found (and skipped).
            if err is None:
                err = problem
            if len(args) == i:
                args.append(None)
        if err is not None:
            for lit in literals:           # refused: count the bytes down, keep none
                lit.data = None
        return _Pending(cmd, args, literals, err)

    def _refuse_line(self, cmd: str, word: bytes, spec, toks: list):
        """An unknown command or the wrong arity: every `{N}` token is a literal to skip."""
        literals = []
        for t in toks:
            m = _LITERAL.fullmatch(t)
            if m and len(m.group(1).lstrip(b"0")) <= MAX_LITERAL_DIGITS:
                literals.append(_Body(int(m.group(1)), keep=False))
        if spec is None:
            err = ProtocolErrorEvent("BADREQ", f"unknown command {encode_name(word[:64]).decode('ascii')}")
        else:
            err = ProtocolErrorEvent("BADREQ", f"wrong number of arguments for {cmd}: "
                                               f"expected {spec.arity_text()}, got {len(toks)}")
        return _Pending(cmd, None, literals, err)


# -- replies (server side) -----------------------------------------------------

_CRLF = b"\r\n"


def _one_line(text: str) -> bytes:
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def ok(text: str = "") -> bytes:
    """`+OK` or `+OK <text>`."""
    return b"+OK " + _one_line(text) + _CRLF if text else b"+OK\r\n"


def pong() -> bytes:
    return b"+PONG\r\n"


def value_parts(data) -> tuple[bytes, object, bytes]:
    """`$N` CRLF, the bytes, CRLF as three buffers, so a big value is sent without a copy."""
    return b"$%d\r\n" % len(data), data, _CRLF


def value(data) -> bytes:
    """The whole `$N` reply in one buffer (convenient for small values)."""
    return b"$%d\r\n" % len(data) + bytes(data) + _CRLF


def listing(lines: Iterable[Union[bytes, str]]) -> bytes:
    """`*N` and N lines. Lines must not contain CR or LF (names: use `name_listing`)."""
    out = []
    for line in lines:
        b = line.encode() if isinstance(line, str) else bytes(line)
        if b"\n" in b or b"\r" in b:
            raise ValueError("a listing line may not contain CR or LF")
        out.append(b)
    return b"*%d\r\n" % len(out) + b"".join(b + _CRLF for b in out)


def name_listing(names: Iterable[bytes]) -> bytes:
    """A listing of names, each percent-encoded (COLS, ROWS)."""
    return listing([encode_name(n) for n in names])


def error(code: str, text: str = "") -> bytes:
    """`-ERR <CODE>` or `-ERR <CODE> <text>`."""
    return b"-ERR " + code.encode("ascii") + (b" " + _one_line(text) if text else b"") + _CRLF


def error_for(exc: KVError) -> bytes:
    """The reply for one of src.kv's exceptions (Moved carries `<tablet> <host:port>`)."""
    return error(exc.code, exc.text)


# -- requests (client side) ----------------------------------------------------

INLINE_VALUE_LIMIT = 64 * 1024   # smaller literals are joined to the request line in one buffer


def _raw_token(a) -> bytes:
    b = str(a).encode() if isinstance(a, (str, int)) else bytes(a)
    if not b or any(c in b for c in b" \t\r\n"):
        raise ValueError(f"a raw argument must be one non-empty token, not {a!r}")
    return b


def encode_request(cmd: str, *args, commands=COMMANDS) -> list:
    """The request as a list of buffers to send in order.

    Names and text are percent-encoded, raw arguments sent as they are (str
    or int), values always as literals; a big value is its own buffer in the
    list (never copied). Raises ValueError for an unknown command, the wrong
    number of arguments, or a name outside 1..4096 bytes.
    """
    spec = commands.get(cmd.upper())
    if spec is None:
        raise ValueError(f"unknown command {cmd!r}")
    if not isinstance(spec, CommandSpec):
        spec = CommandSpec(tuple(spec))
    if not spec.accepts(len(args)):
        raise ValueError(f"{cmd} takes {spec.arity_text()} arguments, got {len(args)}")
    tokens = [cmd.upper().encode("ascii")]
    values = []
    for i, a in enumerate(args):
        kind = spec.kind_at(i)
        if kind == NAME:
            b = a.encode() if isinstance(a, str) else a
            if not 1 <= len(b) <= MAX_NAME:
                raise ValueError(f"a name must be 1 to {MAX_NAME} bytes, got {len(b)}")
            tokens.append(encode_name(b))
        elif kind == TEXT:
            tokens.append(encode_name(a))
        elif kind == RAW:
            tokens.append(_raw_token(a))
        else:
            if isinstance(a, str):
                raise TypeError("values must be bytes")
            tokens.append(b"{%d}" % len(a))
            values.append(a)
    out = []
    small = [b" ".join(tokens), _CRLF]         # joined into one buffer until a big value
    for v in values:
        if len(v) < INLINE_VALUE_LIMIT:
            small += (v, _CRLF)
        else:
            out.append(b"".join(small))
            out.append(v)
            small = [_CRLF]
    out.append(b"".join(small))
    return out


# -- the reply parser (client side) --------------------------------------------


@dataclass(frozen=True, slots=True)
class Ok:
    """`+OK <text>`; `word` is "PONG" for `+PONG`."""

    text: str = ""
    word: str = "OK"


@dataclass(frozen=True, slots=True)
class Value:
    data: bytes


@dataclass(frozen=True, slots=True)
class Listing:
    """`*N`: the raw lines (names still percent-encoded: see `decode_name`)."""

    lines: list


@dataclass(frozen=True, slots=True)
class Error:
    code: str
    text: str = ""

    def exception(self) -> KVError:
        return error_from_reply(self.code, self.text)


_COUNT = re.compile(rb"[0-9]{1,18}")


class ReplyParser:
    """Incremental parser of replies: `feed(bytes)`, then `next_event()`.

    Returns Ok, Value, Listing, Error or NEED_DATA; raises KVProtocolError for
    a reply that breaks the protocol (then drop the connection: the parser
    stays broken).
    """

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_value: int = MAX_REPLY_VALUE):
        self.max_line = max_line
        self.max_value = max_value
        self._buf = _ReceiveBuffer()
        self._broken: KVProtocolError | None = None
        self._value: _Body | None = None         # a `$N` body being read
        self._lines: list | None = None          # a `*N` listing being read
        self._lines_left = 0
        self._lines_bytes = 0

    @property
    def buffered(self) -> int:
        return len(self._buf) + (len(self._value.data) if self._value is not None else 0) + self._lines_bytes

    def feed(self, data) -> None:
        if self._broken is not None or not data:
            return
        if self._value is not None and self._value.in_body and not self._buf:
            data = self._value.take_direct(data)
            if not data:
                return
        self._buf.append(data)

    def _fail(self, text: str):
        self._broken = KVProtocolError("BADREPLY", text)
        self._buf.clear()
        raise self._broken

    def _line(self):
        line = self._buf.take_line(self.max_line)
        if line is False:
            self._fail("reply line too long")
        return line

    def next_event(self):
        if self._broken is not None:
            raise self._broken
        if self._value is not None:
            return self._read_value()
        if self._lines is not None:
            return self._read_listing()
        line = self._line()
        if line is None:
            return NEED_DATA
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            word, _, text = rest.partition(b" ")
            if not word:
                self._fail("empty status reply")
            return Ok(text.decode("utf-8", "replace"), word.decode("utf-8", "replace"))
        if kind == b"-":
            if not rest.startswith(b"ERR "):
                self._fail("error reply without '-ERR <CODE>'")
            code, _, text = rest[4:].partition(b" ")
            if not code:
                self._fail("error reply without a code")
            return Error(code.decode("ascii", "replace"), text.decode("utf-8", "replace"))
        if kind in (b"$", b"*"):
            if not _COUNT.fullmatch(rest):
                self._fail(f"bad count in {kind.decode()} reply")
            n = int(rest)
            if kind == b"$":
                if n > self.max_value:
                    self._fail(f"value of {n} bytes is over the client's {self.max_value}-byte limit")
                self._value = _Body(n)
                return self._read_value()
            self._lines, self._lines_left, self._lines_bytes = [], n, 0
            return self._read_listing()
        self._fail("reply does not begin with + - $ or *")

    def _read_value(self):
        done = self._value.read_from(self._buf)
        if done is None:
            return NEED_DATA
        if done is False:
            self._fail("value not followed by CRLF")
        data, self._value = bytes(self._value.data), None
        return Value(data)

    def _read_listing(self):
        while self._lines_left:
            line = self._line()
            if line is None:
                return NEED_DATA
            self._lines_bytes += len(line) + 2
            if self._lines_bytes > self.max_value:
                self._fail("listing over the client's size limit")
            self._lines.append(line)
            self._lines_left -= 1
        lines, self._lines, self._lines_bytes = self._lines, None, 0
        return Listing(lines)
