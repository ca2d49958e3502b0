"""Mailboxes and the outgoing-mail queue, kept in the KV store.

Shared by the SMTP server (delivers), the POP3 server (lists, reads, deletes),
the relay worker (the queue) and the webmail (everything). Layout, one line
per row (docs/mail.md explains it at length):

    mbox/<user>/<folder>   folder index: one column per message, named by its id;
                           the value is the message's metadata as JSON, and for a
                           small message (at most inline_bytes) a LF and then
                           the message itself, so it costs one write and one read
    mread/<user>/<folder>  one empty column per message of the folder that has
                           been read, and "=" once the row is complete: the
                           unread count is a COLS of each row, not a read of
                           every message (a folder page reads only its 50)
    mmsg/<user>/<id>       the message's exact bytes, in chunks: columns
                           "00000000", "00000001", ... of at most chunk_bytes each
    mailq                  the relay queue: one column per queued message (its
                           envelope, schedule and lease as JSON)
    mqmsg/<qid>            a queued message's bytes, chunked like mmsg rows
    msend/<user>           webmail send keys: one column per send (a hash of the
                           compose form's key), the value its message id

Invariants, and why they hold after a crash at any point:

- A message is visible only through its index cell, and the index cell is
  written after every chunk of its body (or holds the body itself). A crash mid-delivery leaves at worst
  an orphan body row that nothing refers to, never half a message.
- One cell per message in the index, so concurrent deliveries to one mailbox
  never overwrite each other (no read-modify-write of a shared list).
- Message ids are `<16 hex digits of nanoseconds><8 random hex>`: they sort
  by arrival, are unique, and never change (POP3 UIDL hands them out as the
  message's unique id, for ever). A delivery given an explicit id writes its
  index cell with PUTNX, so doing it twice (a retry after a lost reply, a
  relay worker that died after delivering a bounce) stores it once.
- Deleting removes the index cell first, then the body row; moving writes the
  new index cell before removing the old one (a crash in between shows the
  message in both folders, never in neither). No page moves messages yet
  (`move` is kept for filing; src/mailsweep.py says what a mover must do).
- Queue items are claimed with CPUT on their cell (a lease with an owner and
  an expiry), so two workers never deliver the same item at the same time,
  and an item whose worker died is claimed again once the lease runs out.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from src import mailfmt
from src.accounts import InvalidUsername, normalize_username
from src.kv import KV, Exists, Mismatch, NotFound

FOLDERS = ("Inbox", "Sent")
FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]{0,63}$")
DEFAULT_CHUNK_BYTES = 1024 * 1024
DEFAULT_INLINE_BYTES = 8 * 1024
QUEUE_ROW = b"mailq"
COMPLETE = b"="          # in an mread row: every read message of the folder has its column
_CAS_TRIES = 16


class MailStoreError(Exception):
    """A mail-store request that cannot be done; str() is a message for people."""


class NoSuchMessage(MailStoreError):
    pass


class BadFolder(MailStoreError):
    pass


@dataclass(frozen=True)
class MessageInfo:
    """One message as a folder index knows it (no body)."""

    id: str
    folder: str
    sender: str
    to: str
    subject: str
    date: str  # the Date header, as written by the sender
    message_id: str
    size: int  # bytes of the stored message
    read: bool
    received: float  # unix time the store got it
    chunks: int = 0


@dataclass(frozen=True)
class QueueItem:
    """A message waiting for the relay: envelope, schedule and lease."""

    id: str
    owner: str  # the local user who sent it (bounces go to their Inbox)
    mail_from: str
    rcpts: tuple[str, ...]  # recipients not yet delivered nor bounced
    size: int
    chunks: int
    created: float
    next_at: float  # not to be tried before this unix time
    attempts: int = 0
    lease_owner: str = ""
    lease_until: float = 0.0
    last_error: str = ""
    failed: tuple[tuple[str, str, str], ...] = ()  # (address, status, diagnostic) awaiting a bounce
    bounce_id: str = ""  # the id the pending bounce is delivered under (so it is delivered once)
    stored: bytes = field(default=b"", compare=False, repr=False)  # the cell's bytes, for CPUT

    def encode(self) -> bytes:
        d = {"owner": self.owner, "from": self.mail_from, "rcpts": list(self.rcpts), "size": self.size,
             "chunks": self.chunks, "created": self.created, "next_at": self.next_at,
             "attempts": self.attempts, "lease_owner": self.lease_owner, "lease_until": self.lease_until,
             "last_error": self.last_error, "failed": [list(f) for f in self.failed],
             "bounce_id": self.bounce_id}
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, qid: str, value: bytes) -> "QueueItem":
        d = json.loads(value)
        return cls(id=qid, owner=d["owner"], mail_from=d["from"], rcpts=tuple(d["rcpts"]), size=d["size"],
                   chunks=d["chunks"], created=d["created"], next_at=d["next_at"], attempts=d["attempts"],
                   lease_owner=d["lease_owner"], lease_until=d["lease_until"], last_error=d["last_error"],
                   failed=tuple(tuple(f) for f in d.get("failed", ())), bounce_id=d.get("bounce_id", ""),
                   stored=value)


def _chunk_col(i: int) -> bytes:
    return b"%08d" % i


def check_folder(folder: str) -> str:
    if not isinstance(folder, str) or not FOLDER_RE.fullmatch(folder):
        raise BadFolder(f"not a folder name: {folder!r}")
    return folder


def _check_user(user: str) -> str:
    """Only canonical usernames name mailboxes (so no '/' or '..' can reach a row name)."""
    try:
        if normalize_username(user) == user:
            return user
    except (InvalidUsername, AttributeError):
        pass
    raise MailStoreError(f"not a canonical username: {user!r}")


def _check_id(msg_id: str) -> str:
    if not isinstance(msg_id, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", msg_id):
        raise NoSuchMessage(f"no such message: {msg_id!r}")
    return msg_id


class MailStore:
    """Mail operations over any `KV` (the cluster client, or MemoryKV in tests)."""

    def __init__(self, kv: KV, chunk_bytes: int = DEFAULT_CHUNK_BYTES, clock: Callable[[], float] = time.time,
                 inline_bytes: int = DEFAULT_INLINE_BYTES):
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self.kv = kv
        self.chunk_bytes = chunk_bytes
        self.inline_bytes = min(inline_bytes, chunk_bytes)
        self.clock = clock

    # -- ids and rows ----------------------------------------------------------

    def new_id(self) -> str:
        """A fresh message id: sorts by time, unique, safe as a POP3 UIDL."""
        return "%016x%s" % (int(self.clock() * 1e9), os.urandom(4).hex())

    @staticmethod
    def _index_row(user: str, folder: str) -> bytes:
        return f"mbox/{_check_user(user)}/{check_folder(folder)}".encode()

    @staticmethod
    def _read_row(user: str, folder: str) -> bytes:
        return f"mread/{_check_user(user)}/{check_folder(folder)}".encode()

    @staticmethod
    def _body_row(user: str, msg_id: str) -> bytes:
        return f"mmsg/{_check_user(user)}/{msg_id}".encode()

    def _write_chunks(self, row: bytes, raw: bytes) -> int:
        n = 0
        for off in range(0, len(raw), self.chunk_bytes):
            self.kv.put(row, _chunk_col(n), raw[off: off + self.chunk_bytes])
            n += 1
        return n

    def _read_chunks(self, row: bytes, chunks: int) -> Iterator[bytes]:
        for i in range(chunks):
            yield self.kv.get(row, _chunk_col(i))

    # -- mailboxes -------------------------------------------------------------

    def deliver(self, user: str, folder: str, raw: bytes, *, msg_id: str | None = None,
                read: bool = False) -> str:
        """Store `raw` (exact bytes) as a new message in `user`'s `folder`; returns its id.

        Durable when it returns. With an explicit `msg_id` it is idempotent:
        delivering the same id again stores nothing new.
        """
        msg_id = _check_id(msg_id) if msg_id else self.new_id()
        index_row = self._index_row(user, folder)
        inline = len(raw) <= self.inline_bytes
        chunks = 0 if inline else self._write_chunks(self._body_row(user, msg_id), raw)
        s = mailfmt.summarize(raw)
        meta = {"from": s.sender, "to": s.to, "subject": s.subject, "date": s.date, "mid": s.message_id,
                "size": len(raw), "chunks": chunks, "inline": inline, "read": read, "t": self.clock()}
        value = _json(meta) + b"\n" + raw if inline else _json(meta)
        try:
            self.kv.putnx(index_row, msg_id.encode(), value)
        except Exists:
            pass  # delivered before (a retry): the first copy stands
        if read:    # (a Sent copy; new mail is unread and costs no second write)
            self._set_read_mark(user, folder, msg_id, True)
        return msg_id

    def _meta(self, user: str, folder: str, msg_id: str) -> tuple[bytes, dict]:
        try:
            value = self.kv.get(self._index_row(user, folder), _check_id(msg_id).encode())
        except NotFound:
            raise NoSuchMessage(f"no message {msg_id} in {folder}") from None
        return value, _meta_of(value)

    @staticmethod
    def _info(folder: str, msg_id: str, m: dict) -> MessageInfo:
        return MessageInfo(id=msg_id, folder=folder, sender=m["from"], to=m["to"], subject=m["subject"],
                           date=m["date"], message_id=m["mid"], size=m["size"], read=m["read"],
                           received=m["t"], chunks=m["chunks"])

    def list(self, user: str, folder: str) -> list[MessageInfo]:
        """Every message in the folder, newest first (its index cells read in pipelines)."""
        return self.infos(user, folder, self.ids(user, folder))

    def ids(self, user: str, folder: str) -> list[str]:
        """The ids of the folder's messages, newest first: one COLS, no reads."""
        return [c.decode() for c in reversed(self.kv.cols(self._index_row(user, folder)))]

    def infos(self, user: str, folder: str, ids: list[str]) -> list[MessageInfo]:
        """The messages of `ids` that are still there, in that order."""
        values = self.kv.get_many(self._index_row(user, folder), [_check_id(i).encode() for i in ids])
        return [self._info(folder, msg_id, _meta_of(values[msg_id.encode()]))
                for msg_id in ids if msg_id.encode() in values]   # (not there: deleted meanwhile)

    def read_marks(self, user: str, folder: str) -> set[bytes]:
        """The ids of the folder's messages that have been read: one COLS of
        the mread row. A folder from before that row existed is indexed
        once, by reading every message. Read the marks before the messages
        they are compared with (`heal_read_marks`)."""
        marks = set(self.kv.cols(self._read_row(user, folder)))
        if COMPLETE not in marks:
            marks = self._index_reads(user, folder)
        return marks

    @staticmethod
    def unread_count(ids: list[str], marks: set[bytes]) -> int:
        """How many of `ids` (from `ids()`) have no read mark."""
        return sum(1 for i in ids if i.encode() not in marks)

    def _index_reads(self, user: str, folder: str) -> set[bytes]:
        row = self._read_row(user, folder)
        marks = set()
        for m in self.list(user, folder):
            if m.read:
                self.kv.put(row, m.id.encode(), b"")
                marks.add(m.id.encode())
        self.kv.put(row, COMPLETE, b"")
        return marks

    def heal_read_marks(self, user: str, folder: str, shown: list[MessageInfo], marks: set[bytes]) -> None:
        """Make the read marks of messages just shown agree with their flags.

        A mark is written after its message's flag, so a crash in between
        (or a message read while the folder was being indexed) leaves the
        count off by one; showing the message puts it right. `marks` were
        read before `shown`, so a flag changed by another tab in between is
        the newer fact; and the flag is read once more before a mark is
        changed (a tab that opens the message meanwhile has written its
        flag, then its mark: its mark is never taken away)."""
        for m in shown:
            key = m.id.encode()
            if m.read == (key in marks):
                continue
            try:
                self._mark_as_flag(user, folder, key, self._flag(user, folder, key))
            except NotFound:
                pass

    def _flag(self, user: str, folder: str, key: bytes) -> bool:
        return _meta_of(self.kv.get(self._index_row(user, folder), key))["read"]

    def _mark_as_flag(self, user: str, folder: str, key: bytes, read: bool) -> None:
        """Set the mark to `read`, then read the flag again and follow it if
        it changed meanwhile: another tab that flipped the flag between our
        read and our write wrote its mark before ours; the last mark written
        must be checked against a flag read after it."""
        for _ in range(_CAS_TRIES):
            self._set_read_mark(user, folder, key.decode(), read)
            now = self._flag(user, folder, key)
            if now == read:
                return
            read = now

    def info(self, user: str, folder: str, msg_id: str) -> MessageInfo:
        return self._info(folder, msg_id, self._meta(user, folder, msg_id)[1])

    def iter_raw(self, user: str, folder: str, msg_id: str) -> Iterator[bytes]:
        """The message's exact bytes, one chunk at a time (for big messages)."""
        value, m = self._meta(user, folder, msg_id)
        if m.get("inline"):
            return iter([value[value.index(b"\n") + 1:]])
        return self._read_chunks(self._body_row(user, msg_id), m["chunks"])

    def get_raw(self, user: str, folder: str, msg_id: str) -> bytes:
        """The message's exact bytes, as received."""
        return b"".join(self.iter_raw(user, folder, msg_id))

    def mark_read(self, user: str, folder: str, msg_id: str, read: bool = True) -> None:
        row = self._index_row(user, folder)
        for _ in range(_CAS_TRIES):
            old, m = self._meta(user, folder, msg_id)
            if m["read"] == read:
                return
            m["read"] = read
            new = _json(m) + old[old.index(b"\n"):] if m.get("inline") else _json(m)
            try:
                self.kv.cput(row, msg_id.encode(), old, new)
                break
            except Mismatch:
                continue
            except NotFound:
                raise NoSuchMessage(f"no message {msg_id} in {folder}") from None
        else:
            raise MailStoreError("the message keeps changing; try again")
        self._set_read_mark(user, folder, msg_id, read)

    def _set_read_mark(self, user: str, folder: str, msg_id: str, read: bool) -> None:
        try:
            if read:
                self.kv.put(self._read_row(user, folder), msg_id.encode(), b"")
            else:
                self.kv.delete(self._read_row(user, folder), msg_id.encode())
        except NotFound:
            pass

    def delete(self, user: str, folder: str, msg_id: str) -> None:
        """Remove the message for good (index cell first, then its body)."""
        try:
            self.kv.delete(self._index_row(user, folder), _check_id(msg_id).encode())
        except NotFound:
            raise NoSuchMessage(f"no message {msg_id} in {folder}") from None
        self._set_read_mark(user, folder, msg_id, False)    # a left-over mark is ignored anyway
        try:
            self.kv.delrow(self._body_row(user, msg_id))
        except NotFound:
            pass

    def move(self, user: str, src: str, dst: str, msg_id: str) -> None:
        """Move a message between folders; its id and bytes stay the same.

        No page calls this yet (the webmail deletes, it does not file): it is
        kept, with its tests, for filing. A mover that files into a new folder
        should create the folder row first (see src/mailsweep.py)."""
        value, m = self._meta(user, src, msg_id)
        try:
            self.kv.putnx(self._index_row(user, dst), msg_id.encode(), value)
        except Exists:
            pass
        if m["read"]:
            self._set_read_mark(user, dst, msg_id, True)
        try:
            self.kv.delete(self._index_row(user, src), msg_id.encode())
        except NotFound:
            pass
        self._set_read_mark(user, src, msg_id, False)

    # -- the relay queue ---------------------------------------------------------

    @staticmethod
    def _queue_body_row(qid: str) -> bytes:
        return f"mqmsg/{qid}".encode()

    def enqueue_outgoing(self, owner: str, mail_from: str, rcpts: list[str], raw: bytes,
                         qid: str | None = None) -> str:
        """Queue `raw` for the relay to `rcpts` (other domains); durable on return.
        With an explicit `qid`, queueing the same id again adds nothing."""
        if not rcpts:
            raise ValueError("no recipients")
        if qid:
            if self._queued(_check_id(qid)):
                return qid
        else:
            qid = self.new_id()
        chunks = self._write_chunks(self._queue_body_row(qid), raw)
        now = self.clock()
        item = QueueItem(id=qid, owner=owner, mail_from=mail_from, rcpts=tuple(rcpts), size=len(raw),
                         chunks=chunks, created=now, next_at=now)
        try:
            self.kv.putnx(QUEUE_ROW, qid.encode(), item.encode())
        except Exists:
            pass  # queued before (a retry): the first item stands
        return qid

    def _queued(self, qid: str) -> bool:
        try:
            self.kv.get(QUEUE_ROW, qid.encode())
            return True
        except NotFound:
            return False

    def id_for_send_key(self, user: str, key: str) -> str:
        """The message id of the webmail send with this key (a hash of the
        compose form's one-time key): chosen and stored (PUTNX) by the first
        attempt, read back by a retry. Row `msend/<user>`, one small cell per
        send; the mail sweep removes those older than SEND_KEY_TTL_S
        (src/mailsweep.py)."""
        row = f"msend/{_check_user(user)}".encode()
        fresh = self.new_id()
        try:
            self.kv.putnx(row, key.encode(), fresh.encode())
            return fresh
        except Exists:
            return _check_id(self.kv.get(row, key.encode()).decode())

    def has_message(self, user: str, folder: str, msg_id: str) -> bool:
        try:
            self._meta(user, folder, msg_id)
            return True
        except NoSuchMessage:
            return False

    def queue(self) -> list[QueueItem]:
        """Every queued item, oldest first."""
        out = []
        for col in self.kv.cols(QUEUE_ROW):
            try:
                out.append(QueueItem.decode(col.decode(), self.kv.get(QUEUE_ROW, col)))
            except NotFound:
                continue
        return out

    def claim(self, item: QueueItem, worker: str, lease_s: float) -> QueueItem | None:
        """Take the item's lease for `lease_s` seconds; None if someone else changed it first."""
        return self.update(item, lease_owner=worker, lease_until=self.clock() + lease_s)

    def update(self, item: QueueItem, **changes) -> QueueItem | None:
        """Replace the item's fields (CPUT on what `item` read); None if it changed meanwhile."""
        return self._swap(item, replace(item, **changes))

    def _swap(self, item: QueueItem, new: QueueItem) -> QueueItem | None:
        value = new.encode()
        try:
            self.kv.cput(QUEUE_ROW, item.id.encode(), item.stored, value)
        except (Mismatch, NotFound):
            return None
        return replace(new, stored=value)

    def queue_raw(self, item: QueueItem) -> bytes:
        return b"".join(self._read_chunks(self._queue_body_row(item.id), item.chunks))

    def done(self, item: QueueItem) -> None:
        """Remove a finished item (delivered or bounced), index cell first."""
        try:
            if self.kv.get(QUEUE_ROW, item.id.encode()) != item.stored:
                return  # someone else holds it now; they will finish it
            self.kv.delete(QUEUE_ROW, item.id.encode())
        except NotFound:
            pass
        try:
            self.kv.delrow(self._queue_body_row(item.id))
        except NotFound:
            pass


def _meta_of(value: bytes) -> dict:
    """The metadata of an index cell (the JSON before an inline message's LF)."""
    end = value.find(b"\n")
    return json.loads(value if end < 0 else value[:end])


def _json(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
