"""The tablet server: the KV protocol (PROTOCOL.md) in front of a `Store`.

    server = KVServer(node_id, host, port, data_dir, storage_cfg, tablets,
                      secret="", role=None, writer=None, tablet_ids=None)
    server.start()        recover the store, then listen (server.port)
    server.stop()         stop listening, flush and close the store

Every connection is served by one event loop (kvserver/loop.py), which feeds
what a client sends to its `RequestParser` (src/kvproto) and asks `dispatch`
for each request's reply, in order. Commands are found in a dispatch table of
`cmd_<VERB>` methods. A read returns its reply at once. A write checks its
condition against the current state, then `writer.begin`s its record and
returns `LATER`: the loop makes it durable with the turn's other writes,
calls `writer.durable` (and `writer.settle` until the replicas have it),
and answers. While a write is in flight its cell is held (DELROW: its row):
another write to that cell waits (the loop parks its connection), so each
command is atomic, and readers never see a write that is not durable.

Seams for the cluster layer, both passed to the constructor:

- `role` answers, for a data command, whether this server may serve the
  row's tablet: `role.check(tablet_id)` returns nothing, or raises
  `src.kv.Moved(tablet, addr)` / `src.kv.Retry(text)`. `role.role_of(tid)`
  names the role for STATUS/TABLETS ("primary", "secondary", "recovering").
  `role.on_kill()` / `role.on_wake(store)` are called by KILL / WAKE (stop
  heartbeats, rejoin). `StandaloneRole`: primary of everything, no-ops.
- `writer` makes an effect durable and visible, in three steps that never
  wait on the network: `begin(tablet, effect)` -> handle (the record is
  numbered and enqueued in the local log; a replicating writer also sends it
  to the secondaries); `durable(tablet, handle)` once the loop's flush has
  run -> True when the write is done and applied, False while replicas have
  yet to acknowledge; then `settle(tablet, handle)` -> the same, asked again
  whenever the loop is woken (`server.wake()`). `LocalWriter`: the tablet's
  own submit / wait_durable / apply.

- `internal_commands` ({name: (CommandSpec, handler(conn, *args))}) adds
  the cluster's own commands (replication, catch-up); like admin commands
  they need AUTH when a secret is set. Those named in `blocking_commands`
  (and KILL, WAKE) may block: they run on a thread of their own, with the
  connection's socket taken out of the loop meanwhile.

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
import threading

from src.config import StorageConfig
from src.kv import BadRequest, Denied, Exists, Internal, KVError, Mismatch, NotFound, Retry, tablet_of
from src.kvproto import (
    ADMIN_COMMANDS, DATA_COMMANDS, KVProtocolError, Request, RequestParser, decode_name, encode_name,
    error, error_for, listing, name_listing, ok, pong, value_parts,
)

from kvserver.checkpoint import CorruptCheckpoint
from kvserver.loop import EventLoop
from kvserver.store import Store
from kvserver.tablet import Tablet, TabletError, WriteOutcomeUnknown
from kvserver.wal import DEL, DELROW, SET, Effect

log = logging.getLogger(__name__)

MAX_ROWS_LIMIT = 10000             # ROWS's <limit>
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

    def begin(self, tablet: Tablet, effect: Effect):
        return tablet.submit(effect)

    def durable(self, tablet: Tablet, pending) -> bool:
        tablet.wait_durable(pending)
        tablet.apply(pending)
        return True

    def settle(self, tablet: Tablet, pending) -> bool:
        return True


class KVServer:
    def __init__(self, node_id: str, host: str, port: int, data_dir: str, storage: StorageConfig,
                 tablets: int, secret: str = "", role=None, writer=None, tablet_ids=None,
                 internal_commands=None, blocking_commands=frozenset()):
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
        self.ops = 0                       # data commands served
        self.loop = EventLoop(self, host, port, f"kvserver {node_id}", self.big_request_slots)
        self._dispatch = {name: getattr(self, f"cmd_{name}") for name in SERVER_COMMANDS}
        # Internal commands (cluster mode: replication), {name: (CommandSpec, handler(conn, *args))};
        # like admin commands, they need AUTH when a secret is set.
        internal = internal_commands or {}
        self.commands = {**SERVER_COMMANDS, **{n: spec for n, (spec, _) in internal.items()}}
        self._dispatch.update({n: h for n, (_, h) in internal.items()})
        self._restricted = ADMIN | frozenset(internal)
        # run on a thread of their own: KILL stops the cluster node (joins its
        # threads, which hand their sockets back through the loop), WAKE recovers
        self._blocking = frozenset(blocking_commands) | {"KILL", "WAKE"}

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> "KVServer":
        self.store = Store(self.data_dir, self.tablet_ids, self.storage_cfg).open()
        self.role.on_wake(self.store)
        self.state = "serving"
        self.loop.start()
        return self

    @property
    def port(self) -> int:
        return self.loop.port

    def stop(self) -> None:
        self.role.on_kill()
        self.loop.stop()
        with self._state_lock:
            store, self.store = self.store, None
        if store is not None:
            store.close()

    # -- what the event loop asks ------------------------------------------------------------

    def new_parser(self) -> RequestParser:
        return RequestParser(self.commands, max_literal=self.storage_cfg.max_cell_bytes)

    def runs_blocking(self, cmd: str) -> bool:
        return cmd in self._blocking

    def restricted(self, cmd: str) -> bool:
        return cmd in self._restricted

    def wake(self) -> None:
        """Writes in flight may be settled (a replica acknowledged): any thread."""
        self.loop.wake()

    def dispatch(self, conn, req: Request):
        """The reply to one request: bytes, a tuple of buffers, or LATER (a write in flight)."""
        try:
            if req.cmd in self._restricted and not conn.authed:
                raise Denied("AUTH first")
            return self._dispatch[req.cmd](conn, *req.args)
        except Exception as e:
            return self.error_reply(conn, req.cmd, e)

    def error_reply(self, conn, cmd: str, e: Exception) -> bytes:
        """The reply for a command (or a write in flight) that raised `e`."""
        if isinstance(e, (DropConnection, WriteOutcomeUnknown)):
            log.warning("%s: closing the connection without a reply: %s", cmd, e)
            conn.closing = True
            return b""
        if isinstance(e, KVError):
            return error_for(e)
        if isinstance(e, KVProtocolError):
            return error(e.code, e.text)
        if isinstance(e, TabletError):
            return error("RETRY", str(e) if self.state == "serving" else self.state)
        if isinstance(e, CorruptCheckpoint):
            log.error("corrupt data: %s", e)
            return error("INTERNAL", "corrupt checkpoint block (see the server log)")
        log.error("%s failed", cmd, exc_info=e)
        return error("INTERNAL", f"{cmd} failed (see the server log)")

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
        return store, t

    def _write(self, conn, row: bytes, col: bytes | None, effect_for, admit: bool = True):
        """Begin a write of one cell (col None: the whole row, DELROW):
        `effect_for(tablet)` checks the command's condition against the
        current state (raising NotFound, Mismatch, Exists) and returns the
        effect to log. LATER: the loop answers when the write is durable (and
        replicated). While it is in flight it holds its cell (DELROW its
        row): another write to that cell waits, so each command is atomic."""
        store, t = self._tablet(row)
        if self.loop.busy(t.id, row, col):
            return self.loop.park(conn, t.id, row)
        if admit and store.over_budget():
            later = self.loop.wait_for_memory(conn)
            if later is not None:
                return later
        self.ops += 1
        effect = effect_for(t)
        return self.loop.begun(conn, t, row, col, self.writer.begin(t, effect))

    def written(self, t: Tablet) -> bytes:
        """A write is done: wake the checkpointer if a threshold is passed; +OK."""
        store = self.store
        if store is not None:
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
        self.ops += 1
        v = t.get(row, col)
        if v is None:
            raise NotFound()
        return value_parts(v)

    def cmd_COLS(self, conn, row):
        _, t = self._tablet(row)
        self.ops += 1
        return name_listing(t.cols(row))

    def cmd_PUT(self, conn, row, col, value):
        return self._write(conn, row, col, lambda t: Effect(SET, row, col, value))

    def cmd_PUTNX(self, conn, row, col, value):
        def effect(t):
            if t.exists(row, col):
                raise Exists()
            return Effect(SET, row, col, value)
        return self._write(conn, row, col, effect)

    def cmd_CPUT(self, conn, row, col, old, new):
        def effect(t):
            cur = t.get(row, col)
            if cur is None:
                raise NotFound()
            if cur != old:
                raise Mismatch()
            return Effect(SET, row, col, new)
        return self._write(conn, row, col, effect)

    def cmd_DELETE(self, conn, row, col):
        def effect(t):
            if not t.exists(row, col):
                raise NotFound()
            return Effect(DEL, row, col)
        return self._write(conn, row, col, effect, admit=False)

    def cmd_DELROW(self, conn, row):
        def effect(t):
            if not t.cols(row):
                raise NotFound()
            return Effect(DELROW, row)
        return self._write(conn, row, None, effect, admit=False)

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
                      f"index_bytes={s['index_bytes']}", f"checkpoints={s['checkpoints']}",
                      f"group_flushes={s['group_flushes']}", f"logs_flushed={s['logs_flushed']}"]
        lines += [f"loop_turns={self.loop.turns}", f"connections={self.loop.connection_count}"]
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
        self.loop.call_soon(lambda: self.loop.close_connections(keep=conn))
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
