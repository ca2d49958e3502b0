"""The POP3 dialogue (RFC 1939, CAPA from RFC 2449, SASL PLAIN from RFC 5034) as a pure state machine.

No sockets, threads or clocks: the server feeds received bytes into
`POP3Connection.receive_data` and sends what it returns (a list of byte
strings and, for RETR and TOP, iterables of byte strings, so a big message is
streamed chunk by chunk and never held whole). A *handler* checks passwords
and opens the mailbox; the opened `Maildrop` lists messages, reads them and
applies deletions.

    AUTHORIZATION --USER+PASS / AUTH PLAIN--> TRANSACTION --QUIT--> UPDATE (deletions applied)
          |  (mailbox in use: -ERR [IN-USE], stay)        |
          +--QUIT--> closed                               +--connection lost / idle: closed,
                                                             nothing deleted (RFC 1939 section 3)

Messages are numbered from 1 in the order the maildrop lists them (oldest
first), fixed for the session. DELE only marks; RSET unmarks; QUIT applies.
Pipelining (RFC 2449): a client may send many commands at once. A message
is sent lazily, as the server iterates it, so the commands after a RETR or
TOP are run only once it has been sent: `receive_data` stops there and
returns, last, a `_Later` that runs them when iterated. Otherwise a
pipelined "RETR 1 / DELE 1 / QUIT" would delete the message (QUIT) before
its bytes were read from the store.

Output of a message is dot-stuffed: a "." is added before every line that
starts with "." (after any LF, so clients that split lines on a bare LF see
no early end either) and the terminating ".CRLF" follows a line end.

Limits: a command line is at most 255 bytes with its CRLF (RFC 2449 section
4), a SASL response line 12288 (smtp/sasl.py); longer lines are read to
their end and answered -ERR. After `max_bad_commands` errors the session
ends.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Protocol

from smtp import sasl
from smtp.lines import TOO_LONG, next_line
from smtp.smtp_proto import WEB_VERBS
from src.throttle import Throttled

log = logging.getLogger(__name__)

MAX_COMMAND_LINE = 255
MAX_BAD_COMMANDS = 20
MAX_TOP_HEADER_BYTES = 1024 * 1024  # TOP reads at most this much of the header block

CAPABILITIES = ("TOP", "UIDL", "USER", "SASL PLAIN", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "EXPIRE NEVER", "IMPLEMENTATION PennCloud")


class MailboxInUse(Exception):
    """Another session holds this mailbox."""


class MessageGone(Exception):
    """The message was deleted by another session (the webmail) meanwhile."""


class TemporaryFailure(Exception):
    """A handler or maildrop cannot answer now (the store is down): -ERR [SYS/TEMP]."""


class Maildrop(Protocol):
    def messages(self) -> list[tuple[str, int]]:
        """(unique id, size in bytes) of each message, oldest first; fixed for the session."""

    def iter_message(self, uid: str) -> Iterable[bytes]:
        """The message's bytes, in chunks."""

    def commit(self, deleted: list[str]) -> int:
        """Apply deletions at QUIT; returns how many are gone."""

    def release(self) -> None:
        """Give the mailbox up (always called once at the end of a session that opened it)."""


class POP3Handler(Protocol):
    def authenticate(self, username: str, password: str, peer_ip: str = "") -> str | None:
        """The canonical username if the password is right, else None
        (Throttled: too many failures for that user or address)."""

    def open_maildrop(self, user: str) -> Maildrop:
        """Lock and open the user's mailbox; MailboxInUse if another session has it."""


def ok(text: str = "") -> bytes:
    return (f"+OK {text}" if text else "+OK").encode("utf-8", "replace") + b"\r\n"


def err(text: str) -> bytes:
    return f"-ERR {text}".encode("utf-8", "replace") + b"\r\n"


def multiline(first: bytes, lines: list[str]) -> bytes:
    """A +OK line, then lines (none of which starts with '.'), then the terminator."""
    return first + b"".join(ln.encode() + b"\r\n" for ln in lines) + b".\r\n"


class DotStuffer:
    """Dot-stuffs a message given in chunks; `end()` gives the terminator."""

    def __init__(self):
        self._line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._line_start and chunk[:1] == b".":
            out = b"." + out
        self._line_start = chunk.endswith(b"\n")
        return out

    def end(self) -> bytes:
        return b".\r\n" if self._line_start else b"\r\n.\r\n"


def stuffed(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks dot-stuffed and terminated, ready to send after a +OK line."""
    ds = DotStuffer()
    for c in chunks:
        out = ds.feed(c)
        if out:
            yield out
    yield ds.end()


def top_of(chunks: Iterable[bytes], body_lines: int) -> bytes:
    """The header block, the blank line, and the first `body_lines` lines of the body."""
    buf = bytearray()
    it = iter(chunks)
    head_end = -1
    for c in it:
        buf += c
        i = buf.find(b"\r\n\r\n")
        j = buf.find(b"\n\n")
        cands = [x + 4 for x in (i,) if x >= 0] + [x + 2 for x in (j,) if x >= 0]
        if cands:
            head_end = min(cands)
            break
        if len(buf) > MAX_TOP_HEADER_BYTES:
            break
    if head_end < 0:
        return bytes(buf)  # no body at all (or an absurd header): all of it
    out = bytes(buf[:head_end])
    rest = bytearray(buf[head_end:])
    lines: list[bytes] = []
    while len(lines) < body_lines:
        k = rest.find(b"\n")
        if k >= 0:
            lines.append(bytes(rest[: k + 1]))
            del rest[: k + 1]
            continue
        nxt = next(it, None)
        if nxt is None:
            if rest:
                lines.append(bytes(rest))
            break
        rest += nxt
    return out + b"".join(lines)


class POP3Connection:
    """One POP3 session, fed bytes in and giving bytes out."""

    def __init__(self, handler: POP3Handler, *, max_bad_commands: int = MAX_BAD_COMMANDS, peer_ip: str = ""):
        self.handler = handler
        self.peer_ip = peer_ip
        self.max_bad_commands = max_bad_commands
        self.closed = False
        self.user: str | None = None
        self._buf = bytearray()
        self._skipping_line = False
        self._bad = 0
        self._pending_user: str | None = None
        self._sasl = False  # waiting for an AUTH PLAIN response line
        self._drop: Maildrop | None = None
        self._msgs: list[tuple[str, int]] = []
        self._deleted: set[int] = set()

    # -- the interface ----------------------------------------------------------

    def greeting(self) -> bytes:
        return ok("PennCloud POP3 server ready")

    def receive_data(self, data: bytes) -> list:
        """Feed bytes (b"" at end of stream); returns bytes and iterables of bytes to send, in order."""
        out: list = []
        if self.closed:
            return out
        if not data:
            self.close()
            return out
        self._buf += data
        return self._process()

    def _process(self) -> list:
        """Run the buffered commands, up to and including the first whose
        reply is sent lazily (a message), then a `_Later` for the rest."""
        out: list = []
        while not self.closed:
            limit = sasl.MAX_AUTH_LINE if self._sasl else MAX_COMMAND_LINE
            line, self._skipping_line = next_line(self._buf, limit, self._skipping_line)
            if line is None:
                break
            if line is TOO_LONG:
                self._sasl = False
                out.append(self._error("Line too long"))
                continue
            line = line.rstrip(b"\r\n")
            if self._sasl:
                self._sasl = False
                out.append(self._sasl_response(line.decode("ascii", "replace").strip()))
            else:
                out.append(self._command(line))
            if not isinstance(out[-1], bytes):
                out.append(_Later(self._process))
                break
        return out

    @property
    def maildrop(self) -> Maildrop | None:
        """The open mailbox during TRANSACTION, else None."""
        return self._drop

    def close(self) -> None:
        """End the session without applying deletions (lost connection, idle timeout)."""
        self.closed = True
        if self._drop is not None:
            drop, self._drop = self._drop, None
            drop.release()

    # -- dispatch ---------------------------------------------------------------

    def _error(self, text: str) -> bytes:
        self._bad += 1
        if self._bad >= self.max_bad_commands:
            self.close()
            return err("Too many errors, closing")
        return err(text)

    def _command(self, line: bytes) -> bytes | Iterable[bytes]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error("Command is not valid UTF-8")
        verb, _, rest = text.lstrip(" ").partition(" ")
        verb = verb.upper()
        if verb in WEB_VERBS:       # a browser posting a form here (see smtp_proto): hang up
            self.close()
            return err("This is a mail server, not a web server; closing")
        # PASS has one argument, so its spaces belong to the password
        # (RFC 1939); every other argument is trimmed.
        arg = rest if verb == "PASS" else rest.strip(" ")
        state = "trans" if self._drop is not None else "auth"
        method = getattr(self, f"pop_{verb}", None) if verb.isalpha() and len(verb) <= 4 else None
        if method is None or verb not in _ALLOWED[state]:
            if method is not None:
                return self._error(f"{verb} is not allowed now")
            return self._error("Unknown command")
        try:
            return method(arg)
        except Exception:
            # A bug on one command: say so and go on, rather than closing
            # the connection unanswered (the client would not know which
            # of its pipelined commands took effect).
            log.exception("POP3 %s failed", verb)
            return err("[SYS/TEMP] Internal error; try again later")

    # -- AUTHORIZATION ----------------------------------------------------------

    def pop_CAPA(self, arg: str) -> bytes:
        return multiline(ok("Capability list follows"), list(CAPABILITIES))

    def pop_USER(self, arg: str) -> bytes:
        if not arg:
            return self._error("USER needs a name")
        self._pending_user = arg
        return ok("Send your password")

    def pop_PASS(self, arg: str) -> bytes:
        user, self._pending_user = self._pending_user, None
        if user is None:
            return self._error("USER first")
        return self._login(user, arg)

    def pop_AUTH(self, arg: str) -> bytes:
        if not arg:
            return multiline(ok("Mechanisms follow"), ["PLAIN"])
        mech, _, initial = arg.partition(" ")
        if mech.upper() != "PLAIN":
            return self._error("Unsupported mechanism")
        if not initial.strip():
            self._sasl = True
            return b"+ \r\n"
        return self._sasl_response(initial.strip())

    def _sasl_response(self, token: str) -> bytes:
        if token == "*":
            return self._error("Authentication cancelled")
        try:
            user, pw = sasl.decode_plain(sasl.decode_response(token))
        except sasl.OtherIdentity:
            return self._error("[AUTH] Acting as another user is not allowed")
        except sasl.SaslError:
            return self._error("Bad PLAIN response")
        return self._login(user, pw)

    def _login(self, user: str, password: str) -> bytes:
        try:
            who = self.handler.authenticate(user, password, self.peer_ip)
            if who is None:
                return self._error("[AUTH] Invalid user name or password")
            drop = self.handler.open_maildrop(who)
        except MailboxInUse:
            return self._error("[IN-USE] Mailbox is in use by another session")
        except TemporaryFailure:
            return err("[SYS/TEMP] The mail store is unavailable; try again later")
        except Throttled as e:
            return self._error(f"[SYS/TEMP] {e}")
        self._drop, self.user = drop, who
        self._msgs = list(drop.messages())
        self._deleted = set()
        return ok(f"Logged in, {len(self._msgs)} messages")

    def pop_QUIT(self, arg: str) -> bytes:
        if self._drop is None:
            self.closed = True
            return ok("Bye")
        deleted = [self._msgs[i][0] for i in sorted(self._deleted)]
        try:
            n = self._drop.commit(deleted) if deleted else 0
        except MailboxInUse:
            self.close()
            return err("[IN-USE] This session lost the mailbox to another one; nothing was deleted")
        except Exception:
            self.close()
            return err("[SYS/TEMP] Some deleted messages were not removed")
        self.close()
        return ok(f"Bye, {n} messages deleted")

    # -- TRANSACTION ------------------------------------------------------------

    def _msg(self, arg: str) -> int | None:
        """The 0-based index of message number `arg`, if it exists and is not deleted."""
        if not arg.isdigit() or len(arg) > 9:
            return None
        i = int(arg) - 1
        if not 0 <= i < len(self._msgs) or i in self._deleted:
            return None
        return i

    def _live(self) -> list[int]:
        return [i for i in range(len(self._msgs)) if i not in self._deleted]

    def pop_NOOP(self, arg: str) -> bytes:
        return ok()

    def pop_STAT(self, arg: str) -> bytes:
        live = self._live()
        return ok(f"{len(live)} {sum(self._msgs[i][1] for i in live)}")

    def pop_LIST(self, arg: str) -> bytes:
        return self._listing(arg, lambda i: str(self._msgs[i][1]))

    def pop_UIDL(self, arg: str) -> bytes:
        return self._listing(arg, lambda i: self._msgs[i][0])

    def _listing(self, arg: str, field) -> bytes:
        if arg:
            i = self._msg(arg)
            if i is None:
                return self._error("No such message")
            return ok(f"{i + 1} {field(i)}")
        live = self._live()
        return multiline(ok(f"{len(live)} messages"), [f"{i + 1} {field(i)}" for i in live])

    def pop_RETR(self, arg: str) -> bytes | list:
        i = self._msg(arg)
        if i is None:
            return self._error("No such message")
        uid, size = self._msgs[i]
        try:
            chunks = self._drop.iter_message(uid)
        except MessageGone:
            return err(f"Message {i + 1} was deleted by another session")
        except TemporaryFailure:
            return err("[SYS/TEMP] The mail store is unavailable; try again later")
        return _Concat(ok(f"{size} octets"), stuffed(chunks))

    def pop_TOP(self, arg: str) -> bytes | list:
        num, _, n = arg.partition(" ")
        i = self._msg(num)
        if i is None:
            return self._error("No such message")
        if not n.strip().isdigit():
            return self._error("Syntax: TOP msg lines")
        try:
            head = top_of(self._drop.iter_message(self._msgs[i][0]), int(n.strip()))
        except MessageGone:
            return err(f"Message {i + 1} was deleted by another session")
        except TemporaryFailure:
            return err("[SYS/TEMP] The mail store is unavailable; try again later")
        return ok() + b"".join(stuffed([head]))

    def pop_DELE(self, arg: str) -> bytes:
        i = self._msg(arg)
        if i is None:
            return self._error("No such message")
        self._deleted.add(i)
        return ok(f"Message {i + 1} deleted")

    def pop_RSET(self, arg: str) -> bytes:
        self._deleted = set()
        return ok(f"{len(self._msgs)} messages")


class _Concat:
    """A first line and then a stream of chunks: iterated lazily by the server."""

    def __init__(self, first: bytes, rest: Iterable[bytes]):
        self.first, self.rest = first, rest

    def __iter__(self):
        yield self.first
        yield from self.rest


class _Later:
    """Commands that wait for the lazy reply before them to be sent: run
    when iterated, their replies flattened to bytes (a chain of RETRs is a
    loop here, not a recursion)."""

    def __init__(self, run):
        self.run = run

    def __iter__(self):
        run = self.run
        while run is not None:
            parts, run = run(), None
            for part in parts:
                if isinstance(part, _Later):
                    run = part.run          # always the last part
                elif isinstance(part, bytes):
                    yield part
                else:
                    yield from part


_ALLOWED = {
    "auth": {"CAPA", "USER", "PASS", "AUTH", "QUIT"},
    "trans": {"CAPA", "STAT", "LIST", "UIDL", "TOP", "RETR", "DELE", "RSET", "NOOP", "QUIT"},
}
