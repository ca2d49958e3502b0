"""The tablet server: the KV protocol (PROTOCOL.md) in front of a `Store`.

    server = KVServer(node_id, host, port, data_dir, storage_cfg, tablets,
                      secret="", role=None, writer=None, tablet_ids=None)
    server.start()        recover the store, then listen (server.port)
    server.stop()         stop listening, flush and close the store

One thread per connection (src/server.TCPServer). Each connection feeds what
it receives to a `RequestParser` (src/kvproto) and answers every event in
order; replies to pipelined requests are sent together. Commands are found in
a dispatch table of `cmd_<VERB>` methods.

Seams for the cluster layer (helper E), both passed to the constructor:

- `role` answers, for a data command, whether this server may serve the
  row's tablet: `role.check(tablet_id)` returns nothing, or raises
  `src.kv.Moved(tablet, addr)` / `src.kv.Retry(text)`. `role.role_of(tid)`
  names the role for STATUS/TABLETS ("primary", "secondary", "recovering").
  `role.on_kill()` / `role.on_wake(store)` are called by KILL / WAKE (stop
  heartbeats, rejoin). `StandaloneRole`: primary of everything, no-ops.
- `writer.write(tablet, effect)` makes an effect durable and visible; it is
  called with the row's lock held, after the server has checked the
  command's condition (CPUT's old value, PUTNX's absence, DELETE's and
  DELROW's existence) against the current state. `LocalWriter` is
  `tablet.write(effect)`; a replicating writer does `tablet.submit`, sends
  the record to the secondaries, `tablet.wait_durable`, waits for their
  acks, then `tablet.apply`.

- `internal_commands` ({name: (CommandSpec, handler(conn, *args))}) adds
  the cluster's own commands (replication, catch-up); like admin commands
  they need AUTH when a secret is set.

A refused write logs nothing. A write dropped by KILL before it reached the
disk answers `-ERR RETRY` (it was not applied). A write whose log failed
with an I/O error while it was in flight (`WriteOutcomeUnknown`) may or may
not be on disk: the connection is closed without a reply, as for
`DropConnection`, and the tablet takes no more writes until a restart.

KILL drops the store as a crash would (`Store.crash`), closes every other
connection, and answers data commands `-ERR RETRY killed` until WAKE, which
recovers a new store from disk exactly as a restart does.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading

from src.config import StorageConfig
from src.kv import BadRequest, Denied, Exists, Internal, KVError, Mismatch, NotFound, Retry, tablet_of
from src.kvproto import (
    ADMIN_COMMANDS, DATA_COMMANDS, NEED_DATA, KVProtocolError, ProtocolErrorEvent, Request,
    RequestParser, decode_name, encode_name, error, error_for, listing, name_listing, ok, pong, value_parts,
)
from src.server import TCPServer

from kvserver.checkpoint import CorruptCheckpoint
from kvserver.store import Store
from kvserver.tablet import Tablet, TabletError, WriteOutcomeUnknown
from kvserver.wal import DEL, DELROW, SET, Effect, LogRecord

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
JOIN_REPLIES_UNDER = 64 * 1024     # smaller reply batches are joined into one send
HOLD_REPLIES_BYTES = 256 * 1024    # replies to pipelined requests are sent once this many wait
MAX_ROWS_LIMIT = 10000             # ROWS's <limit>
BIG_REQUEST_BYTES = 4 * 1024 * 1024    # a request buffering more than this needs a big-request slot
BIG_REQUEST_WAIT_S = 30.0              # longest wait for a slot before `-ERR RETRY busy` and close
SERVER_COMMANDS = {**DATA_COMMANDS, **ADMIN_COMMANDS}
ADMIN = frozenset(("STATUS", "TABLETS", "ROWS", "KILL", "WAKE"))


class DropConnection(Exception):
    """Raised by a writer when a write's outcome is unknown (cluster mode: its
    primary was deposed before the write committed). The server closes the
    connection without a reply, which a client reads as "outcome unknown";
    `-ERR RETRY` would promise that nothing was applied."""


class StandaloneRole:
    """No master: this server is the primary of every tablet."""

    def check(self, tablet_id: int) -> None:
        return None

    def role_of(self, tablet_id: int) -> str:
        return "primary"

    def on_kill(self) -> None:
        pass

    def on_wake(self, store: Store) -> None:
        pass


class LocalWriter:
    """Standalone writes: log locally (group commit), then apply."""

    def write(self, tablet: Tablet, effect: Effect) -> LogRecord:
        return tablet.write(effect)


class Connection:
    """Per-connection state."""

    __slots__ = ("sock", "peer", "authed", "closing", "big")

    def __init__(self, sock: socket.socket, peer, authed: bool):
        self.sock = sock
        self.peer = peer
        self.authed = authed
        self.closing = False
        self.big = False          # holds one of the server's big-request slots


def send_parts(sock: socket.socket, parts: list) -> None:
    """Send reply buffers in order: small ones joined, big values without a copy."""
    if sum(len(p) for p in parts) < JOIN_REPLIES_UNDER:
        sock.sendall(b"".join(parts))
        return
    small: list = []
    for p in parts:
        if len(p) < JOIN_REPLIES_UNDER:
            small.append(p)
            continue
        if small:
            sock.sendall(b"".join(small))
            small = []
        sock.sendall(p)
    if small:
        sock.sendall(b"".join(small))


class KVServer:
    def __init__(self, node_id: str, host: str, port: int, data_dir: str, storage: StorageConfig,
                 tablets: int, secret: str = "", role=None, writer=None, tablet_ids=None,
                 internal_commands=None):
        self.node_id = node_id
        self.host = host
        self.data_dir = data_dir
        self.storage_cfg = storage
        self.tablet_count = tablets
        self.tablet_ids = list(range(tablets)) if tablet_ids is None else sorted(tablet_ids)
        self.secret = secret
        self.role = role or StandaloneRole()
        self.writer = writer or LocalWriter()
        self.store: Store | None = None
        self.state = "recovering"
        self._state_lock = threading.Lock()
        # Big literals in flight at once: what the memory budget can hold of
        # them, at least 2 (docs/storage.md, "Memory").
        self.big_request_slots = max(2, storage.memory_budget_bytes // max(storage.max_cell_bytes, 1))
        self._big_requests = threading.BoundedSemaphore(self.big_request_slots)
        self._ops_lock = threading.Lock()
        self.ops = 0                       # data commands served
        self.tcp = TCPServer(host, port, self._handle, name=f"kvserver {node_id}")
        self._dispatch = {name: getattr(self, f"cmd_{name}") for name in SERVER_COMMANDS}
        # Internal commands (cluster mode: replication), {name: (CommandSpec, handler(conn, *args))};
        # like admin commands, they need AUTH when a secret is set.
        internal = internal_commands or {}
        self.commands = {**SERVER_COMMANDS, **{n: spec for n, (spec, _) in internal.items()}}
        self._dispatch.update({n: h for n, (_, h) in internal.items()})
        self._restricted = ADMIN | frozenset(internal)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> "KVServer":
        self.store = Store(self.data_dir, self.tablet_ids, self.storage_cfg).open()
        self.role.on_wake(self.store)
        self.state = "serving"
        self.tcp.start()
        return self

    @property
    def port(self) -> int:
        return self.tcp.port

    def stop(self) -> None:
        self.role.on_kill()
        self.tcp.stop()
        with self._state_lock:
            store, self.store = self.store, None
        if store is not None:
            store.close()

    # -- the connection loop ---------------------------------------------------------------

    def _handle(self, sock: socket.socket, peer) -> None:
        conn = Connection(sock, peer, authed=not self.secret)
        try:
            self._serve(conn)
        finally:
            if conn.big:
                self._big_requests.release()

    def _admit(self, conn: Connection, buffered: int) -> None:
        """Before reading more of a request: a request holding more than
        BIG_REQUEST_BYTES (a big literal) needs one of a few slots, so
        concurrent uploads of 64 MiB values cannot exhaust memory. The slot
        is held only while the bytes arrive, never while a command runs (a
        replicated write waits on other servers, whose receivers may wait
        for slots here)."""
        self._free_slot(conn, buffered)
        if not conn.big and buffered > BIG_REQUEST_BYTES:
            if not self._big_requests.acquire(timeout=BIG_REQUEST_WAIT_S):
                raise Retry("busy: too many big requests at once")
            conn.big = True

    def _free_slot(self, conn: Connection, buffered: int) -> None:
        if conn.big and buffered <= BIG_REQUEST_BYTES:
            conn.big = False
            self._big_requests.release()

    def _serve(self, conn: Connection) -> None:
        sock = conn.sock
        parser = RequestParser(self.commands, max_literal=self.storage_cfg.max_cell_bytes)
        out: list = []
        out_bytes = 0
        while True:
            ev = parser.next_event()
            if ev is NEED_DATA:
                if out:
                    send_parts(sock, out)
                    out, out_bytes = [], 0
                try:
                    self._admit(conn, parser.buffered)
                except Retry as e:
                    sock.sendall(error_for(e))     # mid-literal: answer, then close
                    return
                data = sock.recv(RECV_BYTES)
                if not data:
                    return
                parser.feed(data)
                continue
            self._free_slot(conn, parser.buffered)     # the request is in
            if isinstance(ev, ProtocolErrorEvent):
                out.append(ev.reply())
                if ev.close:
                    send_parts(sock, out)
                    return
                continue
            reply = self.dispatch(conn, ev)
            if isinstance(reply, tuple):
                out.extend(reply)
                out_bytes += sum(len(b) for b in reply)
            else:
                out.append(reply)
                out_bytes += len(reply)
            if conn.closing:
                send_parts(sock, out)
                return
            if out_bytes >= HOLD_REPLIES_BYTES:
                # a long pipeline of big GETs: send now rather than hold it all
                send_parts(sock, out)
                out, out_bytes = [], 0

    def dispatch(self, conn: Connection, req: Request):
        """The reply to one request: bytes, or a tuple of buffers."""
        try:
            if req.cmd in self._restricted and not conn.authed:
                raise Denied("AUTH first")
            return self._dispatch[req.cmd](conn, *req.args)
        except (DropConnection, WriteOutcomeUnknown) as e:
            log.warning("%s: closing the connection without a reply: %s", req.cmd, e)
            conn.closing = True
            return b""
        except KVError as e:
            return error_for(e)
        except KVProtocolError as e:
            return error(e.code, e.text)
        except TabletError as e:
            return error("RETRY", str(e) if self.state == "serving" else self.state)
        except CorruptCheckpoint as e:
            log.error("corrupt data: %s", e)
            return error("INTERNAL", "corrupt checkpoint block (see the server log)")
        except Exception:
            log.exception("%s failed", req.cmd)
            return error("INTERNAL", f"{req.cmd} failed (see the server log)")

    # -- helpers -----------------------------------------------------------------------------

    def _store(self) -> Store:
        store = self.store
        if store is None or self.state != "serving":
            raise Retry(self.state)
        return store

    def _tablet(self, row: bytes) -> tuple[Store, Tablet]:
        store = self._store()
        tid = tablet_of(row, self.tablet_count)
        self.role.check(tid)
        t = store.tablet(tid)
        if t is None:
            raise Retry(f"tablet {tid} is not held here")
        with self._ops_lock:
            self.ops += 1
        return store, t

    def _write(self, store: Store, t: Tablet, effect: Effect) -> bytes:
        self.writer.write(t, effect)
        store.wrote(t)
        return ok()

    # -- data commands ------------------------------------------------------------------------

    def cmd_PING(self, conn):
        return pong()

    def cmd_QUIT(self, conn):
        conn.closing = True
        return ok("bye")

    def cmd_GET(self, conn, row, col):
        _, t = self._tablet(row)
        v = t.get(row, col)
        if v is None:
            raise NotFound()
        return value_parts(v)

    def cmd_COLS(self, conn, row):
        _, t = self._tablet(row)
        return name_listing(t.cols(row))

    def cmd_PUT(self, conn, row, col, value):
        store, t = self._tablet(row)
        store.admit()
        with store.row_lock(t.id, row):
            return self._write(store, t, Effect(SET, row, col, value))

    def cmd_PUTNX(self, conn, row, col, value):
        store, t = self._tablet(row)
        store.admit()
        with store.row_lock(t.id, row):
            if t.exists(row, col):
                raise Exists()
            return self._write(store, t, Effect(SET, row, col, value))

    def cmd_CPUT(self, conn, row, col, old, new):
        store, t = self._tablet(row)
        store.admit()
        with store.row_lock(t.id, row):
            cur = t.get(row, col)
            if cur is None:
                raise NotFound()
            if cur != old:
                raise Mismatch()
            return self._write(store, t, Effect(SET, row, col, new))

    def cmd_DELETE(self, conn, row, col):
        store, t = self._tablet(row)
        with store.row_lock(t.id, row):
            if not t.exists(row, col):
                raise NotFound()
            return self._write(store, t, Effect(DEL, row, col))

    def cmd_DELROW(self, conn, row):
        store, t = self._tablet(row)
        with store.row_lock(t.id, row):
            if not t.cols(row):
                raise NotFound()
            return self._write(store, t, Effect(DELROW, row))

    # -- admin commands ------------------------------------------------------------------------

    def cmd_AUTH(self, conn, secret):
        if self.secret and not hmac.compare_digest(secret, self.secret.encode()):
            conn.authed = False
            raise Denied("wrong secret")
        conn.authed = True
        return ok()

    def cmd_STATUS(self, conn):
        store = self.store
        s = store.stats() if store is not None and self.state == "serving" else None
        roles = ",".join(f"{tid}:{self.role_of(tid)}" for tid in self.tablet_ids)
        lines = [f"id={self.node_id}", f"state={self.state}", f"tablets={roles}",
                 f"keys={s['keys'] if s else 0}", f"disk_bytes={s['disk_bytes'] if s else 0}",
                 f"log_records={s['log_records'] if s else 0}", f"ops={self.ops}"]
        if s:
            lines += [f"memtable_bytes={s['memtable_bytes']}", f"cache_bytes={s['cache_bytes']}",
                      f"index_bytes={s['index_bytes']}", f"checkpoints={s['checkpoints']}"]
        lines.append(f"memory_budget={self.storage_cfg.memory_budget_bytes}")
        lines.append(f"group_commit={int(self.storage_cfg.group_commit)}")
        return listing(lines)

    def role_of(self, tid: int) -> str:
        return "recovering" if self.state == "recovering" else self.role.role_of(tid)

    def cmd_TABLETS(self, conn):
        store = self._store()
        per = store.stats()["tablets"]
        return listing(f"{tid} {self.role_of(tid)} rows={s['rows']} bytes={s['disk_bytes']}"
                       for tid, s in sorted(per.items()))

    def cmd_ROWS(self, conn, tablet, after, limit):
        store = self._store()
        if not tablet.isdigit() or int(tablet) not in store.tablets:
            raise BadRequest(f"no tablet {tablet} here")
        if not limit.isdigit() or not 0 <= int(limit) <= MAX_ROWS_LIMIT:
            raise BadRequest(f"limit must be 0 to {MAX_ROWS_LIMIT}")
        start = None if after == "-" else decode_name(after)
        rows = store.tablet(int(tablet)).rows(start, int(limit))
        # a row named "-" is sent as %2D, so the reply can be fed back as <after>
        return listing(b"%2D" if r == b"-" else encode_name(r) for r in rows)

    def cmd_KILL(self, conn):
        with self._state_lock:
            store, self.store = self.store, None
            self.state = "killed"
        log.warning("KILL: dropping all in-memory state")
        self.role.on_kill()
        if store is not None:
            store.crash()
        self.tcp.close_connections(keep=conn.sock)
        return ok()

    def cmd_WAKE(self, conn):
        with self._state_lock:
            if self.state != "killed":
                return ok(self.state)
            self.state = "recovering"
        try:
            store = Store(self.data_dir, self.tablet_ids, self.storage_cfg).open()
        except Exception as e:
            log.exception("WAKE: recovery failed")
            with self._state_lock:
                self.state = "killed"
            raise Internal(f"recovery failed: {e}") from None
        self.role.on_wake(store)
        with self._state_lock:
            self.store = store
            self.state = "serving"
        log.warning("WAKE: recovered from disk, serving")
        return ok()


def standalone_server(port: int, data_dir: str, storage: StorageConfig, tablets: int = 24,
                      host: str = "127.0.0.1", node_id: str = "standalone", secret: str = "") -> KVServer:
    """A server with no master: primary of every tablet (not yet started)."""
    return KVServer(node_id, host, port, data_dir, storage, tablets, secret=secret)
