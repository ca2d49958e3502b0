"""Reclaiming orphaned mail bodies: body rows that no index cell or queue item names.

src/mailstore.py writes a big message's body row (`mmsg/<user>/<id>`, or
`mqmsg/<qid>` for the relay queue) *before* the index cell that makes it
visible, and deletes the index cell *before* the body row. A crash between
the two steps leaves an orphan: a body row nothing refers to. It is never
shown, but the `KV` interface cannot list rows, so nothing would ever find it
again. This module finds and removes them.

How a sweep goes (one *round*, resumable page by page):

1. List the mailbox index rows (`mbox/<user>/<folder>`) of every tablet, to
   learn the folders beyond Inbox and Sent that any user has.
2. For every tablet, walk the rows under `mmsg/` and then under `mqmsg/`, one
   bounded page (`ROWS <tablet> <after> <limit>`) at a time. Rows sort
   bytewise, so each prefix is one contiguous run and the walk never touches
   other rows (drive chunks, accounts...).
3. In each page, a body whose id is younger than the grace period is left
   alone: its delivery may still be writing it (the id is made, from the
   clock, just before the body's first chunk). Message ids begin with 16 hex
   digits of nanoseconds (`MailStore.new_id`); a row whose name does not
   parse is never touched.
4. For the old ones, and only after the page was listed:
   - `mqmsg/<qid>` is referenced while the queue row `mailq` has a column
     `<qid>`;
   - `mmsg/<user>/<id>` is referenced while a pending bounce of the queue
     carries `<id>` (the relay picks a bounce's id, writes it into the queue
     item, and only then delivers the bounce under that old id), or while a
     folder index of `<user>` has a column `<id>`. The queue is read before
     the indexes: a bounce removed from the queue in between has had its
     index cell written first, so the index read sees it.
   An old, unreferenced body is removed with DELROW.

Why it is safe:

- Nothing makes an old body referenced again. A new delivery makes a new id
  (young, so not swept). Two deliveries reuse an older id: a pending bounce,
  which the queue names until its index cell exists, and a webmail send
  retried under its send key, whose id is as old as the key; keys are
  removed after SEND_KEY_TTL_S (12 h), well before GRACE_S (24 h), so such
  an id is at most half a day old (plus a round's wait) when its body is
  written. So once a body is old and unreferenced, it stays so, and the
  DELROW after the check is not racing anybody.
- Any number of sweepers may run at once: a DELROW that finds nothing
  (another sweeper, or `MailStore.delete` finishing its own work) is fine.
- A SIGKILL anywhere loses nothing: a sweep only ever removes rows that are
  already garbage; a round cut short is simply done again later.
- A listing that misses rows (a tablet with no live server, a primary that
  moved) only means fewer rows are swept this round; a listing that shows a
  row already gone costs one DELROW answered NOTFOUND. Every decision reads
  the index through the `KV` interface, never the listing.

The same rounds also walk the `msend/<user>` rows (webmail send keys, see
MailStore.id_for_send_key) and remove keys older than SEND_KEY_TTL_S (12 h):
they guard a send against being repeated by a retry of its form, which
happens within minutes; kept for ever, the row grew by one cell per message.

The one case it does not cover: `MailStore.move` into a folder created after
the round began, racing the sweep's read of the old folder. Nothing moves
messages today (the webmail deletes, it does not file); a mover that files
into new folders should create the folder row first.

The grace period is long (a day) on purpose: deliveries take seconds, but
ids come from the clocks of other hosts, and a process can stall. Orphans
are rare and small in number; reclaiming them a day late costs nothing.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from src.accounts import InvalidUsername, normalize_username
from src.kv import KV, KVError, NotFound, Unavailable
from src.mailstore import FOLDER_RE, FOLDERS, QUEUE_ROW, MailStore, QueueItem

log = logging.getLogger(__name__)

INDEX_PREFIX = b"mbox/"
BODY_PREFIX = b"mmsg/"
QUEUE_BODY_PREFIX = b"mqmsg/"
SEND_KEY_PREFIX = b"msend/"
PAGE_ROWS = 256                # row names per ROWS request (the server allows up to 10,000)
GRACE_S = 24 * 3600.0          # a body younger than this is never swept
# A webmail send key (msend/<user>) is kept this long. A retry under a key
# delivers under the key's id, as old as the key, so the TTL (plus the wait
# for the round that removes the key, SWEEP_EVERY_S and the round itself)
# must stay well under GRACE_S: such a body is then hours away from being
# sweepable while its delivery writes it. Equal to GRACE_S, a form re-sent a
# day later could lose the body a concurrent round had just judged orphaned.
SEND_KEY_TTL_S = 12 * 3600.0
SWEEP_EVERY_S = 600.0          # the relay starts a round this long after the last one ended
SWEEP_BUDGET_S = 5.0           # the relay gives a round at most this long per loop turn

_ID_TIME_RE = re.compile(r"^[0-9a-f]{16}")
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")         # what MailStore accepts as an id (fullmatch)


# -- listing rows ------------------------------------------------------------------


@dataclass(frozen=True)
class RowLister:
    """How the sweeper sees row names: the tablet numbers, and one page of one tablet.

    `page(tablet, after, limit)` returns up to `limit` row names of `tablet`
    greater than `after` (None: from the start), sorted bytewise: the admin
    command `ROWS` (PROTOCOL.md). Tests give a fake over `MemoryKV`.
    """

    tablets: Callable[[], list[int]]
    page: Callable[[int, bytes | None, int], list[bytes]]


def server_lister(client) -> RowLister:
    """Rows of one tablet server (a standalone one holds every tablet): a `ServerClient`."""
    def tablets() -> list[int]:
        return [int(line.split()[0]) for line in client.tablets() if line.split()]
    return RowLister(tablets, client.rows)


def cluster_lister(client) -> RowLister:
    """Rows of a cluster (a `ClusterClient`): each tablet asked of its primary in the map.

    A failed listing is tried once more with a fresh map (the primary may have
    moved); a tablet with no live server raises `Unavailable`.
    """
    def tablets() -> list[int]:
        return list(range(client.map().tablets))

    def page(tablet: int, after: bytes | None, limit: int) -> list[bytes]:
        for refresh in (False, True):
            addr = client.map(refresh=refresh).primary(tablet)
            try:
                if addr is None:
                    raise Unavailable(f"tablet {tablet} has no live server")
                return client.server(addr).rows(tablet, after, limit)
            except (KVError, OSError):
                if refresh:
                    raise
        raise AssertionError("unreachable")
    return RowLister(tablets, page)


def lister_for(kv) -> RowLister | None:
    """The lister for the relay's store: a cluster or a tablet server; None for anything else."""
    from src.kvclient import ClusterClient, ServerClient
    if isinstance(kv, ClusterClient):
        return cluster_lister(kv)
    if isinstance(kv, ServerClient):
        return server_lister(kv)
    return None


def rows_under(lister: RowLister, tablet: int, prefix: bytes, page_rows: int = PAGE_ROWS) -> Iterator[list[bytes]]:
    """The rows of `tablet` that start with `prefix`, page by page (each page one request)."""
    after = prefix
    while True:
        names = lister.page(tablet, after, page_rows)
        mine = [n for n in names if n.startswith(prefix)]
        if mine:
            yield mine
        if len(mine) < len(names) or len(names) < page_rows:
            return
        after = names[-1]


# -- names and ages ------------------------------------------------------------------


def id_time(msg_id: str) -> float | None:
    """The unix time a message or queue id was made (MailStore.new_id), or None if it is not one of ours."""
    m = _ID_TIME_RE.match(msg_id)
    return int(m.group(0), 16) / 1e9 if m else None


def parse_body_row(row: bytes) -> tuple[str, str] | None:
    """(user, id) of an `mmsg/<user>/<id>` row name; None for a name mailstore never writes."""
    try:
        user, sep, msg_id = row[len(BODY_PREFIX):].decode("ascii").partition("/")
        if sep and normalize_username(user) == user and _ID_RE.fullmatch(msg_id):
            return user, msg_id
    except (UnicodeDecodeError, InvalidUsername, AttributeError):
        pass
    return None


def parse_queue_body_row(row: bytes) -> str | None:
    """The queue id of an `mqmsg/<qid>` row name, or None."""
    try:
        qid = row[len(QUEUE_BODY_PREFIX):].decode("ascii")
    except UnicodeDecodeError:
        return None
    return qid if _ID_RE.fullmatch(qid) else None


# -- the sweeper ----------------------------------------------------------------------


@dataclass
class SweepStats:
    """What one round saw and did (a page tried again after a store error is counted again)."""

    bodies: int = 0           # body rows listed
    young: int = 0            # left alone: within the grace period
    kept: int = 0             # old but referenced (the normal case for every stored big message)
    reclaimed: int = 0        # orphans removed
    unknown: int = 0          # names mailstore does not write: left alone
    send_keys: int = 0        # webmail send keys past SEND_KEY_TTL_S removed
    tablets_skipped: int = 0  # tablets that could not be listed this round
    seconds: float = 0.0


@dataclass
class _Round:
    tablets: list[int]
    extra_folders: dict[str, set[str]]   # user -> folders beyond FOLDERS
    stats: SweepStats = field(default_factory=SweepStats)
    started: float = 0.0
    position: int = 0                    # index into tablets
    prefix: int = 0                      # index into _PREFIXES
    after: bytes | None = None           # resume the walk after this row


_PREFIXES = (BODY_PREFIX, QUEUE_BODY_PREFIX, SEND_KEY_PREFIX)


class MailSweeper:
    """Finds and removes orphaned mail bodies; see the module docstring.

    `sweep()` runs one whole round. `step(budget_s)` does part of a round (at
    least one page) and returns its stats once the round is complete, else
    None, so a loop with other work (the relay) can sweep a little at a time.
    """

    def __init__(self, store: MailStore, lister: RowLister, *, grace_s: float = GRACE_S,
                 page_rows: int = PAGE_ROWS, clock: Callable[[], float] | None = None,
                 monotonic: Callable[[], float] = time.monotonic, send_key_ttl_s: float = SEND_KEY_TTL_S):
        if page_rows < 1:
            raise ValueError("page_rows must be positive")
        if grace_s < 0:
            raise ValueError("grace_s must not be negative")
        self.store = store
        self.kv: KV = store.kv
        self.lister = lister
        self.grace_s = grace_s
        self.send_key_ttl_s = send_key_ttl_s
        self.page_rows = page_rows
        self.clock = clock or store.clock
        self.monotonic = monotonic
        self._round: _Round | None = None

    @property
    def in_round(self) -> bool:
        return self._round is not None

    def sweep(self) -> SweepStats:
        """One whole round, from the start (a round in progress is dropped)."""
        self._round = None
        while True:
            stats = self.step(budget_s=float("inf"))
            if stats is not None:
                return stats

    def step(self, budget_s: float) -> SweepStats | None:
        """Go on with the current round (or start one) for about `budget_s` seconds.

        Returns the round's stats when it is complete, None when there is more
        to do. A KV error ends the call, and the next call resumes at the
        page that failed.
        """
        until = self.monotonic() + budget_s
        r = self._round
        if r is None:
            r = self._round = self._begin()
        while r.position < len(r.tablets):
            tablet, prefix = r.tablets[r.position], _PREFIXES[r.prefix]
            try:
                names = self.lister.page(tablet, prefix if r.after is None else r.after, self.page_rows)
            except (KVError, OSError) as e:
                log.warning("mail sweep: cannot list tablet %d (%s); skipped this round", tablet, e)
                r.stats.tablets_skipped += 1
                r.position, r.prefix, r.after = r.position + 1, 0, None
                continue
            mine = [n for n in names if n.startswith(prefix)]
            if mine:
                self._sweep_page(prefix, mine, r)   # a KV error here leaves the cursor on this page
            if len(mine) == len(names) == self.page_rows:
                r.after = names[-1]
            else:                                   # the end of this prefix in this tablet
                r.after = None
                r.prefix += 1
                if r.prefix == len(_PREFIXES):
                    r.position, r.prefix = r.position + 1, 0
            if self.monotonic() >= until:
                return None
        self._round = None
        r.stats.seconds = self.monotonic() - r.started
        s = r.stats
        log_fn = log.info if s.reclaimed or s.tablets_skipped else log.debug
        log_fn("mail sweep: %d body rows, %d young, %d kept, %d orphans reclaimed, %d unknown names, "
               "%d old send keys removed, %d tablets skipped, %.1f s", s.bodies, s.young, s.kept, s.reclaimed,
               s.unknown, s.send_keys, s.tablets_skipped, s.seconds)
        return s

    # -- one round --

    def _begin(self) -> _Round:
        started = self.monotonic()
        tablets = sorted(self.lister.tablets())
        extra: dict[str, set[str]] = {}
        skipped = 0
        for tablet in tablets:
            try:
                for names in rows_under(self.lister, tablet, INDEX_PREFIX, self.page_rows):
                    for name in names:
                        user, folder = _parse_index_row(name)
                        if user and folder not in FOLDERS:
                            extra.setdefault(user, set()).add(folder)
            except (KVError, OSError) as e:
                # Without this tablet's folder rows we could miss a folder that
                # refers to a body: no body is swept this round.
                log.warning("mail sweep: cannot list the mailboxes of tablet %d (%s); no sweep this round",
                            tablet, e)
                skipped += 1
        if skipped:
            tablets = []
        r = _Round(tablets=tablets, extra_folders=extra, started=started)
        r.stats.tablets_skipped = skipped
        return r

    def _sweep_page(self, prefix: bytes, names: list[bytes], r: _Round) -> None:
        now = self.clock()
        if prefix == SEND_KEY_PREFIX:
            for row in names:
                self._expire_send_keys(row, now, r)
            return
        old: list[tuple[bytes, str, str]] = []       # (row, user or "", id)
        for row in names:
            r.stats.bodies += 1
            if prefix == BODY_PREFIX:
                parsed = parse_body_row(row)
            else:
                qid = parse_queue_body_row(row)
                parsed = ("", qid) if qid else None
            made = id_time(parsed[1]) if parsed else None
            if made is None:
                r.stats.unknown += 1
            elif now - made < self.grace_s:
                r.stats.young += 1
            else:
                old.append((row, *parsed))
        if not old:
            return
        # Read what refers to bodies only now, after the page was listed (see the module docstring).
        if prefix == BODY_PREFIX:
            pending = {(item.owner, item.bounce_id) for item in self._queue() if item.bounce_id}
            index_ids: dict[str, set[str]] = {}
            for _row, user, msg_id in old:
                if user not in index_ids:
                    index_ids[user] = self._index_ids(user, r.extra_folders.get(user, ()))

            def referenced(user: str, msg_id: str) -> bool:
                return (user, msg_id) in pending or msg_id in index_ids[user]
        else:
            queued = {c.decode("ascii", "replace") for c in self.kv.cols(QUEUE_ROW)}

            def referenced(user: str, msg_id: str) -> bool:
                return msg_id in queued
        for row, user, msg_id in old:
            if referenced(user, msg_id):
                r.stats.kept += 1
                continue
            try:
                self.kv.delrow(row)
            except NotFound:
                pass  # someone else removed it first
            r.stats.reclaimed += 1
            log.debug("mail sweep: reclaimed orphan body row %r", row)

    def _expire_send_keys(self, row: bytes, now: float, r: _Round) -> None:
        """Remove the send keys of `row` (`msend/<user>`) older than the TTL.

        A webmail send records its message id under the compose form's key
        (MailStore.id_for_send_key) so that sending the form again completes
        the send instead of repeating it. That matters for seconds (the
        page's own retry) or minutes (the Back button); after SEND_KEY_TTL_S
        (12 h, half the grace period: see there) the key goes, or the row
        would grow by one cell per message sent for ever.
        The id says when the key was made (it is a MailStore.new_id)."""
        for col in self.kv.cols(row):
            try:
                made = id_time(self.kv.get(row, col).decode("ascii"))
            except NotFound:
                continue
            except UnicodeDecodeError:
                made = None
            if made is None:
                r.stats.unknown += 1
                continue
            if now - made < self.send_key_ttl_s:
                continue
            try:
                self.kv.delete(row, col)
                r.stats.send_keys += 1
            except NotFound:
                pass

    def _queue(self) -> list[QueueItem]:
        return self.store.queue()

    def _index_ids(self, user: str, extra: set[str] | tuple) -> set[str]:
        """Every message id in any folder index of `user`."""
        ids: set[str] = set()
        for folder in (*FOLDERS, *sorted(extra)):
            row = f"mbox/{user}/{folder}".encode()
            ids.update(c.decode("ascii", "replace") for c in self.kv.cols(row))
        return ids


def _parse_index_row(row: bytes) -> tuple[str, str] | tuple[None, None]:
    """(user, folder) of an `mbox/<user>/<folder>` row name, or (None, None)."""
    try:
        user, sep, folder = row[len(INDEX_PREFIX):].decode("ascii").partition("/")
        if sep and normalize_username(user) == user and FOLDER_RE.fullmatch(folder):
            return user, folder
    except (UnicodeDecodeError, InvalidUsername, AttributeError):
        pass
    return None, None

