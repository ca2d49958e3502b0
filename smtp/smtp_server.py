"""The SMTP server: a thin socket shell around `smtp_proto.SMTPConnection`, and
`MailDelivery`, the handler that decides who may send to whom and stores mail.

Policy (DESIGN.md "Mail servers"):

- mail for local users (`<username>@<mail domain>`) is accepted from anyone;
  an unknown local user is refused with 550 at RCPT;
- mail for other domains only from a session that logged in with AUTH, and
  then only with the user's own address as the sender (not even <>, which
  is for bounces); everyone else gets 554 "relay access denied" (never an
  open relay);
- nobody claims to be a local user without being one: a session that did not
  log in may not use an address of our domain, neither as MAIL FROM (530)
  nor in the message's From:/Sender: headers (550 after DATA), and a logged-in
  user may put only their own address of our domain there. Mail from our
  domain therefore really comes from that user (webmail stores its mail
  directly, not through SMTP);
- `250` after DATA only once the message is durably in the KV store for every
  recipient: in each local recipient's Inbox and, for other domains, in the
  relay queue. If the store fails, the client gets 451 and will retry;
  recipients already stored may then get the message twice, never zero times.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import logging
import socket
import threading
import time
import unicodedata
from typing import Callable

from smtp.smtp_proto import Envelope, Reply, Session, SMTPConnection, TemporaryFailure
from src import mailfmt
from src.accounts import POSTMASTER_USER, RESERVED, Accounts, InvalidUsername, mail_login_name, normalize_username
from src.config import Config
from src.kv import KV, KVError
from src.mailstore import MailStore, MailStoreError
from src.server import TCPService
from src.throttle import LoginThrottle

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 300.0  # RFC 5321 4.5.3.2.7 asks servers to wait 5 minutes for the next command
RECV_BYTES = 64 * 1024
# Accounts are never deleted, so "this user exists" may be remembered a while:
# it saves a store round trip per recipient. "Unknown" is never cached (sign-up).
KNOWN_USER_CACHE_S = 60.0
KNOWN_USER_CACHE_MAX = 10_000


def _for_the_eye(text: str) -> str:
    """`text` as it looks: NFKC (compatibility forms such as a fullwidth
    ＠ become what they look like) without format characters (Cf: zero-width
    spaces and joiners), which show as nothing."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text) if unicodedata.category(ch) != "Cf")


class MailDelivery:
    """The SMTP handler: AUTH against Accounts, RCPT policy, storage into the MailStore."""

    def __init__(self, accounts: Accounts, store: MailStore, domain: str, clock: Callable[[], float] = time.time):
        self.accounts = accounts
        self.store = store
        self.domain = domain.lower()
        self.clock = clock
        self._known: dict[str, float] = {}  # username -> when it was seen to exist
        self._known_lock = threading.Lock()
        self.throttle = LoginThrottle()     # the web log-in's rule: AUTH must not be a way around it

    def user_exists(self, user: str) -> bool:
        now = self.clock()
        with self._known_lock:
            seen = self._known.get(user)
        if seen is not None and now - seen < KNOWN_USER_CACHE_S:
            return True
        if user in RESERVED or not self.accounts.exists(user):
            return False
        with self._known_lock:
            if len(self._known) >= KNOWN_USER_CACHE_MAX:
                self._known.clear()
            self._known[user] = now
        return True

    def local_user(self, address: str) -> str | None:
        """The username an address of ours names (None for other domains); raises InvalidUsername."""
        if address.lower() == "postmaster":
            return POSTMASTER_USER
        if not self._ours(address):
            return None
        local = address.rpartition("@")[0]
        if local.lower() == "postmaster":
            return POSTMASTER_USER
        return normalize_username(local)

    def handle_AUTH(self, session: Session, username: str, password: str) -> str | None:
        username = mail_login_name(username, self.domain)
        try:
            who = self.throttle.attempt(username, session.peer_ip, lambda: self.accounts.verify(username, password))
        except KVError as e:
            log.warning("AUTH from %s: store unavailable: %s", session.peer_ip, e)
            raise TemporaryFailure() from None
        log.info("AUTH from %s as %r: %s", session.peer_ip, username[:64], "ok" if who else "refused")
        return who

    def handle_MAIL(self, session: Session, envelope: Envelope, address: str) -> Reply:
        if session.auth_user is not None:
            # Not even <>: the null sender is for bounces, and a logged-in user
            # sending as <> could put anyone in From: with no bounce path.
            if address.lower() != f"{session.auth_user}@{self.domain}":
                return Reply(553, f"5.7.1 Sender address must be your own: {session.auth_user}@{self.domain}")
        elif self._ours(address):
            return Reply(530, f"5.7.0 Log in (AUTH) to send as <{address}>")
        return Reply(250, "2.1.0 OK")

    def _ours(self, address: str) -> bool:
        # "penncloud.local." is the same DNS name as "penncloud.local"
        return address.rpartition("@")[2].lower().removesuffix(".") == self.domain

    def forged_sender(self, session: Session, content: bytes) -> str | None:
        """An address of our domain in From: or Sender: that this session may
        not use (anyone's without AUTH, another user's with it), else None."""
        end = content.find(b"\r\n\r\n")
        head = content if end < 0 else content[:end]
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
        as_written = [str(v) for name in ("From", "Sender") for v in headers.get_all(name, [])]
        # ... and as the webmail shows them: encoded words decoded, control
        # and bidi characters gone, and (for the eye) compatibility forms
        # folded (a fullwidth ＠) and invisible format characters dropped.
        # `=?utf-8?b?Ym9iQHBlbm5jbG91ZC5sb2NhbA==?=` or "bob@penncloud.local"
        # followed by an ESC read as someone else's address to this check
        # and as bob's on the page.
        as_shown = [_for_the_eye(mailfmt.header_text(v)) for name, v in mailfmt.header_fields(head + b"\r\n\r\n")
                    if name in (b"from", b"sender")]
        own = f"{session.auth_user}@{self.domain}" if session.auth_user else None
        for values in (as_written, as_shown):
            for _, addr in email.utils.getaddresses(values):
                if addr and self._ours(addr) and addr.lower() != own:
                    return addr
        return None

    def handle_RCPT(self, session: Session, envelope: Envelope, address: str) -> Reply:
        try:
            user = self.local_user(address)
        except InvalidUsername:
            return Reply(550, f"5.1.1 <{address}>: no such user here")
        if user is None:
            if session.auth_user is None:
                return Reply(554, f"5.7.1 <{address}>: relay access denied; log in (AUTH) to send to other "
                                  f"domains")
            return Reply(250, "2.1.5 OK, will relay")
        try:
            known = self.user_exists(user)
        except KVError:
            log.warning("RCPT check for %s failed: store unavailable", user)
            return Reply(451, "4.3.0 Temporary failure, try again later")
        if not known:
            return Reply(550, f"5.1.1 <{address}>: no such user here")
        return Reply(250, "2.1.5 OK")

    def handle_DATA(self, session: Session, envelope: Envelope) -> Reply:
        forged = self.forged_sender(session, envelope.content)
        if forged is not None:
            log.info("refused mail from %s claiming to be %s", session.peer_ip, forged[:128])
            return Reply(550, f"5.7.1 The message claims to be from <{forged}>: "
                              + ("that is not your address" if session.auth_user else "log in (AUTH) first"))
        locals_: list[str] = []
        remote: list[str] = []
        seen_remote: set[str] = set()
        for rcpt in envelope.rcpt_tos:
            user = self.local_user(rcpt)
            if user is None:
                # One mailbox once: a domain is case-insensitive, a local part is not.
                local, _, host = rcpt.rpartition("@")
                if (key := f"{local}@{host.lower()}") not in seen_remote:
                    seen_remote.add(key)
                    remote.append(rcpt)
            elif user not in locals_:
                locals_.append(user)
        trace_id = self.store.new_id()
        received = mailfmt.received_header(
            helo=session.helo or "", peer_ip=session.peer_ip, by_host=session.hostname,
            protocol="ESMTPA" if session.auth_user else ("ESMTP" if session.esmtp else "SMTP"),
            msg_id=trace_id, recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
            now=self.clock())
        content = envelope.content
        if session.auth_user:
            # A submission: what the client left out (mailfmt.submission_fields),
            # and no Bcc: line, which would show every copy who else got one
            # (mail clients remove it themselves; scripts often do not).
            content = mailfmt.without_fields(content, {b"bcc"})
            content = mailfmt.submission_fields(content, sender=f"{session.auth_user}@{self.domain}",
                                                domain=self.domain, now=self.clock()) + content
        raw = received + content
        # Final delivery records the envelope sender on top (RFC 5321 4.4),
        # `<>` for a bounce; a Return-Path the sender wrote is not ours.
        local_raw = (f"Return-Path: <{envelope.mail_from or ''}>\r\n".encode() + received
                     + mailfmt.without_fields(content, {b"return-path"})) if locals_ else b""
        try:
            for user in locals_:
                self.store.deliver(user, "Inbox", local_raw)
            if remote:
                self.store.enqueue_outgoing(session.auth_user or "", envelope.mail_from or "", remote, raw)
        except (KVError, MailStoreError, OSError) as e:
            log.warning("could not store message %s: %s", trace_id, e)
            return Reply(451, "4.3.0 Could not store the message; try again later")
        log.info("accepted %s from %s: %d bytes, %d local and %d remote recipients", trace_id,
                 session.peer_ip, len(raw), len(locals_), len(remote))
        return Reply(250, f"2.0.0 OK queued as {trace_id}")


class SMTPServer(TCPService):
    """Serves SMTP on host:port, one thread per connection (src.server.TCPService)."""

    def __init__(self, host: str, port: int, handler: MailDelivery, *, hostname: str, max_message_bytes: int,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, name: str = "smtp"):
        self.handler = handler
        self.hostname = hostname
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        super().__init__(host, port, name)

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        sock.settimeout(self.idle_timeout_s)
        conn = SMTPConnection(self.handler, hostname=self.hostname, peer_ip=str(peer[0]),
                              max_message_bytes=self.max_message_bytes)
        sock.sendall(conn.greeting())
        while not conn.closed:
            try:
                data = sock.recv(RECV_BYTES)
            except (socket.timeout, TimeoutError):
                sock.sendall(conn.timeout())
                return
            out = conn.receive_data(data)
            if out:
                sock.sendall(out)


def make_smtp_server(cfg: Config, kv: KV, host: str | None = None, port: int | None = None,
                     idle_timeout_s: float = IDLE_TIMEOUT_S) -> SMTPServer:
    """The SMTP server of `cfg` over `kv` (not started); host/port override cfg.mail.smtp."""
    store = MailStore(kv, chunk_bytes=cfg.drive.chunk_bytes)
    handler = MailDelivery(Accounts(kv), store, cfg.mail.domain)
    return SMTPServer(host or cfg.mail.smtp.host, cfg.mail.smtp.port if port is None else port, handler,
                      hostname=cfg.mail.domain, max_message_bytes=cfg.mail.max_message_bytes,
                      idle_timeout_s=idle_timeout_s)
