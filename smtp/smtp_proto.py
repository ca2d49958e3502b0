"""The SMTP dialogue (RFC 5321, with ESMTP PIPELINING, SIZE, 8BITMIME, AUTH) as a pure state machine.

No sockets, threads or clocks here: the server feeds the bytes it received
into `SMTPConnection.receive_data` and sends back the bytes it returns. What
happens to a message is not the dialogue's business: a *handler* (an object
with `handle_AUTH`, `handle_MAIL`, `handle_RCPT`, `handle_DATA`, in the manner
of aiosmtpd) checks credentials and addresses and stores the message.

    greeting -> [HELO/EHLO] -> ready --MAIL--> mail --RCPT--> rcpt --DATA--> data
                    ^            ^  \\--AUTH--> auth --+       |  ^RCPT        |
                    |            +---------------------+       |              |
                    |            +-------- RSET / end of data (reply) --------+
    QUIT from any state closes; a budget of errors ends the session with 421.

Limits (named below, all counted in bytes including the CRLF):

- a command line is at most 512 bytes (RFC 5321 4.5.3.1.4), an AUTH line
  12288 (RFC 4954 4, smtp/sasl.py); a longer line is read to its end and answered with 500;
- a text line of a message is at most 1000 bytes (RFC 5321 4.5.3.1.6); a
  message with a longer line, or bigger than `max_message_bytes`, is read to
  its end and refused (500 / 552), never stored in part;
- at most 100 recipients per message (RFC 5321 4.5.3.1.8);
- after `max_bad_commands` refused commands without a delivery in between
  the session ends with 421.

DATA ends only at CRLF "." CRLF. Message lines are the bytes between CRLFs;
a bare LF or bare CR inside one (never valid SMTP) is not a line end, so
"\\n.\\n" or "\\r\\n.\\n" cannot end the message (the "SMTP smuggling" trick).
Each line has a leading stuffed dot removed (RFC 5321 4.5.2), and bare CR/LF
inside it are written as CRLF, so a stored message has CRLF line ends only and
can be handed to POP3 or another server without ambiguity.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from smtp import sasl
from smtp.lines import TOO_LONG, next_line
from src.throttle import Throttled

log = logging.getLogger(__name__)

WEB_VERBS = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "HOST:"})   # HTTP, not mail

MAX_COMMAND_LINE = 512
MAX_TEXT_LINE = 1000
MAX_RECIPIENTS = 100
MAX_BAD_COMMANDS = 20


class TemporaryFailure(Exception):
    """A handler hook cannot answer now (the store is down): the client should try again later."""


class Reply(NamedTuple):
    code: int
    text: str

    def encode(self) -> bytes:
        lines = self.text.split("\n") or [""]
        out = [f"{self.code}-{ln}\r\n" for ln in lines[:-1]] + [f"{self.code} {lines[-1]}\r\n"]
        return "".join(out).encode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400


@dataclass
class Session:
    """What the handler may know about the client."""

    peer_ip: str
    hostname: str  # ours
    helo: str | None = None
    esmtp: bool = False
    auth_user: str | None = None  # canonical PennCloud username once AUTH succeeded


@dataclass
class Envelope:
    """One mail transaction: the reverse path, the recipients, and at the end the content."""

    mail_from: str | None = None  # "" for the null sender <>
    mail_options: dict[str, str] = field(default_factory=dict)
    rcpt_tos: list[str] = field(default_factory=list)
    content: bytes = b""


class SMTPHandler(Protocol):
    def handle_AUTH(self, session: Session, username: str, password: str) -> str | None:
        """The canonical username if the credentials are right, else None (TemporaryFailure: 454)."""

    def handle_MAIL(self, session: Session, envelope: Envelope, address: str) -> Reply:
        """Accept (250) or refuse the reverse path."""

    def handle_RCPT(self, session: Session, envelope: Envelope, address: str) -> Reply:
        """Accept (250) or refuse one recipient."""

    def handle_DATA(self, session: Session, envelope: Envelope) -> Reply:
        """Store `envelope.content` for every recipient; 250 only once it is durable."""


# Addresses: local part without spaces, angle brackets or controls; domain is
# a host name or an address literal. Quoted local parts are accepted as they are.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"          # RFC 1035: 1 to 63, no dots
_ADDR_RE = re.compile(r'^(?:"[^"\\\r\n]*"|[^\s<>()\[\]\\,;:@"]+)@(?:' + _LABEL + r'(?:\.' + _LABEL + r')*|\[[^\]\s]+\])$')
_ROUTE_RE = re.compile(r"^@[^:]+:")
_VERB_RE = re.compile(r"^[A-Za-z]{1,12}$")


class PathError(ValueError):
    pass


class NonAsciiAddress(PathError):
    pass


def parse_path(arg: str, keyword: str, allow_empty: bool) -> tuple[str, dict[str, str]]:
    """Split `FROM:<addr> K=V ...` into the address and its parameters (keys upper-cased)."""
    if arg[: len(keyword)].upper() != keyword:
        raise PathError(f"Syntax: {keyword}<address>")
    rest = arg[len(keyword):].lstrip(" ")
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            raise PathError("Missing '>' after the address")
        addr, params = rest[1:end], rest[end + 1:]
        if params and not params.startswith(" "):
            raise PathError("Syntax: space needed after '>'")
    else:
        addr, _, params = rest.partition(" ")
    addr = _ROUTE_RE.sub("", addr)  # source routes are ignored (RFC 5321 4.1.1.3)
    if not addr.isascii():
        # RFC 6531: only with SMTPUTF8, which this server does not offer; the
        # relay could not pass such an address on either.
        raise NonAsciiAddress("5.6.7 Non-ASCII addresses need SMTPUTF8, which is not offered here")
    if addr == "":
        if not allow_empty:
            raise PathError("An address is needed")
    elif not _ADDR_RE.match(addr) and addr.lower() != "postmaster":
        raise PathError(f"Bad address syntax: {addr[:80]}")
    opts: dict[str, str] = {}
    for p in params.split():
        k, eq, v = p.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", k) or (eq and not v):
            raise PathError(f"Bad parameter: {p[:40]}")
        opts[k.upper()] = v
    return addr, opts


class SMTPConnection:
    """One SMTP session, fed bytes in and giving bytes out."""

    def __init__(self, handler: SMTPHandler, *, hostname: str, peer_ip: str, max_message_bytes: int,
                 max_bad_commands: int = MAX_BAD_COMMANDS, auth_enabled: bool = True):
        self.handler = handler
        self.session = Session(peer_ip=peer_ip, hostname=hostname)
        self.envelope = Envelope()
        self.max_message_bytes = max_message_bytes
        self.max_bad_commands = max_bad_commands
        self.auth_enabled = auth_enabled
        self.closed = False
        self._buf = bytearray()
        self._mode = "command"  # or "data", "auth"
        self._skipping_line = False  # reading an over-long line to its end
        self._bad = 0
        self._auth: tuple[str, str | None] | None = None  # (mechanism, username so far)
        self._content = bytearray()
        self._data_problem: Reply | None = None

    # -- the interface -------------------------------------------------------------

    def greeting(self) -> bytes:
        return Reply(220, f"{self.session.hostname} ESMTP PennCloud").encode()

    def timeout(self) -> bytes:
        """The client was idle too long: the last words before closing."""
        self.closed = True
        return Reply(421, "4.4.2 Idle for too long, closing").encode()

    def receive_data(self, data: bytes) -> bytes:
        """Feed received bytes (b"" at end of stream); returns the replies to send."""
        if self.closed:
            return b""
        if not data:
            self.closed = True
            return b""
        self._buf += data
        out = bytearray()
        while not self.closed:
            if self._mode == "data":
                reply = self._read_data()
                if reply is None:
                    break
                out += reply.encode()
                continue
            limit = sasl.MAX_AUTH_LINE if self._mode == "auth" else MAX_COMMAND_LINE
            line, self._skipping_line = next_line(self._buf, limit, self._skipping_line)
            if line is None:
                break
            if line is TOO_LONG:
                self._mode, self._auth = "command", None
                out += self._error(Reply(500, "5.5.2 Line too long")).encode()
                continue
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
            reply = self._auth_line(line) if self._mode == "auth" else self._command(line)
            out += reply.encode()
        return bytes(out)

    # -- commands --------------------------------------------------------------

    def _error(self, reply: Reply) -> Reply:
        """Count a refusal against the budget; the last one ends the session."""
        self._bad += 1
        if self._bad >= self.max_bad_commands:
            self.closed = True
            return Reply(421, "4.7.0 Too many errors, closing")
        return reply

    def _command(self, line: bytes) -> Reply:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(Reply(500, "5.5.2 Command is not valid UTF-8"))
        verb, _, arg = text.strip(" ").partition(" ")
        if verb.upper() in WEB_VERBS:
            # A web page can make a browser post a form to this port; its body
            # would then be read as SMTP. Hang up at once, as Postfix does.
            self.closed = True
            return Reply(554, "5.7.0 This is a mail server, not a web server; closing")
        method = getattr(self, "smtp_" + verb.upper(), None) if _VERB_RE.match(verb) else None
        if method is None:
            return self._error(Reply(500, "5.5.2 Command not recognized"))
        try:
            reply = method(arg.strip(" "))
        except Exception:
            reply = self._internal_error(verb.upper())
        if reply.code >= 500:
            return self._error(reply)
        return reply

    def _reset(self) -> None:
        self.envelope = Envelope()

    def _internal_error(self, verb: str) -> Reply:
        """A bug while handling one command or message. Closing the connection
        without a word would leave the client not knowing what became of its
        mail (and a pipelining client would lose the rest of its session): a
        temporary failure instead, so that it tries again, and the session
        goes on."""
        log.exception("%s from %s failed", verb, self.session.peer_ip)
        return Reply(451, "4.3.0 Internal error; try again later")

    def smtp_HELO(self, arg: str) -> Reply:
        if not arg:
            return Reply(501, "5.5.4 Syntax: HELO hostname")
        self._reset()
        self.session.helo, self.session.esmtp = arg.split()[0], False
        return Reply(250, self.session.hostname)

    def smtp_EHLO(self, arg: str) -> Reply:
        if not arg:
            return Reply(501, "5.5.4 Syntax: EHLO hostname")
        self._reset()
        self.session.helo, self.session.esmtp = arg.split()[0], True
        lines = [self.session.hostname, "PIPELINING", f"SIZE {self.max_message_bytes}", "8BITMIME",
                 "ENHANCEDSTATUSCODES"]
        if self.auth_enabled:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        return Reply(250, "\n".join(lines))

    def smtp_NOOP(self, arg: str) -> Reply:
        return Reply(250, "2.0.0 OK")

    def smtp_RSET(self, arg: str) -> Reply:
        if arg:
            return Reply(501, "5.5.4 Syntax: RSET")
        self._reset()
        return Reply(250, "2.0.0 OK")

    def smtp_QUIT(self, arg: str) -> Reply:
        self.closed = True
        return Reply(221, "2.0.0 Bye")

    def smtp_VRFY(self, arg: str) -> Reply:
        if not arg:
            return Reply(501, "5.5.4 Syntax: VRFY address")
        return Reply(252, "2.5.0 Cannot VRFY user, but will accept the message and attempt delivery")

    def smtp_EXPN(self, arg: str) -> Reply:
        return Reply(502, "5.5.1 EXPN is not available")

    def smtp_HELP(self, arg: str) -> Reply:
        return Reply(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY AUTH HELP")

    def smtp_MAIL(self, arg: str) -> Reply:
        if self.session.helo is None:
            return Reply(503, "5.5.1 Say HELO or EHLO first")
        if self.envelope.mail_from is not None:
            return Reply(503, "5.5.1 Nested MAIL command")
        try:
            addr, opts = parse_path(arg, "FROM:", allow_empty=True)
        except NonAsciiAddress as e:
            return Reply(553, str(e))
        except PathError as e:
            return Reply(501, f"5.5.4 {e}")
        if opts and not self.session.esmtp:
            return Reply(555, "5.5.4 MAIL parameters need EHLO")
        for k, v in opts.items():
            if k == "SIZE":
                if not v.isdigit() or len(v) > 20:
                    return Reply(501, "5.5.4 SIZE needs a number")
                if int(v) > self.max_message_bytes:
                    return Reply(552, f"5.3.4 Message too big (the limit is {self.max_message_bytes} bytes)")
            elif k == "BODY":
                if v.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4 BODY must be 7BIT or 8BITMIME")
            elif k != "AUTH":  # AUTH=<> (RFC 4954 5) is accepted and ignored
                return Reply(555, f"5.5.4 Parameter {k} not supported")
        reply = self.handler.handle_MAIL(self.session, self.envelope, addr)
        if reply.ok:
            self.envelope.mail_from, self.envelope.mail_options = addr, opts
        return reply

    def smtp_RCPT(self, arg: str) -> Reply:
        if self.envelope.mail_from is None:
            return Reply(503, "5.5.1 Need MAIL first")
        try:
            addr, opts = parse_path(arg, "TO:", allow_empty=False)
        except NonAsciiAddress as e:
            return Reply(553, str(e))
        except PathError as e:
            return Reply(501, f"5.5.4 {e}")
        if opts:
            return Reply(555, "5.5.4 RCPT parameters are not supported")
        if len(self.envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return Reply(452, "4.5.3 Too many recipients")
        reply = self.handler.handle_RCPT(self.session, self.envelope, addr)
        if reply.ok:
            self.envelope.rcpt_tos.append(addr)
        return reply

    def smtp_DATA(self, arg: str) -> Reply:
        if arg:
            return Reply(501, "5.5.4 Syntax: DATA")
        if self.envelope.mail_from is None:
            return Reply(503, "5.5.1 Need MAIL first")
        if not self.envelope.rcpt_tos:
            return Reply(503, "5.5.1 Need RCPT first (no valid recipients)")
        self._mode = "data"
        self._content = bytearray()
        self._data_problem = None
        self._skipping_line = False
        return Reply(354, "End data with <CR><LF>.<CR><LF>")

    # -- DATA ------------------------------------------------------------------

    def _read_data(self) -> Reply | None:
        """Consume whole message lines from the buffer; the reply once CRLF.CRLF is seen, else None."""
        buf = self._buf
        if self._skipping_line:  # the rest of an over-long line: find its end
            i = buf.find(b"\r\n")
            if i < 0:
                del buf[:-1]  # keep the last byte: it may be the CR of a CRLF
                return None
            del buf[: i + 2]
            self._skipping_line = False
        last = buf.rfind(b"\r\n")
        if last >= 0:
            block = bytes(buf[: last + 2])
            end = (b"\r\n" + block).find(b"\r\n.\r\n")  # a line that is just "."
            if end >= 0:
                del buf[: end + 3]
                self._take_lines(block[:end])
                return self._end_of_data()
            del buf[: last + 2]
            self._take_lines(block)
        if len(buf) > MAX_TEXT_LINE:  # an unfinished line already too long (a stuffed one: "." + 998 + CR fits)
            self._data_problem = self._data_problem or Reply(500, "5.5.2 Line too long")
            self._skipping_line = True
            del buf[:-1]
        return None

    def _take_lines(self, block: bytes) -> None:
        """Add whole lines (each ending in CRLF) to the message: unstuffed, bare CR/LF made CRLF."""
        if not block or self._data_problem is not None:
            return
        crlfs = block.count(b"\r\n")
        plain = (block[:1] != b"." and b"\r\n." not in block and block.count(b"\r") == crlfs
                 and block.count(b"\n") == crlfs
                 and (len(block) <= MAX_TEXT_LINE or max(map(len, block.split(b"\r\n"))) + 2 <= MAX_TEXT_LINE))
        if plain:  # the common case, at C speed: nothing to change
            out = block
        else:
            parts = []
            for line in block.split(b"\r\n")[:-1]:
                if line[:1] == b".":
                    line = line[1:]     # the limit does not count a dot added for transparency
                if len(line) + 2 > MAX_TEXT_LINE:
                    self._data_problem = Reply(500, "5.5.2 Line too long")
                    self._content = bytearray()
                    return
                if b"\r" in line or b"\n" in line:
                    line = re.sub(rb"\r|\n", b"\r\n", line)
                parts.append(line)
                parts.append(b"\r\n")
            out = b"".join(parts)
        if len(self._content) + len(out) > self.max_message_bytes:
            self._data_problem = Reply(552, f"5.3.4 Message too big (the limit is {self.max_message_bytes} bytes)")
            self._content = bytearray()
            return
        self._content += out

    def _end_of_data(self) -> Reply:
        self._mode = "command"
        problem, content = self._data_problem, bytes(self._content)
        self._content = bytearray()
        self._data_problem = None
        if problem is not None:
            self._reset()
            return problem
        self.envelope.content = content
        try:
            reply = self.handler.handle_DATA(self.session, self.envelope)
        except Exception:
            reply = self._internal_error("DATA")
        self._reset()
        if reply.code == 250:
            # The budget is for a client that errs without delivering mail
            # (Postfix's smtpd_hard_error_limit): an MTA that reuses one
            # connection for a mailing list meets some 550 "no such user"
            # per message and must not be cut off after twenty of them.
            self._bad = 0
        return reply

    # -- AUTH (RFC 4954) ---------------------------------------------------------

    def smtp_AUTH(self, arg: str) -> Reply:
        if not self.auth_enabled or not self.session.esmtp:
            return Reply(503, "5.5.1 Say EHLO first" if self.auth_enabled else "5.5.1 AUTH not available")
        if self.session.auth_user is not None:
            return Reply(503, "5.5.1 Already authenticated")
        if self.envelope.mail_from is not None:
            return Reply(503, "5.5.1 AUTH not allowed during a mail transaction")
        mech, _, initial = arg.partition(" ")
        mech, initial = mech.upper(), initial.strip()
        if mech not in ("PLAIN", "LOGIN"):
            return Reply(504, "5.5.4 Unrecognized authentication type")
        self._auth = (mech, None)
        if not initial:
            self._mode = "auth"
            return Reply(334, "" if mech == "PLAIN" else "VXNlcm5hbWU6")  # "Username:"
        return self._auth_step(initial)

    def _auth_line(self, line: bytes) -> Reply:
        reply = self._auth_step(line.decode("ascii", "replace").strip())
        return self._error(reply) if reply.code >= 500 else reply

    def _auth_step(self, token: str) -> Reply:
        mech, username = self._auth or ("PLAIN", None)
        self._mode = "command"
        if token == "*":
            self._auth = None
            return Reply(501, "5.7.0 Authentication cancelled")
        try:
            raw = sasl.decode_response(token)
        except sasl.Malformed:
            self._auth = None
            return Reply(501, "5.5.2 Cannot decode the response")
        if mech == "LOGIN" and username is None:
            self._auth = ("LOGIN", raw.decode("utf-8", "replace"))
            self._mode = "auth"
            return Reply(334, "UGFzc3dvcmQ6")  # "Password:"
        self._auth = None
        try:
            if mech == "PLAIN":
                user, pw = sasl.decode_plain(raw)
            else:
                user, pw = username, raw.decode("utf-8")
        except sasl.Malformed:
            return Reply(501, "5.5.2 Bad PLAIN response")
        except (sasl.OtherIdentity, sasl.NotUtf8, UnicodeDecodeError):
            return Reply(535, "5.7.8 Authentication credentials invalid")
        try:
            who = self.handler.handle_AUTH(self.session, user, pw)
        except TemporaryFailure:
            return Reply(454, "4.7.0 Temporary authentication failure; try again later")
        except Throttled as e:
            return Reply(454, f"4.7.0 {e}")
        if who is None:
            return Reply(535, "5.7.8 Authentication credentials invalid")
        self.session.auth_user = who
        return Reply(235, "2.7.0 Authentication successful")
