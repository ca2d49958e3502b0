"""The drive: each user's folders and files, stored in the KV store.

No HTTP here: the web app (httpserver/apps/drive.py) turns requests into
calls on `Drive`, and tests drive it over `MemoryKV`. docs/drive.md explains
the layout with pictures; the short version:

    drive/u/<user>            root  -> id of the user's root folder
                              used  -> {"total": bytes, "held": {file id: bytes}}
                              treelock -> {"token", "expires"} while a folder moves between folders
    drive/d/<user>/<folder>   meta  -> {"name", "parent", "state": "live"|"dead", "created"}
                              e/<name> -> {"id", "kind", "size", "mtime", "type", "cb"[, "op"]}
                                          ("op": the claim of the operation changing it)
    drive/f/<user>/<file>     state -> "live" | "dead"       (absent while uploading)
    drive/c/<user>/<file>/<n> d     -> bytes of chunk n      (one row per chunk)
    drive/j/<0..15>           <user>/<op id> -> an intent {"op", "expires", ...}

Invariants, and why they hold:

* Every row name starts with the user's name, and every lookup builds its row
  from the logged-in user, so an id from another user's URL finds nothing.
* Folders are known by id; a folder's children are columns of its own row, so
  renaming or moving a folder rewrites one entry (and its `meta`), never its
  subtree. Names are unique within a folder because entries are created with
  PUTNX on `e/<name>`.
* A file's chunks are written before its entry appears (the entry is the
  commit point), so nobody ever sees half a file.
* Anything that can be interrupted half-way (upload, delete, rmdir, move)
  first writes an intent with a lease to the journal rows; when it finishes it
  deletes the intent. `Drive.sweep()` finishes or undoes intents whose lease
  has expired (the frontend that owned them crashed). Which way it goes is
  decided by one cell per file, `state`, settled with PUTNX/CPUT so a sweeper
  and a slow owner can never both win.
* Quota: `used.total` counts live files. A file whose fate is not settled yet
  is in `used.held`: its bytes are in the total, and they stay there iff the
  file ends up live. Settling is one CPUT that removes it from `held`, so each
  file is charged and refunded exactly once even across crashes.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import secrets
import time
import unicodedata
import zlib
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from src.kv import KV, Exists, Mismatch, NotFound

log = logging.getLogger(__name__)

MAX_NAME_BYTES = 255          # like most file systems (NAME_MAX)
JOURNAL_SHARDS = 16           # intents are spread over this many rows
LEASE_S = 120.0               # an intent not renewed for this long is abandoned
TOMB_LEASES = 10              # a dead file's state cell outlives its deletion by this many leases
WINDOW = 4                    # chunk reads/writes in flight per transfer
MAX_DEPTH = 256               # deepest folder nesting we follow (breadcrumbs, cycle guard)
MAX_DUPLICATE_SUFFIX = 1000   # "name (2)" ... "name (1000)"
MAX_TREE_FOLDERS = 5000       # the folder picker lists at most this many
LOCK_WAIT_S = 5.0             # how long a folder move waits for another one to finish
TREE_LOCK_S = 15.0            # lease of the folder-move lock (a move holds it for milliseconds)
CLAIM_WAIT_S = 3.0            # how long a folder's purge waits for another operation on a child


# -- errors ---------------------------------------------------------------------

class DriveError(Exception):
    """A request the drive refuses; str() is a message fit to show the user.

    `status` is the HTTP status the web app answers with.
    """

    status = 400


class InvalidName(DriveError):
    status = 400


class ItemNotFound(DriveError):
    status = 404


class NameTaken(DriveError):
    status = 409


class MoveRefused(DriveError):
    status = 409


class QuotaExceeded(DriveError):
    status = 413


FORM_OVERHEAD = 64 * 1024        # what a multipart body may add to the files' sizes (check_fits)


class Busy(DriveError):
    """Another operation is working on this item (or on this user's folder tree) right now."""

    status = 409

    def __init__(self, message: str, holder: str = "", intent: dict | None = None):
        super().__init__(message)
        self.holder = holder            # the operation that holds the item, and its intent
        self.intent = intent or {}


class _Unfinished(Exception):
    """A folder's purge had to stop for another operation; its intent stays for a later sweep."""


class Damaged(DriveError):
    """A file whose chunks are missing or short although it is not deleted:
    data lost in the store, or a bug. (A rename or move never touches chunks;
    a file deleted while it is read raises ItemNotFound instead.)"""

    status = 500


# -- names ------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Format characters a name may keep: ZWNJ and ZWJ join letters in Persian and
# Indic scripts and build emoji (woman + ZWJ + laptop); the tag characters
# build the flags of England, Scotland and Wales.
_FORMAT_ALLOWED = re.compile("[\u200c\u200d\U000e0020-\U000e007f]")


def check_name(name: str) -> str:
    """The name as stored (Unicode NFC), or InvalidName saying what is wrong.

    For a new name (new folder, upload, rename). Any Unicode letters, spaces
    and punctuation are fine; refused: empty, "." and "..", "/" and NUL (and
    other control characters and line separators, which cannot be shown or
    sent in a header), invisible format characters (bidi overrides and
    isolates, zero-width spaces...: U+202E shows "txt.exe" as "exe.txt"),
    and more than 255 bytes of UTF-8.
    """
    name = _name_key(name)
    for ch in name:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Zl", "Zp"):
            raise InvalidName("A name cannot contain control characters (such as line breaks or tabs).")
        if cat == "Cf" and not _FORMAT_ALLOWED.match(ch):
            raise InvalidName(
                f"A name cannot contain the invisible formatting character U+{ord(ch):04X} "
                f"({unicodedata.name(ch, 'unnamed').lower()}): it can make a name look like "
                f"another one, e.g. hide its real extension.")
    return name


def _name_key(name: str) -> str:
    """The name in the form it is stored and looked up under (NFC), or
    InvalidName for what can never be stored. Lookups use only these rules,
    so an item named before a rule of check_name was added stays reachable
    (to be opened, renamed, moved or deleted)."""
    if not isinstance(name, str):
        raise InvalidName("A name must be text.")
    name = unicodedata.normalize("NFC", name)
    if name == "" or name.strip() == "":
        raise InvalidName("A name cannot be empty.")
    if name in (".", ".."):
        raise InvalidName(f'"{name}" cannot be used as a name.')
    if "/" in name:
        raise InvalidName('A name cannot contain "/".')
    if "\x00" in name:
        raise InvalidName("A name cannot contain the NUL character.")
    if _CONTROL.search(name):
        raise InvalidName("A name cannot contain control characters (such as line breaks or tabs).")
    n = len(name.encode("utf-8"))
    if n > MAX_NAME_BYTES:
        raise InvalidName(f"A name can be at most {MAX_NAME_BYTES} bytes of UTF-8; this one is {n}.")
    return name


def numbered(name: str, k: int) -> str:
    """The k-th alternative for a taken name: "report (2).pdf", "Photos (3)"."""
    if k < 2:
        return name
    dot = name.rfind(".")
    if 0 < dot < len(name) - 1 and len(name) - dot <= 10:
        stem, ext = name[:dot], name[dot:]
    else:
        stem, ext = name, ""
    suffix = f" ({k})"
    # Keep within the byte limit by shortening the stem, never the suffix.
    while len((stem + suffix + ext).encode("utf-8")) > MAX_NAME_BYTES and stem:
        stem = stem[:-1]
    return stem + suffix + ext


def content_type(name: str) -> str:
    return mimetypes.guess_type(name, strict=False)[0] or "application/octet-stream"


def new_id() -> str:
    """128 random bits: ids cannot be guessed (and are scoped to the user anyway)."""
    return secrets.token_hex(16)


# -- entries ------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One child of a folder, as listed."""

    name: str
    id: str
    kind: str          # "file" or "folder"
    size: int = 0
    mtime: float = 0.0
    type: str = ""     # content type, files only
    cb: int = 0        # chunk size the file was written with

    @property
    def is_folder(self) -> bool:
        return self.kind == "folder"

    @property
    def chunks(self) -> int:
        return -(-self.size // self.cb) if self.cb else 0

    def encode(self, op: str | None = None) -> bytes:
        d = {"id": self.id, "kind": self.kind, "mtime": self.mtime}
        if self.kind == "file":
            d.update(size=self.size, type=self.type, cb=self.cb)
        if op:
            d["op"] = op
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, name: str, raw: bytes) -> "Entry":
        d = json.loads(raw)
        return cls(name=name, id=d["id"], kind=d["kind"], size=int(d.get("size", 0)),
                   mtime=float(d.get("mtime", 0)), type=d.get("type", ""), cb=int(d.get("cb", 0)))


@dataclass(frozen=True)
class Usage:
    used: int
    quota: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.used / self.quota) if self.quota else 1.0


# -- row names ------------------------------------------------------------------------

def _user_row(user: str) -> bytes:
    return f"drive/u/{user}".encode()


def _dir_row(user: str, folder: str) -> bytes:
    return f"drive/d/{user}/{folder}".encode()


def _file_row(user: str, fid: str) -> bytes:
    return f"drive/f/{user}/{fid}".encode()


def _chunk_row(user: str, fid: str, n: int) -> bytes:
    return f"drive/c/{user}/{fid}/{n}".encode()


def _journal_row(opid: str) -> bytes:
    return f"drive/j/{zlib.crc32(opid.encode()) % JOURNAL_SHARDS}".encode()


def _entry_col(name: str) -> bytes:
    return b"e/" + name.encode("utf-8")


_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_CHUNK = b"d"


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# -- the drive -------------------------------------------------------------------------

class Drive:
    """Every drive operation, for any user, over one `KV`.

    Thread-safe: it keeps no per-user state in memory. `pool` runs chunk
    reads and writes in parallel (WINDOW per transfer) so a transfer is not
    bound by one round trip at a time.
    """

    def __init__(self, kv: KV, *, chunk_bytes: int = 1 << 20, quota_bytes: int = 10 << 30,
                 lease_s: float = LEASE_S, window: int = WINDOW, clock: Callable[[], float] = time.time):
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be positive")
        self.kv = kv
        self.chunk_bytes = chunk_bytes
        self.quota_bytes = quota_bytes
        self.lease_s = lease_s
        self.window = max(1, window)
        self.clock = clock
        self._pool = ThreadPoolExecutor(max_workers=4 * self.window, thread_name_prefix="drive-io") \
            if self.window > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- folders ----------------------------------------------------------------

    def root(self, user: str) -> str:
        """The id of the user's root folder, created on first use."""
        row = _user_row(user)
        try:
            return self.kv.get(row, b"root").decode()
        except NotFound:
            pass
        fid = new_id()
        self.kv.put(_dir_row(user, fid), b"meta",
                    _dumps({"name": "", "parent": "", "state": "live", "created": self.clock()}))
        try:
            self.kv.putnx(row, b"root", fid.encode())
            return fid
        except Exists:  # another frontend made it first: use theirs, drop ours
            self._delrow(_dir_row(user, fid))
            return self.kv.get(row, b"root").decode()

    def _meta(self, user: str, folder: str) -> tuple[bytes, dict]:
        if not isinstance(folder, str) or not _ID_RE.match(folder):
            raise ItemNotFound("That folder does not exist.")
        try:
            raw = self.kv.get(_dir_row(user, folder), b"meta")
        except NotFound:
            raise ItemNotFound("That folder does not exist (it may have been deleted).") from None
        return raw, json.loads(raw)

    def folder_meta(self, user: str, folder: str) -> dict:
        """{"name", "parent", ...} of a live folder of this user, or ItemNotFound."""
        _, meta = self._meta(user, folder)
        if meta.get("state") != "live":
            raise ItemNotFound("That folder has been deleted.")
        return meta

    def breadcrumbs(self, user: str, folder: str) -> list[tuple[str, str]]:
        """[(id, name), ...] from the root ("" as its name) down to `folder`."""
        trail = []
        cur = folder
        for _ in range(MAX_DEPTH):
            meta = self.folder_meta(user, cur)
            trail.append((cur, meta["name"]))
            if not meta["parent"]:
                return trail[::-1]
            cur = meta["parent"]
        raise DriveError("This folder is nested too deeply.")

    def listing(self, user: str, folder: str) -> list[Entry]:
        """The folder's children, folders first, then by name."""
        self.folder_meta(user, folder)
        row = _dir_row(user, folder)
        cols = [c for c in self.kv.cols(row) if c.startswith(b"e/")]

        def fetch(col: bytes) -> Entry | None:
            try:
                return Entry.decode(col[2:].decode("utf-8"), self.kv.get(row, col))
            except NotFound:  # removed since COLS
                return None

        # One GET per child: on a real cluster, several at once.
        found = self._pool.map(fetch, cols) if self._pool is not None and len(cols) > 1 else map(fetch, cols)
        out = [e for e in found if e is not None]
        out.sort(key=lambda e: (not e.is_folder, e.name.casefold(), e.name))
        return out

    def entry(self, user: str, folder: str, name: str) -> Entry:
        """One child by name, or ItemNotFound."""
        return self._entry_raw(user, folder, name)[1]

    def _entry_raw(self, user: str, folder: str, name: str) -> tuple[bytes, Entry]:
        if not isinstance(folder, str) or not _ID_RE.match(folder):
            raise ItemNotFound("That folder does not exist.")
        try:
            name = _name_key(name)
        except InvalidName:
            raise ItemNotFound("There is no item with that name here.") from None
        try:
            raw = self.kv.get(_dir_row(user, folder), _entry_col(name))
        except NotFound:
            raise ItemNotFound(f'There is no item named "{name}" here.') from None
        return raw, Entry.decode(name, raw)

    def _claim(self, user: str, folder: str, raw: bytes, e: Entry, opid: str) -> None:
        """Mark the entry as taken by operation `opid`, whose intent is written already.

        Claims are exclusive. The caller has checked with `_refuse_if_held`,
        on this same `raw`, that no operation holds the entry; the CPUT from
        `raw` then fails if anything claimed it since (a claim changes the
        value). Two claimers that read the same value take turns through the
        CPUT: one wins, the other sees the change. (The CPUT alone is not
        enough: a second operation that reads the entry after the first one's
        claim would CPUT from the marked value and go on too, and a move and
        a delete would both "succeed".) `opid` is unique per operation, so
        the new value always differs from every value read before.
        """
        d = json.loads(raw)
        d["op"] = opid
        try:
            self.kv.cput(_dir_row(user, folder), _entry_col(e.name), raw, _dumps(d))
        except (Mismatch, NotFound):
            raise ItemNotFound(f'"{e.name}" has just been changed or removed; reload and try again.') from None

    def _refuse_if_held(self, user: str, raw: bytes, e: Entry) -> None:
        """Busy if the entry carries the mark of an operation whose intent
        still exists (running, or abandoned and waiting for the sweeper); a
        mark whose intent is gone was left by a finished or failed operation
        and means nothing. Checked before anything is done: an upload's
        entry is visible (and marked) before the upload has settled, and
        deciding its state "live" for it made the upload's own clean-up,
        when its folder had just been deleted, leave the file live, unlisted
        and charged."""
        holder = json.loads(raw).get("op")
        if holder:
            intent = self._intent_of(user, holder)
            if intent is not None:
                raise Busy(f'"{e.name}" is being changed by another operation; try again in a moment.',
                           holder, intent)

    def _put_entry(self, user: str, folder: str, e: Entry, op: str | None = None) -> None:
        """PUTNX the entry (Exists if the name is taken), then make sure the
        folder was not deleted meanwhile (else its purge could miss the entry).
        A move writes the new entry claimed by itself (`op`): until the move
        is done nobody else may take it (a purge of the target waits)."""
        self.kv.putnx(_dir_row(user, folder), _entry_col(e.name), e.encode(op))
        try:
            self.folder_meta(user, folder)
        except ItemNotFound:
            self._remove_entry(user, folder, e.name, e.id)
            raise

    def mkdir(self, user: str, parent: str, name: str) -> Entry:
        """A new empty folder; NameTaken if the parent has an item of that name."""
        name = check_name(name)
        self.folder_meta(user, parent)
        did = new_id()
        now = self.clock()
        self.kv.put(_dir_row(user, did), b"meta",
                    _dumps({"name": name, "parent": parent, "state": "live", "created": now}))
        e = Entry(name=name, id=did, kind="folder", mtime=now)
        try:
            self._put_entry(user, parent, e)
        except Exists:
            self._delrow(_dir_row(user, did))
            raise NameTaken(f'An item named "{name}" already exists in this folder.') from None
        except ItemNotFound:
            self._delrow(_dir_row(user, did))
            raise
        return e

    def folders(self, user: str, limit: int = MAX_TREE_FOLDERS) -> list[tuple[str, str, int]]:
        """The first `limit` live folders as (id, name, depth), depth-first
        from the root (the folder picker; one listing per folder)."""
        root = self.root(user)
        out: list[tuple[str, str, int]] = []
        seen: set[str] = set()
        stack = [(root, "", 0)]
        while stack and len(out) < limit:
            fid, name, depth = stack.pop()
            if fid in seen:
                # Listed twice: a folder move cut short by a crash shows the
                # folder in both places until the sweeper finishes it, and
                # can make a loop meanwhile (the picker had 765 options).
                continue
            seen.add(fid)
            out.append((fid, name, depth))
            try:
                kids = [e for e in self.listing(user, fid) if e.is_folder]
            except ItemNotFound:
                continue
            if depth + 1 < MAX_DEPTH:
                stack.extend((e.id, e.name, depth + 1) for e in reversed(kids))
        return out

    # -- quota ----------------------------------------------------------------------

    def usage(self, user: str) -> Usage:
        _, used = self._read_used(user)
        return Usage(used["total"], self.quota_bytes)

    def _read_used(self, user: str) -> tuple[bytes | None, dict]:
        try:
            raw = self.kv.get(_user_row(user), b"used")
        except NotFound:
            return None, {"total": 0, "held": {}}
        return raw, json.loads(raw)

    def _update_used(self, user: str, change: Callable[[dict], bool]) -> None:
        """Apply `change` to the used cell atomically (CPUT, retried on a race).

        `change` edits the dict in place and returns False to leave it alone.
        """
        row = _user_row(user)
        for _ in range(1000):
            raw, used = self._read_used(user)
            if not change(used):
                return
            new = _dumps(used)
            try:
                if raw is None:
                    self.kv.putnx(row, b"used", new)
                else:
                    self.kv.cput(row, b"used", raw, new)
                return
            except (Exists, Mismatch, NotFound):
                continue
        raise DriveError("The drive is too busy right now; please try again.")

    def _hold(self, user: str, fid: str, size: int, charge: bool) -> None:
        """Put `fid` in held; `charge` also adds its bytes to the total (within quota)."""
        def change(used):
            if fid in used["held"]:
                return False
            if charge:
                if used["total"] + size > self.quota_bytes:
                    raise QuotaExceeded(no_space(size, self.quota_bytes - used["total"], self.quota_bytes))
                used["total"] += size
            used["held"][fid] = size
            return True
        self._update_used(user, change)

    def _settle(self, user: str, fid: str, live: bool) -> None:
        """Take `fid` out of held: its bytes stay counted iff the file is live."""
        def change(used):
            size = used["held"].pop(fid, None)
            if size is None:
                return False
            if not live:
                used["total"] = max(0, used["total"] - size)
            return True
        self._update_used(user, change)

    # -- the journal of intents ---------------------------------------------------------

    def _intent(self, user: str, opid: str, intent: dict) -> dict:
        intent = dict(intent, user=user, expires=self.clock() + self.lease_s)
        self.kv.put(_journal_row(opid), f"{user}/{opid}".encode(), _dumps(intent))
        return intent

    def _intent_of(self, user: str, opid: str) -> dict | None:
        """The intent of operation `opid`, if it has one (running or abandoned)."""
        try:
            return json.loads(self.kv.get(_journal_row(opid), f"{user}/{opid}".encode()))
        except NotFound:
            return None
        except ValueError:
            return {"op": "?", "expires": 0}

    def _recover(self, user: str, opid: str, intent: dict) -> None:
        """Finish or undo an abandoned operation, then forget its intent."""
        handler = getattr(self, "_recover_" + str(intent.get("op")), None)
        if handler is None:
            log.warning("dropping drive intent with unknown op %r", intent.get("op"))
        else:
            handler(user, intent)
        self._done(user, opid)

    def _done(self, user: str, opid: str) -> None:
        try:
            self.kv.delete(_journal_row(opid), f"{user}/{opid}".encode())
        except NotFound:
            pass

    def sweep(self, now: float | None = None) -> int:
        """Finish or undo every intent whose lease has expired; returns how many.

        Safe to run from several frontends at once and at any time: every
        step is idempotent and the file state cell decides races.
        """
        now = self.clock() if now is None else now
        done = 0
        for k in range(JOURNAL_SHARDS):
            row = f"drive/j/{k}".encode()
            for col in self.kv.cols(row):
                try:
                    raw = self.kv.get(row, col)
                    intent = json.loads(raw)
                except NotFound:
                    continue
                except ValueError:
                    log.warning("dropping unreadable drive intent %r", col)
                    self.kv.delete(row, col)
                    continue
                if intent.get("expires", 0) > now:
                    continue
                user, opid = col.decode().split("/", 1)
                try:
                    self._recover(user, opid, intent)
                    done += 1
                except (_Unfinished, Busy) as e:
                    log.info("drive sweep: intent %s of %s waits for another operation (%s)", opid, user, e)
                except Exception:
                    log.exception("drive sweep: intent %s of %s failed; will retry", opid, user)
        if done:
            log.info("drive sweep: settled %d abandoned operation(s)", done)
        return done

    # -- file state ------------------------------------------------------------------

    def _state(self, user: str, fid: str) -> str | None:
        try:
            return self.kv.get(_file_row(user, fid), b"state").decode()
        except NotFound:
            return None

    def _decide(self, user: str, fid: str, state: str) -> str:
        """Set the file's state if it has none yet; returns the state that won."""
        try:
            self.kv.putnx(_file_row(user, fid), b"state", state.encode())
            return state
        except Exists:
            return self._state(user, fid) or state

    def _ensure_live(self, user: str, e: Entry) -> None:
        """A visible file is committed: settle its state if its upload's owner crashed.

        Only entries from before claims existed can still be unsettled here: an
        upload's entry carries its claim until it has settled, and callers run
        `_refuse_if_held` first, which answers 409 for such an entry."""
        if e.kind != "file":
            return
        st = self._state(user, e.id)
        if st is None:
            st = self._decide(user, e.id, "live")
        if st != "live":
            raise ItemNotFound(f'"{e.name}" has been deleted.')

    # -- upload --------------------------------------------------------------------------

    def upload(self, user: str, folder: str, name: str, data: bytes | Iterable[bytes],
               mtime: float | None = None) -> Entry:
        """Store a whole file (bytes or an iterable of byte strings); returns its entry."""
        up = self.start_upload(user, folder, name)
        try:
            if isinstance(data, (bytes, bytearray, memoryview)):
                up.write(data)
            else:
                for piece in data:
                    up.write(piece)
            return up.commit(mtime)
        except BaseException:
            up.abort()
            raise

    def check_fits(self, user: str, body_bytes: int, overhead: int = FORM_OVERHEAD) -> None:
        """QuotaExceeded now, before any byte is read, if an upload whose
        request body is `body_bytes` (files plus up to `overhead` of form
        framing) can never fit in what is free. The real charge is made
        chunk by chunk as the bytes arrive; this only spares a client the
        upload of something that is refused in the end."""
        free = self.quota_bytes - self.usage(user).used
        if body_bytes - overhead > free:
            raise QuotaExceeded(no_space(body_bytes, free, self.quota_bytes, about=True)
                                + " Nothing was uploaded: choose fewer or smaller files.")

    def start_upload(self, user: str, folder: str, name: str) -> "Upload":
        """Begin a streaming upload into `folder`; write() then commit() (or abort()).

        The name is checked now, so a bad name fails before any byte is stored.
        """
        name = check_name(name)
        self.folder_meta(user, folder)
        return Upload(self, user, folder, name)

    def _recover_upload(self, user: str, intent: dict) -> None:
        fid = intent["fid"]
        st = self._state(user, fid)
        if st is None:
            # The owner died before settling. Committed iff its entry is visible
            # in the folder it was going to (nothing can move or delete it while
            # unsettled: its entry carries the upload's claim, so rename, move
            # and delete answer 409 until this sweep).
            visible = False
            try:
                row = _dir_row(user, intent["folder"])
                for col in self.kv.cols(row):
                    if col.startswith(b"e/"):
                        try:
                            if json.loads(self.kv.get(row, col)).get("id") == fid:
                                visible = True
                                break
                        except NotFound:
                            pass
            except NotFound:
                pass
            st = self._decide(user, fid, "live" if visible else "dead")
        self._settle(user, fid, live=(st == "live"))
        if st != "live":
            self._drop_chunks(user, fid, None, hint=int(intent.get("n", 0)))
            self._tomb(user, fid)

    def _tomb(self, user: str, fid: str) -> None:
        """Keep a dead file's state cell for a while, then delete it.

        The "dead" cell is what makes a late owner (a slow upload's commit, a
        rename that read the entry before the delete) fail instead of reviving
        the file; after TOMB_LEASES leases nobody can still be that late.
        """
        intent = {"op": "tomb", "fid": fid, "user": user, "expires": self.clock() + TOMB_LEASES * self.lease_s}
        opid = "tb-" + fid
        self.kv.put(_journal_row(opid), f"{user}/{opid}".encode(), _dumps(intent))

    def _recover_tomb(self, user: str, intent: dict) -> None:
        if self._state(user, intent["fid"]) in ("dead", None):
            self._delrow(_file_row(user, intent["fid"]))

    # -- download -------------------------------------------------------------------------

    def read(self, user: str, e: Entry, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes start..end (inclusive) of a file, chunk by chunk.

        Chunks are fetched WINDOW ahead in parallel; memory is bounded by
        WINDOW + 1 chunks (WINDOW in flight and the one being handed out)
        whatever the file size.
        """
        if e.kind != "file":
            raise ItemNotFound("That is a folder, not a file.")
        if end is None:
            end = e.size - 1
        if e.size == 0 or end < start:
            return iter(())
        return self._read(user, e, start, end)

    def _read(self, user: str, e: Entry, start: int, end: int) -> Iterator[bytes]:
        cb = e.cb
        first, last = start // cb, end // cb

        def fetch(n: int) -> bytes:
            try:
                return self.kv.get(_chunk_row(user, e.id, n), _CHUNK)
            except NotFound:
                if self._state(user, e.id) == "dead":   # deleted since the read began: not damage
                    raise ItemNotFound(f'"{e.name}" was deleted while it was being read.') from None
                raise Damaged(f'"{e.name}" is damaged: part of it is missing.') from None

        pending: deque = deque()
        nxt = first
        try:
            while nxt <= last or pending:
                while nxt <= last and len(pending) < self.window:
                    pending.append((nxt, self._submit(fetch, nxt)))
                    nxt += 1
                n, fut = pending.popleft()
                data = fut.result() if isinstance(fut, Future) else fut
                lo = start - n * cb if n == first else 0
                hi = end - n * cb + 1 if n == last else len(data)
                if hi > len(data):
                    raise Damaged(f'"{e.name}" is damaged: a part of it is short.')
                yield data if (lo == 0 and hi == len(data)) else memoryview(data)[lo:hi]
        finally:
            for _, fut in pending:
                if isinstance(fut, Future):
                    fut.cancel()

    def _submit(self, fn, *args):
        if self._pool is None:
            return fn(*args)
        return self._pool.submit(fn, *args)

    # -- delete ----------------------------------------------------------------------------

    def delete(self, user: str, folder: str, name: str, expect_id: str | None = None) -> Entry:
        """Delete a file, or a folder with everything in it. Returns what was deleted."""
        raw, e = self._entry_raw(user, folder, name)
        if expect_id is not None and e.id != expect_id:
            raise ItemNotFound(f'"{name}" has changed since the page was shown; reload and try again.')
        try:
            self._delete_entry(user, folder, raw, e)
        except _Unfinished as why:
            # The item is gone from its folder; part of its contents waits for
            # another operation, and the sweeper finishes the purge later.
            log.info("delete of %s's folder %s continues in the background: %s", user, e.id, why)
        return e

    def _delete_entry(self, user: str, folder: str, raw: bytes, e: Entry) -> None:
        """Write the intent, claim the entry, then delete the file or folder."""
        self._refuse_if_held(user, raw, e)      # before the state or an intent is touched
        alive = True
        if e.is_folder:
            opid = "rd-" + new_id()
            intent = self._intent(user, opid, {"op": "rmdir", "did": e.id, "parent": folder, "name": e.name})
        else:
            try:
                self._ensure_live(user, e)      # before the intent: its recovery reads the state
            except ItemNotFound:
                alive = False                   # dead already (a deletion cut short): finish it
            opid = "rm-" + new_id()
            intent = self._intent(user, opid, {"op": "rmfile", "fid": e.id, "folder": folder,
                                               "name": e.name, "size": e.size, "cb": e.cb})
        try:
            self._claim(user, folder, raw, e, opid)
        except DriveError:
            self._done(user, opid)
            raise
        if e.is_folder:
            self._rmdir(user, e, opid, intent)
        else:
            self._delete_file(user, e, opid, intent, alive)

    def _delete_file(self, user: str, e: Entry, opid: str, intent: dict, alive: bool) -> None:
        if alive:   # a dead file's bytes were refunded by whoever killed it: never twice
            self._hold(user, e.id, e.size, charge=False)
            try:
                self.kv.cput(_file_row(user, e.id), b"state", b"live", b"dead")
            except (Mismatch, NotFound):
                pass  # killed meanwhile (a sweeper): finishing twice is harmless
        self._recover_rmfile(user, intent)
        self._done(user, opid)

    def _recover_rmfile(self, user: str, intent: dict) -> None:
        fid = intent["fid"]
        st = self._state(user, fid)
        if st == "live":  # the owner died before the point of no return: nothing happened
            self._settle(user, fid, live=True)
            return
        self._remove_entry(user, intent["folder"], intent["name"], fid)
        self._settle(user, fid, live=False)
        self._drop_chunks(user, fid, -(-int(intent["size"]) // max(1, int(intent["cb"]))) if intent["cb"] else 0)
        self._tomb(user, fid)

    def _rmdir(self, user: str, e: Entry, opid: str, intent: dict) -> None:
        try:
            raw, meta = self._meta(user, e.id)
        except ItemNotFound:  # half deleted already: finish the job
            raw, meta = b"", {"state": "dead"}
        if meta.get("state") == "live":
            try:
                self.kv.cput(_dir_row(user, e.id), b"meta", raw, _dumps(dict(meta, state="dead")))
            except (Mismatch, NotFound):  # renamed or moved meanwhile: just retry the whole thing
                self._done(user, opid)
                raise DriveError("The folder changed while it was being deleted; please try again.") from None
        self._recover_rmdir(user, intent, opid)
        self._done(user, opid)

    def _recover_rmdir(self, user: str, intent: dict, opid: str | None = None) -> None:
        did = intent["did"]
        try:
            _, meta = self._meta(user, did)
        except ItemNotFound:
            meta = {"state": "dead"}
        if meta.get("state") == "live":
            return  # never marked: the deletion did not start
        self._remove_entry(user, intent["parent"], intent["name"], did)
        row = _dir_row(user, did)
        renewed = self.clock()
        for col in self.kv.cols(row):
            if not col.startswith(b"e/"):
                continue
            self._purge_child(user, did, col)
            if opid and self.clock() - renewed > self.lease_s / 4:
                self._intent(user, opid, intent)
                renewed = self.clock()
        self._delrow(row)

    def _purge_child(self, user: str, folder: str, col: bytes) -> None:
        """Delete one child of a folder being purged.

        A child that another operation holds is waited for: a move out of
        this folder takes it away, a move into it that is still running
        either takes it back or leaves it here, to be deleted now. An
        abandoned operation (its lease is over) is finished here, as the
        sweeper would. If the holder takes longer than CLAIM_WAIT_S, the
        purge stops (_Unfinished) and its intent stays for a later sweep;
        skipping the child instead would leak it (a move that landed here
        just before the folder died would leave a live file in a deleted row).
        """
        row = _dir_row(user, folder)
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            try:
                raw = self.kv.get(row, col)
            except NotFound:
                return  # moved out or deleted meanwhile
            try:
                self._delete_entry(user, folder, raw, Entry.decode(col[2:].decode("utf-8"), raw))
                return
            except Busy as busy:
                if busy.holder and busy.intent.get("expires", 0) <= self.clock():
                    self._recover(user, busy.holder, busy.intent)
                    continue
                wait = busy
            except DriveError:
                # Changed between our read and our claim (another operation
                # claimed it), or a subfolder changed while we marked it:
                # read it again. That operation may yet fail (a move to a
                # taken name) and leave the entry here, and skipping it then
                # leaked the file with the folder's row.
                wait = None
            if time.monotonic() > deadline:
                raise _Unfinished(str(wait or "an entry kept changing")) from None
            time.sleep(0.02)

    def _remove_entry(self, user: str, folder: str, name: str, item_id: str) -> None:
        """Delete folder/e/<name> if it still names `item_id` (rename is refused while deleting)."""
        row, col = _dir_row(user, folder), _entry_col(name)
        try:
            if json.loads(self.kv.get(row, col)).get("id") == item_id:
                self.kv.delete(row, col)
        except NotFound:
            pass

    def _drop_chunks(self, user: str, fid: str, count: int | None, hint: int = 0) -> None:
        """Delete the chunks of a file: `count` of them, or (unknown count, an
        abandoned upload) every one from 0 until more than WINDOW in a row are
        missing past `hint` (the upload had at most WINDOW in flight, so a gap
        it left is shorter)."""
        n, misses = 0, 0
        while True:
            if count is not None and n >= count:
                return
            try:
                self.kv.delrow(_chunk_row(user, fid, n))
                misses = 0
            except NotFound:
                misses += 1
                if count is None and n >= hint and misses > self.window:
                    return
            n += 1

    def _delrow(self, row: bytes) -> None:
        try:
            self.kv.delrow(row)
        except NotFound:
            pass

    # -- rename and move -----------------------------------------------------------------

    def rename(self, user: str, folder: str, name: str, new_name: str, expect_id: str | None = None) -> Entry:
        return self.move(user, folder, name, folder, new_name, expect_id)

    def move(self, user: str, folder: str, name: str, dest: str, new_name: str | None = None,
             expect_id: str | None = None) -> Entry:
        """Move (and/or rename) an item; returns its new entry.

        NameTaken if `dest` already has an item of that name; MoveRefused for
        a folder moved into itself or its own subtree.
        """
        # Moving keeps the name it has; only a new name must pass today's rules.
        new_name = check_name(new_name) if new_name is not None else _name_key(name)
        raw, e = self._entry_raw(user, folder, name)
        if expect_id is not None and e.id != expect_id:
            raise ItemNotFound(f'"{name}" has changed since the page was shown; reload and try again.')
        if dest == folder and new_name == e.name:
            return e
        self.folder_meta(user, dest)
        if e.is_folder:
            self.folder_meta(user, e.id)  # not while it is being deleted
        if e.is_folder and dest != folder:
            # Two folder moves at once could each pass the check below and
            # make a cycle (A into B, B into A): such moves take turns.
            with self._tree_lock(user):
                trail = [fid for fid, _ in self.breadcrumbs(user, dest)]
                if e.id in trail:
                    raise MoveRefused(f'Cannot move "{e.name}" into itself or one of its own subfolders.')
                return self._move(user, folder, raw, e, dest, new_name)
        return self._move(user, folder, raw, e, dest, new_name)

    @contextmanager
    def _tree_lock(self, user: str):
        """A per-user lock cell with a lease (PUTNX to take, CPUT to take over an expired one)."""
        row, col = _user_row(user), b"treelock"
        mine = _dumps({"token": new_id(), "expires": self.clock() + TREE_LOCK_S})
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                self.kv.putnx(row, col, mine)
                break
            except Exists:
                pass
            try:
                raw = self.kv.get(row, col)
                if json.loads(raw).get("expires", 0) < self.clock():
                    self.kv.cput(row, col, raw, mine)
                    break
            except (NotFound, Mismatch):
                continue
            if time.monotonic() > deadline:
                raise Busy("Another folder move is in progress in your drive; please try again.")
            time.sleep(0.01)
        try:
            yield
        finally:
            try:
                if self.kv.get(row, col) == mine:
                    self.kv.delete(row, col)
            except NotFound:
                pass

    def _move(self, user: str, folder: str, raw: bytes, e: Entry, dest: str, new_name: str) -> Entry:
        self._refuse_if_held(user, raw, e)
        self._ensure_live(user, e)
        opid = "mv-" + new_id()
        intent = self._intent(user, opid, {"op": "move", "id": e.id, "kind": e.kind, "src": folder,
                                           "name": e.name, "dst": dest, "new": new_name})
        try:
            self._claim(user, folder, raw, e, opid)
        except DriveError:
            self._done(user, opid)
            raise
        moved = Entry(new_name, e.id, e.kind, e.size, e.mtime, e.type, e.cb)
        try:
            self._put_entry(user, dest, moved, op=opid)
        except Exists:
            self._done(user, opid)
            raise NameTaken(f'An item named "{new_name}" already exists there.') from None
        except ItemNotFound:
            self._done(user, opid)
            raise
        if self._intent_of(user, opid) is None:
            # This frontend stood still past the intent's lease (a paused
            # VM): the sweeper has settled the move as not done, and the
            # item may since have been deleted. The entry just written would
            # be a ghost (a deleted file listed again): take it back.
            self._remove_entry(user, dest, new_name, e.id)
            raise Busy(f'"{e.name}" was not moved: the move took too long and was cancelled.')
        try:
            self._finish_move(user, intent)
        except MoveRefused:
            self._done(user, opid)
            raise
        self._done(user, opid)
        return moved

    def _in_a_cycle(self, user: str, folder: str) -> bool:
        """Does following `parent` up from `folder` come back round instead
        of reaching the root? (A deleted ancestor ends the walk: no cycle.)"""
        seen = set()
        cur = folder
        while cur and cur not in seen and len(seen) < MAX_DEPTH:
            seen.add(cur)
            try:
                _, meta = self._meta(user, cur)
            except ItemNotFound:
                return False
            cur = meta.get("parent")
        return bool(cur)

    def _recover_move(self, user: str, intent: dict) -> None:
        """The sweeper's half of a move whose frontend died. A folder moved
        to another folder is finished under the tree lock, after the cycle
        check again: while it hung, the folder was listed in both places, so
        the user may have moved the target into it meanwhile (the check of
        that move saw the folder's old parent). Finishing it then would
        close a cycle that no path from the root reaches; it is undone
        instead, and the folder stays where it was."""
        if intent["kind"] == "folder" and intent["src"] != intent["dst"]:
            with self._tree_lock(user):
                try:
                    trail = [fid for fid, _ in self.breadcrumbs(user, intent["dst"])]
                except ItemNotFound:
                    trail = [intent["id"]]      # the target is being deleted: undo too
                if intent["id"] in trail:
                    self._undo_folder_move(user, intent)
                    return
                try:
                    self._finish_move(user, intent)
                except MoveRefused:
                    pass                        # a cycle after all: _finish_move took it back
            return
        self._finish_move(user, intent)

    def _undo_folder_move(self, user: str, intent: dict) -> None:
        """Take back a hung folder move: its new entry goes, and if the move
        had already given the folder its new parent, the old one comes back
        (else the folder stayed listed where it was but could not be opened:
        its parent named a folder since deleted)."""
        item, dst, new = intent["id"], intent["dst"], intent["new"]
        self._remove_entry(user, dst, new, item)
        self._place_folder(user, item, intent["src"], intent["name"], when=lambda meta: meta.get("parent") == dst)

    def _place_folder(self, user: str, folder: str, parent: str, name: str, when) -> None:
        """Give a folder's `meta` this parent and name while `when(meta)`
        holds (CPUT, read again after a race); nothing if the folder is gone."""
        for _ in range(100):
            try:
                raw, meta = self._meta(user, folder)
            except ItemNotFound:
                return
            if not when(meta):
                return
            try:
                self.kv.cput(_dir_row(user, folder), b"meta", raw, _dumps(dict(meta, parent=parent, name=name)))
                return
            except (Mismatch, NotFound):
                continue

    def _finish_move(self, user: str, intent: dict) -> None:
        item, dst, new = intent["id"], intent["dst"], intent["new"]
        try:
            landed = json.loads(self.kv.get(_dir_row(user, dst), _entry_col(new))).get("id") == item
        except NotFound:
            landed = False
        if not landed:
            return  # the move never happened
        if intent["kind"] == "folder":
            self._place_folder(user, item, dst, new,
                               when=lambda meta: (meta.get("parent"), meta.get("name")) != (dst, new))
            if intent["src"] != dst and self._in_a_cycle(user, item):
                # The tree lock is a lease: a move whose process stood still
                # longer than TREE_LOCK_S after its cycle check (a paused VM)
                # writes after another move that its check did not see, and
                # the two folders become each other's parents, unreachable.
                # Whichever of the two writes its parent second sees the
                # cycle here, and takes its move back (the old entry is
                # still in place).
                self._undo_folder_move(user, intent)
                raise MoveRefused(f'"{intent["name"]}" was not moved: another move put the target inside '
                                  f'it meanwhile.')
        self._remove_entry(user, intent["src"], intent["name"], item)


class Upload:
    """One file being stored: write() chunks out as they fill, commit() makes it visible.

    Memory: one chunk being filled plus WINDOW chunks in flight.
    """

    def __init__(self, drive: Drive, user: str, folder: str, name: str):
        self.drive = drive
        self.kv = drive.kv
        self.user = user
        self.folder = folder
        self.name = name
        self.fid = new_id()
        self.size = 0
        self.cb = drive.chunk_bytes
        self._buf = bytearray()
        self._n = 0                      # chunks handed to the writers
        self._inflight: deque = deque()
        self._done = False
        self._opid = "up-" + self.fid
        self._intent = drive._intent(user, self._opid, {"op": "upload", "fid": self.fid,
                                                        "folder": folder, "n": 0})
        self._renewed = drive.clock()
        self._free = drive.quota_bytes - drive.usage(user).used

    def write(self, data: bytes) -> None:
        if self._done:
            raise DriveError("This upload is finished.")
        if not data:
            return
        self.size += len(data)
        if self.size > self._free:
            raise QuotaExceeded(no_space(self.size, self._free, self.drive.quota_bytes, at_least=True))
        self._renew()
        buf = self._buf
        if not buf and len(data) == self.cb:
            self._flush(bytes(data))
            return
        buf += data
        cb = self.cb
        if len(buf) >= cb:
            view = memoryview(buf)
            full = len(buf) // cb * cb
            for off in range(0, full, cb):
                self._flush(bytes(view[off:off + cb]))
            view.release()
            del buf[:full]

    def _flush(self, chunk: bytes) -> None:
        """Hand one chunk to the writers, waiting if WINDOW are already in flight."""
        while len(self._inflight) >= self.drive.window:
            self._wait_one()
        n = self._n
        self._n += 1
        row = _chunk_row(self.user, self.fid, n)
        self._inflight.append(self.drive._submit(self.kv.put, row, _CHUNK, chunk))

    def _renew(self) -> None:
        """Extend the lease now and then while bytes keep coming, however slowly."""
        now = self.drive.clock()
        if now - self._renewed > self.drive.lease_s / 4:
            self._intent = self.drive._intent(self.user, self._opid, dict(self._intent, n=self._n))
            self._renewed = now

    def _wait_one(self) -> None:
        fut = self._inflight.popleft()
        if isinstance(fut, Future):
            fut.result()

    def commit(self, mtime: float | None = None) -> Entry:
        """Make the file visible: its chunks are all durable first. Returns its entry.

        A taken name gets " (2)", " (3)"... appended (the upload keeps both).
        """
        if self._done:
            raise DriveError("This upload is finished.")
        if self._buf:
            self._flush(bytes(self._buf))
            self._buf = bytearray()
        while self._inflight:
            self._wait_one()
        d, user, fid = self.drive, self.user, self.fid
        try:
            d.folder_meta(user, self.folder)
            d._hold(user, fid, self.size, charge=True)
            now = d.clock()
            e = None
            for k in range(1, MAX_DUPLICATE_SUFFIX + 1):
                cand = Entry(numbered(self.name, k), fid, "file", self.size,
                             mtime if mtime is not None else now, content_type(self.name), self.cb)
                try:
                    # Claimed by the upload until it has settled: a delete
                    # from another tab in between used the upload's hold as
                    # its own, and the bytes stayed charged for ever.
                    d._put_entry(user, self.folder, cand, op=self._opid)
                    e = cand
                    break
                except Exists:
                    continue
            if e is None:
                raise NameTaken(f'Too many items named like "{self.name}" in this folder.')
        except BaseException:
            self.abort()  # nothing is visible: settle "dead", refund, drop the chunks
            raise
        if d._decide(user, fid, "live") != "live":
            # We were so slow that a sweeper gave the upload up (and settled
            # the state "dead"): undo what we did since, chunks included.
            d._remove_entry(user, self.folder, e.name, fid)
            d._settle(user, fid, live=False)
            d._drop_chunks(user, fid, self._n)
            self._done = True
            raise DriveError("The upload took too long and was cancelled; please try again.")
        d._settle(user, fid, live=True)
        d._done(user, self._opid)
        self._done = True
        return e

    def abort(self) -> None:
        """Give the upload up: delete what was written (best effort; the sweeper does the rest)."""
        if self._done:
            return
        self._done = True
        try:
            while self._inflight:
                try:
                    self._wait_one()
                except Exception:
                    pass
            if self.drive._decide(self.user, self.fid, "dead") == "dead":
                self.drive._settle(self.user, self.fid, live=False)
                self.drive._drop_chunks(self.user, self.fid, self._n)
                self.drive._tomb(self.user, self.fid)
            self.drive._done(self.user, self._opid)
        except Exception:
            log.warning("could not clean up an aborted upload now; the sweeper will", exc_info=True)


def no_space(need: int, free: int, quota: int, about: bool = False, at_least: bool = False) -> str:
    """The one wording of a quota refusal: what is needed (`about` it, for
    a whole request's body; `at_least`, for a file refused part-way) and
    what is free; in bytes when the two would read the same rounded."""
    free = max(0, free)
    shown = human_size if human_size(need) != human_size(free) else (lambda n: f"{n:,} bytes")
    need_text = ("about " if about else "at least " if at_least else "") + shown(need)
    return f"Not enough space: {need_text} needed, {shown(free)} free of your {human_size(quota)}."


def human_size(n: int) -> str:
    """1536 -> "1.5 KiB", 1024 -> "1 KiB", 1 -> "1 byte": sizes as people read
    them, in binary units (the mail's "25 MiB" limit is 25 MiB). The drive's
    and the mail's pages both use this one, so a file's size reads the same
    on both."""
    if n < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if round(size, 1) < 1024:      # (rounded first: 1 MiB - 1 byte is "1 MiB", not "1024 KiB")
            break
        size /= 1024
    else:
        unit = "TiB"
    return f"{size:.1f}".removesuffix(".0") + f" {unit}"
