"""The key-value store as the rest of PennCloud sees it.

Everything above the storage layer (accounts, drive, mail, admin console)
talks to the store through the `KV` interface below and nothing else, so it
can be tested against `MemoryKV` (an in-process fake with the same semantics)
and run against the real cluster client unchanged.

Data model (see ../PROTOCOL.md): row -> column -> value, all bytes. Names are
1..4096 bytes. `str` names are accepted and UTF-8 encoded for convenience;
values must be bytes.

Errors are one family rooted at `KVError`, one class per protocol error code,
so callers write `except NotFound:` rather than comparing strings.
"""

from __future__ import annotations

import threading
import zlib
from typing import Protocol

MAX_NAME_BYTES = 4096


class KVError(Exception):
    """A request the store refused. `code` is the protocol's error word."""

    code = "INTERNAL"

    def __init__(self, text: str = ""):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


class NotFound(KVError):
    code = "NOTFOUND"


class Mismatch(KVError):
    code = "MISMATCH"


class Exists(KVError):
    code = "EXISTS"


class Moved(KVError):
    """Not the primary of that row's tablet; `addr` is the one to ask."""

    code = "MOVED"

    def __init__(self, tablet: int, addr: str):
        super().__init__(f"{tablet} {addr}")
        self.tablet = tablet
        self.addr = addr


class Retry(KVError):
    """Temporarily unable; the write was NOT applied."""

    code = "RETRY"


class BadRequest(KVError):
    code = "BADREQ"


class TooBig(KVError):
    code = "TOOBIG"


class Denied(KVError):
    code = "DENIED"


class Internal(KVError):
    code = "INTERNAL"


class Unavailable(KVError):
    """Client side: no server could be reached before the deadline."""

    code = "RETRY"


ERRORS_BY_CODE: dict[str, type[KVError]] = {
    c.code: c for c in (NotFound, Mismatch, Exists, Moved, Retry, BadRequest, TooBig, Denied, Internal)
}


def error_from_reply(code: str, text: str) -> KVError:
    """Build the exception for a `-ERR CODE text` reply."""
    if code == "MOVED":
        parts = text.split()
        if len(parts) == 2 and parts[0].isdigit():
            return Moved(int(parts[0]), parts[1])
        return Internal(f"malformed MOVED reply: {text!r}")
    cls = ERRORS_BY_CODE.get(code, Internal)
    return cls(text if cls is not Internal or code == "INTERNAL" else f"{code} {text}")


def tablet_of(row: bytes, tablets: int) -> int:
    """The tablet that holds `row` in a cluster of `tablets` tablets."""
    return zlib.crc32(row) % tablets


def name_bytes(name: bytes | str) -> bytes:
    """Normalise a row or column name to bytes and check its length."""
    b = name.encode() if isinstance(name, str) else bytes(name)
    if not 1 <= len(b) <= MAX_NAME_BYTES:
        raise BadRequest(f"name must be 1 to {MAX_NAME_BYTES} bytes, got {len(b)}")
    return b


class KV(Protocol):
    """What the web apps and mail servers may ask of the store.

    Every method is atomic on its row and, against the real cluster,
    durable on return and linearizable, except in the resend cases that
    src/kvclient.py lists: after an unknown outcome, a resent PUTNX or CPUT
    can report success wrongly when its value is not unique to the call.
    """

    def get(self, row: bytes | str, col: bytes | str) -> bytes:
        """The cell's value; NotFound if absent."""

    def put(self, row: bytes | str, col: bytes | str, value: bytes) -> None:
        """Set the cell."""

    def putnx(self, row: bytes | str, col: bytes | str, value: bytes) -> None:
        """Create the cell; Exists if it is already there."""

    def cput(self, row: bytes | str, col: bytes | str, old: bytes, new: bytes) -> None:
        """Set to `new` only if it holds exactly `old`; Mismatch / NotFound otherwise."""

    def delete(self, row: bytes | str, col: bytes | str) -> None:
        """Remove the cell; NotFound if absent."""

    def cols(self, row: bytes | str) -> list[bytes]:
        """The row's column names, sorted bytewise ([] for an absent row)."""

    def get_many(self, row: bytes | str, cols: list[bytes | str]) -> dict[bytes, bytes]:
        """The values of those columns of one row that exist, each read as
        by `get` (one cell at a time, not a snapshot of the row), but
        without a round trip per cell."""

    def delrow(self, row: bytes | str) -> None:
        """Remove every column of the row at once; NotFound if it has none."""


class MemoryKV:
    """An in-process `KV` with the store's semantics, for unit tests."""

    def __init__(self, max_cell_bytes: int = 64 * 1024 * 1024):
        self._rows: dict[bytes, dict[bytes, bytes]] = {}
        self._lock = threading.Lock()
        self.max_cell_bytes = max_cell_bytes

    def _value(self, v: bytes) -> bytes:
        if not isinstance(v, (bytes, bytearray, memoryview)):
            raise TypeError("values must be bytes")
        if len(v) > self.max_cell_bytes:
            raise TooBig(f"value of {len(v)} bytes is over the {self.max_cell_bytes}-byte cell limit")
        return bytes(v)

    def get(self, row, col):
        row, col = name_bytes(row), name_bytes(col)
        with self._lock:
            try:
                return self._rows[row][col]
            except KeyError:
                raise NotFound() from None

    def put(self, row, col, value):
        row, col, value = name_bytes(row), name_bytes(col), self._value(value)
        with self._lock:
            self._rows.setdefault(row, {})[col] = value

    def putnx(self, row, col, value):
        row, col, value = name_bytes(row), name_bytes(col), self._value(value)
        with self._lock:
            cells = self._rows.setdefault(row, {})
            if col in cells:
                raise Exists()
            cells[col] = value

    def cput(self, row, col, old, new):
        row, col, old, new = name_bytes(row), name_bytes(col), self._value(old), self._value(new)
        with self._lock:
            cells = self._rows.get(row, {})
            if col not in cells:
                raise NotFound()
            if cells[col] != old:
                raise Mismatch()
            cells[col] = new

    def delete(self, row, col):
        row, col = name_bytes(row), name_bytes(col)
        with self._lock:
            cells = self._rows.get(row)
            if not cells or col not in cells:
                raise NotFound()
            del cells[col]
            if not cells:
                del self._rows[row]

    def cols(self, row):
        row = name_bytes(row)
        with self._lock:
            return sorted(self._rows.get(row, {}))

    def delrow(self, row):
        row = name_bytes(row)
        with self._lock:
            if not self._rows.pop(row, None):
                raise NotFound()

    def get_many(self, row, cols):
        return get_each(self, row, cols)


def get_each(kv: KV, row, cols) -> dict[bytes, bytes]:
    """get_many done with `kv.get`, one cell after another."""
    out = {}
    for col in cols:
        try:
            out[name_bytes(col)] = kv.get(row, col)
        except NotFound:
            pass
    return out
