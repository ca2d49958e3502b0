"""The POP3 server: a thin socket shell around `pop3_proto.POP3Connection`, and
`POP3Mailboxes`, the handler that logs users in and opens their Inbox.

One session per mailbox at a time, across every POP3 process: opening a
mailbox takes a lock cell in the KV store,

    row maillock/<user>   column pop3   value "<token> <expiry unix time>", or "" when free
    token = "<process id>:<incarnation>:<random>"

taken with PUTNX (first use) or CPUT (from "" or from an expired value) and
given back with CPUT to "" — so two sessions can never both think they hold
it. The expiry (idle timeout plus a margin, renewed while the session is
active) frees the mailbox of a POP3 process that was SIGKILLed mid-session.
A POP3 process restarted under the same config id (a new incarnation) does
not wait for that: a lock of its own id and another incarnation can only be
its dead predecessor's, and it takes it at once (as the relay does with its
queue leases). Thunderbird would otherwise hear "mailbox in use" for ten
minutes after every POP3 crash.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Iterator

from smtp.pop3_proto import MailboxInUse, MessageGone, POP3Connection, TemporaryFailure
from src.accounts import Accounts, mail_login_name
from src.config import Config
from src.kv import KV, Exists, KVError, Mismatch, NotFound
from src.mailstore import MailStore, MailStoreError, NoSuchMessage
from src.server import TCPService
from src.throttle import LoginThrottle

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 600.0  # RFC 1939 section 3: an autologout timer of at least 10 minutes
LOCK_MARGIN_S = 30.0
RECV_BYTES = 64 * 1024
FOLDER = "Inbox"
# Only the default `owner` of a MailboxLock made without one (the tests): the
# server passes its own "<process id>:<incarnation>" (POP3Server.owner).
THIS_PROCESS = "pop3:" + os.urandom(4).hex()


class MailboxLock:
    """The per-mailbox lock cell described above."""

    def __init__(self, kv: KV, user: str, ttl_s: float, clock: Callable[[], float] = time.time,
                 owner: str = THIS_PROCESS):
        self.kv, self.ttl_s, self.clock = kv, ttl_s, clock
        self.row = f"maillock/{user}".encode()
        self.owner = owner                      # "<process id>:<incarnation>"
        self.token = f"{owner}:{os.urandom(4).hex()}"
        self._held: bytes | None = None
        self._renewed_at = 0.0

    def _value(self) -> bytes:
        return f"{self.token} {self.clock() + self.ttl_s:.3f}".encode()

    def acquire(self) -> bool:
        mine = self._value()
        try:
            self.kv.putnx(self.row, b"pop3", mine)
        except Exists:
            try:
                cur = self.kv.get(self.row, b"pop3")
            except NotFound:
                return False
            if cur and not self._predecessors(cur):
                try:
                    if float(cur.split()[1]) > self.clock():
                        return False
                except (IndexError, ValueError):
                    pass  # unreadable: treat as expired
            try:
                self.kv.cput(self.row, b"pop3", cur, mine)
            except (Mismatch, NotFound):
                return False
        self._held, self._renewed_at = mine, self.clock()
        return True

    def _predecessors(self, value: bytes) -> bool:
        """Held by an earlier incarnation of this very process (same id)?"""
        proc, _, rest = value.split(b" ")[0].decode("utf-8", "replace").partition(":")
        mine_proc, _, mine_inc = self.owner.partition(":")
        return proc == mine_proc and rest.partition(":")[0] != mine_inc

    def renew(self) -> None:
        """Push the expiry out, at most once per half TTL."""
        if self._held is None or self.clock() - self._renewed_at < self.ttl_s / 2:
            return
        new = self._value()
        try:
            self.kv.cput(self.row, b"pop3", self._held, new)
            self._held, self._renewed_at = new, self.clock()
        except (Mismatch, NotFound, KVError) as e:
            log.warning("could not renew the mailbox lock of %s: %s", self.row.decode(), e)

    def still_mine(self) -> bool:
        """Renew now, whatever the time: True if the lock is still this
        session's. A session whose process stood still past the TTL (a
        paused VM) may have lost it to another session, which listed the
        same messages: it must then change nothing."""
        if self._held is None:
            return False
        new = self._value()
        try:
            self.kv.cput(self.row, b"pop3", self._held, new)
        except (Mismatch, NotFound):
            self._held = None
            return False
        self._held, self._renewed_at = new, self.clock()
        return True

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        try:
            self.kv.cput(self.row, b"pop3", held, b"")
        except (Mismatch, NotFound, KVError):
            pass  # expired and taken over, or the store is down: the expiry frees it


class KVMaildrop:
    """A user's Inbox as POP3 sees it: a snapshot of ids and sizes, oldest first."""

    def __init__(self, store: MailStore, user: str, lock: MailboxLock):
        self.store, self.user, self.lock = store, user, lock
        self._snapshot = [(m.id, m.size) for m in reversed(store.list(user, FOLDER))]

    def messages(self) -> list[tuple[str, int]]:
        return self._snapshot

    def iter_message(self, uid: str) -> Iterator[bytes]:
        try:
            chunks = self.store.iter_raw(self.user, FOLDER, uid)
        except NoSuchMessage:
            raise MessageGone(uid) from None   # deleted meanwhile (webmail): -ERR, the session goes on
        except KVError as e:
            raise TemporaryFailure() from e
        return self._then_mark_read(uid, chunks)

    def _then_mark_read(self, uid: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        # A store failure mid-message raises out of the socket loop, which drops
        # the connection: a message cut short must never look complete.
        yield from chunks
        try:
            self.store.mark_read(self.user, FOLDER, uid)
        except (MailStoreError, KVError):
            pass

    def commit(self, deleted: list[str]) -> int:
        """Delete at QUIT, if the session still holds the mailbox (else
        MailboxInUse, and nothing is deleted); a store failure part-way
        raises (the client hears -ERR [SYS/TEMP])."""
        if not self.lock.still_mine():
            log.warning("POP3 session of %s lost its mailbox lock: its deletions are dropped", self.user)
            raise MailboxInUse(self.user)
        n = 0
        for uid in deleted:
            try:
                self.store.delete(self.user, FOLDER, uid)
            except NoSuchMessage:
                pass
            n += 1
        return n

    def keepalive(self) -> None:
        self.lock.renew()

    def release(self) -> None:
        self.lock.release()


class POP3Mailboxes:
    """The POP3 handler: log-in against Accounts, Inbox with a cross-process lock."""

    def __init__(self, accounts: Accounts, store: MailStore, lock_ttl_s: float, process_id: str = "pop3",
                 domain: str = ""):
        self.accounts, self.store, self.lock_ttl_s, self.domain = accounts, store, lock_ttl_s, domain
        self.owner = f"{process_id}:{os.urandom(4).hex()}"      # this incarnation of the process
        self.throttle = LoginThrottle()     # the web log-in's rule: POP3 must not be a way around it

    def authenticate(self, username: str, password: str, peer_ip: str = "") -> str | None:
        if self.domain:
            username = mail_login_name(username, self.domain)
        try:
            who = self.throttle.attempt(username, peer_ip, lambda: self.accounts.verify(username, password))
        except KVError as e:
            log.warning("POP3 log-in: store unavailable: %s", e)
            raise TemporaryFailure() from None
        log.info("POP3 log-in as %r: %s", username[:64], "ok" if who else "refused")
        return who

    def open_maildrop(self, user: str) -> KVMaildrop:
        lock = MailboxLock(self.store.kv, user, self.lock_ttl_s, owner=self.owner)
        try:
            if not lock.acquire():
                log.info("POP3 mailbox of %s is in use by another session: refused", user)
                raise MailboxInUse(user)
        except KVError as e:
            log.warning("POP3 mailbox of %s: store unavailable: %s", user, e)
            raise TemporaryFailure() from None
        try:
            return KVMaildrop(self.store, user, lock)
        except KVError as e:
            lock.release()
            log.warning("POP3 mailbox of %s: store unavailable: %s", user, e)
            raise TemporaryFailure() from None


class POP3Server(TCPService):
    """Serves POP3 on host:port, one thread per connection (src.server.TCPService)."""

    def __init__(self, host: str, port: int, handler: POP3Mailboxes, *, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 name: str = "pop3"):
        self.handler = handler
        self.idle_timeout_s = idle_timeout_s
        super().__init__(host, port, name)

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        sock.settimeout(self.idle_timeout_s)
        conn = POP3Connection(self.handler, peer_ip=str(peer[0]))
        try:
            sock.sendall(conn.greeting())
            while not conn.closed:
                try:
                    data = sock.recv(RECV_BYTES)
                except (socket.timeout, TimeoutError):
                    return  # RFC 1939: close without a word and without deleting anything
                for part in conn.receive_data(data):
                    if isinstance(part, bytes):
                        sock.sendall(part)
                    else:
                        for chunk in part:
                            sock.sendall(chunk)
                if conn.maildrop is not None:
                    conn.maildrop.keepalive()
        except KVError as e:
            # mid-message: the only honest thing is to drop the connection,
            # so the client never takes a message cut short for a whole one
            log.warning("POP3 session of %s ended: store unavailable: %s", conn.user, e)
        finally:
            conn.close()


def make_pop3_server(cfg: Config, kv: KV, host: str | None = None, port: int | None = None,
                     idle_timeout_s: float = IDLE_TIMEOUT_S, process_id: str = "pop3") -> POP3Server:
    """The POP3 server of `cfg` over `kv` (not started); host/port override cfg.mail.pop3."""
    store = MailStore(kv, chunk_bytes=cfg.drive.chunk_bytes)
    handler = POP3Mailboxes(Accounts(kv), store, lock_ttl_s=idle_timeout_s + LOCK_MARGIN_S, process_id=process_id,
                            domain=cfg.mail.domain)
    return POP3Server(host or cfg.mail.pop3.host, cfg.mail.pop3.port if port is None else port, handler,
                      idle_timeout_s=idle_timeout_s)
