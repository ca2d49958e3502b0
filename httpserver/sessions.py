"""Log-in sessions, kept in the KV store so that every frontend accepts them.

Layout:

    row  sess/<key>     col  s        "<user> <csrf> <admin 0|1> <created> <last seen>"
    row  usess/<user>   col  <key>    "" (the user's sessions, for "log out everywhere")

A session id is 128 random bits (`secrets.token_urlsafe(16)`, 22 characters),
sent in the cookie `sid` (HttpOnly; SameSite=Lax; Path=/). Each session has
its own CSRF token, also 128 random bits.

The store never holds the id itself, only its key: the SHA-256 of the id, in
hex (64 characters). Whoever reads the store (the admin's raw data browser, a
checkpoint, a log file, a backup) sees which sessions exist and whose they
are, but cannot turn a row name back into a cookie that logs in. A plain hash
is enough, no salt or slow hash: the id is 128 random bits, not a password.

Sliding expiry without a write per request: a session is valid while
`now - last_seen < ttl`. `last_seen` is rewritten only when it is more than
REFRESH_AFTER_S (or a quarter of the TTL, if shorter) old, with CPUT, so a refresh can never bring back a session
that a logout (on any frontend) deleted meanwhile.

Expired sessions are removed three ways: when someone presents one (`get`);
at each log-in, up to PRUNE_PER_LOGIN of that user's index entries, picked at
random, are looked at and ended if expired or gone (`_prune`); and every
frontend sweeps all `sess/` rows every SWEEP_EVERY_S (`sweep`, started by
httpserver/frontend.py). The sweep is what bounds the table: it is the only
one that ends the sessions of users who never come back.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import secrets
import time
from dataclasses import dataclass
from typing import Callable

from src.kv import KV, KVError, Mismatch, NotFound

log = logging.getLogger(__name__)

REFRESH_AFTER_S = 60.0
PRUNE_PER_LOGIN = 8           # sessions of the user looked at (and ended if expired) per log-in
SWEEP_EVERY_S = 600.0         # each frontend looks through every session this often
SESSION_PREFIX = b"sess/"
SID_RE = re.compile(r"[A-Za-z0-9_-]{22}")
KEY_RE = re.compile(r"[0-9a-f]{64}")
COOKIE = "sid"


@dataclass
class Session:
    sid: str
    user: str
    csrf: str
    admin: bool
    created: float
    last_seen: float

    @property
    def key(self) -> str:
        """The name the store knows this session by."""
        return session_key(self.sid)

    def encode(self) -> bytes:
        return (f"{self.user} {self.csrf} {int(self.admin)} {self.created:.0f} {self.last_seen:.3f}").encode()

    @classmethod
    def decode(cls, sid: str, raw: bytes) -> "Session | None":
        try:
            user, csrf, admin, created, last = raw.decode().split(" ")
            return cls(sid, user, csrf, admin == "1", float(created), float(last))
        except (ValueError, UnicodeDecodeError):
            return None


def session_key(sid: str) -> str:
    """The store's name for the session whose cookie value is `sid`."""
    return hashlib.sha256(sid.encode()).hexdigest()


def _row(key: str) -> bytes:
    return SESSION_PREFIX + key.encode()


def _index(user: str) -> bytes:
    return b"usess/" + user.encode()


class Sessions:
    def __init__(self, kv: KV, ttl_s: float = 1800.0, clock: Callable[[], float] = time.time):
        self.kv = kv
        self.ttl = ttl_s
        self.clock = clock
        # A refresh a minute late costs at most a minute of a 30-minute TTL;
        # short TTLs (tests) refresh at a quarter of their length.
        self.refresh_after = min(REFRESH_AFTER_S, ttl_s / 4)

    def create(self, user: str, admin: bool = False) -> Session:
        """A new session for `user` (already authenticated)."""
        self._prune(user)
        now = self.clock()
        s = Session(secrets.token_urlsafe(16), user, secrets.token_urlsafe(16), admin, now, now)
        self.kv.put(_index(user), s.key, b"")
        self.kv.put(_row(s.key), b"s", s.encode())
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session `sid`, refreshed if due; None if absent, malformed or expired."""
        if not sid or not SID_RE.fullmatch(sid):
            return None
        key = session_key(sid)
        try:
            raw = self.kv.get(_row(key), b"s")
        except NotFound:
            return None
        s = Session.decode(sid, raw)
        if s is None:
            return None
        now = self.clock()
        if self._expired(s, now):
            self._end(key, s.user)
            return None
        if now - s.last_seen > self.refresh_after:
            old = raw
            s.last_seen = now
            try:
                self.kv.cput(_row(key), b"s", old, s.encode())
            except NotFound:
                return None          # logged out meanwhile
            except Mismatch:
                pass                 # another frontend refreshed it first
        return s

    def destroy(self, sid: str, user: str | None = None) -> None:
        """End one session, everywhere."""
        if user is None:
            s = self.get(sid)
            user = s.user if s else None
        self._end(session_key(sid), user)

    def destroy_user(self, user: str, keep: str | None = None) -> int:
        """End every session of `user` except `keep` (a session id); the number ended."""
        keep_key = session_key(keep) if keep else None
        n = 0
        for col in self.kv.cols(_index(user)):
            key = col.decode()
            if key == keep_key:
                continue
            self._end(key, user)
            n += 1
        return n

    def _end(self, key: str, user: str | None) -> None:
        """Delete the session row `key` and its entry in the user's index."""
        cells = [(_row(key), b"s")]
        if user:
            cells.append((_index(user), key.encode()))
        for row, col in cells:
            try:
                self.kv.delete(row, col)
            except NotFound:
                pass

    def _expired(self, s: "Session | None", now: float) -> bool:
        """Gone for good: unreadable, or idle for the TTL."""
        return s is None or now - s.last_seen >= self.ttl

    def sweep(self, lister) -> int:
        """End every expired session in the store; returns how many.

        Log-ins prune their own user's sessions, and a session presented
        after its expiry is ended then; this catches the rest, the sessions
        of people who closed the browser and never came back (without it
        they stayed for ever). `lister` is a mailsweep.RowLister (the
        store's `ROWS`): the walk goes through the `sess/` rows of every
        tablet. A tablet that cannot be listed is skipped until next time.
        """
        from src.mailsweep import rows_under
        now, ended = self.clock(), 0
        for tablet in lister.tablets():
            try:
                for rows in rows_under(lister, tablet, SESSION_PREFIX):
                    for row in rows:
                        key = row[len(SESSION_PREFIX):].decode("ascii", "replace")
                        try:
                            s = Session.decode("", self.kv.get(row, b"s"))
                        except NotFound:
                            continue
                        if self._expired(s, now):
                            self._end(key, s.user if s else None)
                            ended += 1
            except (KVError, OSError) as e:
                log.info("session sweep: tablet %d skipped this time (%s)", tablet, e)
        if ended:
            log.info("session sweep: ended %d expired sessions", ended)
        return ended

    def _prune(self, user: str) -> None:
        """End a few of the user's sessions that have expired.

        At most PRUNE_PER_LOGIN of them are read, picked at random: reading
        every one made each log-in of a user who never logs out (a script, a
        grader with curl) slower than the last, one GET per live session.
        Each log-in adds one session and looks at several, so the expired
        ones go over the next log-ins."""
        now = self.clock()
        cols = self.kv.cols(_index(user))
        if len(cols) > PRUNE_PER_LOGIN:
            cols = random.sample(cols, PRUNE_PER_LOGIN)
        for col in cols:
            key = col.decode()
            try:
                s = Session.decode("", self.kv.get(_row(key), b"s"))
            except NotFound:
                s = None
            # A session stored under its raw id (before ids were hashed) can
            # never be presented again: dropping it removes the raw id too.
            if self._expired(s, now) or not KEY_RE.fullmatch(key):
                self._end(key, user)
