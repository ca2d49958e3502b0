"""The tablet server's event loop: every client connection served by one thread.

    loop = EventLoop(server, host, port, name, big_request_slots)
    loop.start()              bind + listen (port 0 allowed: loop.port), start the thread
    loop.stop()               close the listener and every connection, join
    loop.wake()               from any thread: run a turn soon (replicas acknowledged)
    loop.call_soon(fn)        from any thread: run fn() on the loop's thread

`big_request_slots` is how many connections may at once buffer a request of
more than BIG_REQUEST_BYTES (a big PUT); the others stop being read until a
slot frees (or BIG_REQUEST_WAIT_S passes), so many large writes at once
cannot exhaust the memory (kvserver/server.py sizes it from the memory budget).

Why one thread and not one per connection: in CPython only one thread runs
Python at a time, and handing the interpreter lock from thread to thread
costs futex system calls. Measured on the 2-core machine (docs/storage.md,
"Why an event loop"), a thread per connection spent about 130 us of CPU per
PUT, most of it in the kernel passing the lock and waking threads; this
loop spends about 30. It is Redis's design: read what every client sent,
answer what can be answered, make the turn's writes durable together, reply.

One turn:

 1. `select` over the listener, every connection and a wake-up socket.
 2. Read what arrived. Each connection's `RequestParser` yields requests,
    answered strictly in order by `server.dispatch`:
    - reads and admin commands are answered at once;
    - a write is checked (CPUT's old value, ...) and its record enqueued in
      the tablet's log (`writer.begin`); its connection then waits, and its
      next requests stay in its parser, as they would in a blocked thread.
      A write to a cell another write holds (DELROW: to a row with a cell
      held) parks its connection until that one is done, so each command
      is atomic and reads never see a write that is not durable; writes to
      different cells of one row (a mailbox's messages) go on together;
    - a replica's REPL is enqueued the same way; its ACK is a reply that
      holds its place until the turn's sync;
    - SNAPCHUNK, SNAPSHOT, KILL and WAKE may block: they run on a thread of
      their own, the socket taken out of the loop meanwhile.
 3. Every write begun in the turn is made durable: the first wait leads ONE
    group flush of every dirty tablet log (wal.CommitGroup). With group
    commit off each write is synced by itself.
 4. Durable writes are applied and answered (standalone), or wait for their
    replicas' acknowledgements (cluster: the replication threads `wake()`
    the loop, which asks `writer.settle`). Their connections go on.
 5. Replies are sent without blocking; what a socket does not take waits for
    it to become writable, and a connection with more than
    HOLD_REPLIES_BYTES unsent reads no new requests (back-pressure).

Nothing here blocks on a client: a slow or vanished client costs a buffer,
never the loop. What can block the loop briefly is the local disk (a sync, a
checkpoint block read), as in Redis.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import threading
import time

from src.kvproto import NEED_DATA, ProtocolErrorEvent, error
from src.server import listen

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
READ_AHEAD_BYTES = 1 << 20         # a busy connection buffers at most this much unparsed input
JOIN_REPLIES_UNDER = 64 * 1024     # replies smaller than this are joined into one send
SEND_CHUNK = 256 * 1024            # ... up to this many bytes per send
HOLD_REPLIES_BYTES = 256 * 1024    # a connection with this much unsent takes no new requests
BIG_REQUEST_BYTES = 4 * 1024 * 1024    # a request buffering more than this needs a big-request slot
BIG_REQUEST_WAIT_S = 30.0              # longest wait for a slot before `-ERR RETRY busy` and close
MEMORY_WAIT_S = 30.0               # longest a write waits for memory before going ahead
MEMORY_RECHECK_S = 0.05
SETTLE_RECHECK_S = 0.5             # writes waiting for replicas are re-asked at least this often
ACCEPT_PER_TURN = 64
ACCEPT_PAUSE_S = 0.5               # after accept failed (out of file descriptors): listen again after this

LATER = object()    # what a command handler returns when its connection now waits
MEMORY = "memory"   # what a write parked for memory waits on
APPENDS = "appends" # what a blocking command waits on: its connection's replies after the sync


class Deferred:
    """A reply whose bytes are known only after the turn's sync (a replica's
    ACK): it holds its place among the connection's replies."""

    __slots__ = ("data",)

    def __init__(self):
        self.data = None


class Conn:
    """One client connection and where it stands."""

    __slots__ = ("sock", "peer", "authed", "closing", "closed", "parser", "out", "out_bytes",
                 "waiting", "parked", "parked_on", "need_data", "eof", "big", "big_since", "memory_since",
                 "detached", "events", "deferred")

    def __init__(self, sock: socket.socket, peer, authed: bool, parser):
        self.sock = sock
        self.peer = peer
        self.authed = authed
        self.closing = False        # close once the replies so far are sent
        self.closed = False
        self.parser = parser
        self.out: collections.deque = collections.deque()
        self.out_bytes = 0
        self.waiting = None         # the Write in flight, or LATER while detached
        self.parked = None          # a request to dispatch again (cell busy, memory full) ...
        self.parked_on = None       # ... once this is released: a row's key, or MEMORY
        self.need_data = True       # the parser asked for more bytes
        self.eof = False            # the client sent FIN: answer what came, then close
        self.big = False            # holds one of the big-request slots
        self.big_since = 0.0        # waiting for a slot since (0: not waiting)
        self.memory_since = 0.0     # a write waiting for memory since
        self.detached = False       # a blocking command runs on its own thread
        self.events = 0             # what the selector watches for
        self.deferred = 0           # Deferred replies not yet known


class Write:
    """A write in flight: begun (its record enqueued), not yet answered."""

    __slots__ = ("conn", "tablet", "key", "handle")

    def __init__(self, conn: Conn, tablet, key, handle):
        self.conn = conn
        self.tablet = tablet
        self.key = key
        self.handle = handle


class EventLoop:
    def __init__(self, server, host: str, port: int, name: str, big_request_slots: int):
        self.server = server
        self.host = host
        self.requested_port = port
        self.port = 0
        self.name = name
        self.sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_lock = threading.Lock()
        self._woken = False
        self._calls: collections.deque = collections.deque()
        self._flushes: collections.deque = collections.deque()    # objects whose flush() is due
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.conns: set[Conn] = set()
        self.big_free = big_request_slots
        self._big_waiters: collections.deque[Conn] = collections.deque()
        self._runnable: collections.deque[Conn] = collections.deque()
        self._unsynced: list[Write] = []         # begun this turn, not yet durable
        self._unsettled: list[Write] = []        # durable here, waiting for replicas
        self._after_sync: list = []              # (conn, Deferred, fn): replies made after the sync
        self._cells: dict = {}                   # (tablet, row, col) -> the Write holding it (col None: DELROW)
        self._row_writes: dict = {}              # (tablet, row) -> how many cells of it are held
        self._row_waiters: dict = {}             # (tablet, row) -> deque of parked Conns
        self._memory_waiters: list[Conn] = []
        self.turns = 0
        self._accept_paused_until = 0.0

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> "EventLoop":
        ls = listen(self.host, self.requested_port)
        ls.setblocking(False)
        self._listener = ls
        self.port = ls.getsockname()[1]
        self.sel.register(ls, selectors.EVENT_READ, "accept")
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        log.info("%s listening on %s:%d", self.name, self.host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop: the loop thread closes the listener and every connection."""
        self._stopping = True
        self.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Make the loop run a turn soon (safe from any thread)."""
        if threading.current_thread() is self._thread:
            return                      # the loop's own turn goes on to settle
        with self._wake_lock:
            if self._woken:
                return
            self._woken = True
        try:
            self._wake_w.send(b"w")
        except OSError:
            pass

    def call_soon(self, fn) -> None:
        """Run `fn()` on the loop's thread (safe from any thread)."""
        self._calls.append(fn)
        self.wake()

    def flush_soon(self, obj) -> None:
        """Call `obj.flush()` on the loop's thread this turn, before its sync
        (a replication stream sending what writes queued): any thread."""
        self._flushes.append(obj)
        if threading.current_thread() is not self._thread:
            self.wake()

    def watch(self, sock, on_readable) -> None:
        """Loop thread: call `on_readable()` whenever `sock` has input."""
        self.sel.register(sock, selectors.EVENT_READ, on_readable)

    def unwatch(self, sock) -> None:
        """Loop thread: stop watching `sock` (before it is closed)."""
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    @property
    def connection_count(self) -> int:
        return len(self.conns)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._turn()
                except Exception:
                    log.exception("%s: a turn of the event loop failed", self.name)
                    time.sleep(0.01)
        finally:
            self._shut()

    def _timeout(self) -> float | None:
        if self._unsynced or self._after_sync or self._runnable or self._calls or self._flushes:
            return 0
        waits = []
        if self._accept_paused_until:
            waits.append(max(0.0, self._accept_paused_until - time.monotonic()))
        if self._memory_waiters:
            waits.append(MEMORY_RECHECK_S)
        if self._unsettled:
            waits.append(SETTLE_RECHECK_S)
        if self._big_waiters:
            waits.append(1.0)
        return min(waits) if waits else None

    def _turn(self) -> None:
        self.turns += 1
        if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self.sel.register(self._listener, selectors.EVENT_READ, "accept")
        for key, mask in self.sel.select(self._timeout()):
            what = key.data
            if what == "accept":
                self._accept()
            elif what == "wake":
                self._drain_wake()
            elif isinstance(what, Conn):
                self._on_ready(what, mask)
            else:
                self._call(what)
        while self._calls:
            self._call(self._calls.popleft())
        if self._unsettled:
            self._settle()              # replicas' ACKs read above: answer before syncing
        self._run_runnable()
        self._flush_streams()           # replicas start on this turn's writes ...
        if self._unsynced or self._after_sync:
            self._sync()                # ... while we sync them here
        if self._unsettled:
            self._settle()
        if self._memory_waiters:
            waiters, self._memory_waiters = self._memory_waiters, []
            self._release(waiters)
        if self._big_waiters:
            self._expire_big_waiters()
        self._run_runnable()
        self._flush_streams()

    def _call(self, fn) -> None:
        try:
            fn()
        except Exception:
            log.exception("%s: a call on the loop failed", self.name)

    def _flush_streams(self) -> None:
        while self._flushes:
            self._call(self._flushes.popleft().flush)

    def _accept(self) -> None:
        for _ in range(ACCEPT_PER_TURN):
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of file descriptors (or memory): the pending connection
                # stays in the backlog and the listener stays readable, so
                # stop watching it for a moment instead of spinning on it.
                log.warning("%s: accept failed (%s): not accepting for %.1fs, %d connections open",
                            self.name, e, ACCEPT_PAUSE_S, len(self.conns))
                self.sel.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock, peer, not self.server.secret, self.server.new_parser())
            self.conns.add(conn)
            self._set_events(conn)

    def _drain_wake(self) -> None:
        # Bytes first, then the flag: a wake() after the flag is cleared sends
        # a new byte; one before it changed state the rest of this turn sees.
        # (The other order can eat a byte and leave the flag set, and then
        # every later wake() is silent.)
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._wake_lock:
            self._woken = False

    def _on_ready(self, conn: Conn, mask: int) -> None:
        if conn.closed:
            return
        try:
            if mask & selectors.EVENT_WRITE:
                self._send(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                self._read(conn)
        except Exception:
            log.exception("%s: connection from %s failed", self.name, conn.peer)
            self._close(conn)

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            conn.eof = True
        else:
            conn.parser.feed(data)
        self._advance(conn)

    def _run_runnable(self) -> None:
        while self._runnable:
            conn = self._runnable.popleft()
            if not conn.closed and not conn.detached:
                try:
                    self._advance(conn)
                except Exception:
                    log.exception("%s: connection from %s failed", self.name, conn.peer)
                    self._close(conn)

    # -- one connection: requests in, replies out ------------------------------------------

    def _advance(self, conn: Conn) -> None:
        """Answer this connection's buffered requests, in order, until one must
        wait (a write in flight, a busy cell), more bytes are needed, or too
        many replies are unsent. Then send, and watch for what comes next."""
        if conn.parked_on is not None:  # still parked: the loop runs it again when released
            self._set_events(conn)
            return
        parser = conn.parser
        while (conn.waiting is None and not conn.closing and not conn.closed
               and conn.out_bytes < HOLD_REPLIES_BYTES):
            if conn.parked is not None:
                ev, conn.parked = conn.parked, None
            else:
                ev = parser.next_event()
                if ev is NEED_DATA:
                    conn.need_data = True
                    if conn.eof:
                        conn.closing = True     # nothing more will come
                    else:
                        self._admit_big(conn, parser.buffered)
                    break
                conn.need_data = False
                self._free_big(conn, parser.buffered)     # the request is in
                if isinstance(ev, ProtocolErrorEvent):
                    self._reply(conn, ev.reply())
                    if ev.close:
                        conn.closing = True
                    continue
            if self.server.runs_blocking(ev.cmd) and (conn.authed or not self.server.restricted(ev.cmd)):
                if conn.deferred:
                    conn.parked, conn.parked_on = ev, APPENDS    # after the replies before it
                    break
                self._detach(conn, ev)
                return
            reply = self.server.dispatch(conn, ev)
            if reply is LATER:          # a write in flight, or parked
                if conn.parked_on is not None:
                    conn.parked = ev
                break
            self._reply(conn, reply)
        self._send(conn)

    def _reply(self, conn: Conn, reply) -> None:
        if isinstance(reply, Deferred):
            conn.out.append(reply)
        elif isinstance(reply, tuple):
            for part in reply:
                if len(part):
                    conn.out.append(part)
                    conn.out_bytes += len(part)
        elif reply:
            conn.out.append(reply)
            conn.out_bytes += len(reply)

    def _send(self, conn: Conn) -> None:
        out = conn.out
        held = conn.out_bytes >= HOLD_REPLIES_BYTES
        while out:
            first = out[0]
            if isinstance(first, Deferred):
                if first.data is None:
                    break               # later replies wait for this one
                out[0] = first = first.data
            if len(first) < JOIN_REPLIES_UNDER and len(out) > 1:
                parts, size = [], 0
                while out and not isinstance(out[0], Deferred) and len(out[0]) < JOIN_REPLIES_UNDER and size < SEND_CHUNK:
                    p = out.popleft()
                    parts.append(p)
                    size += len(p)
                first = b"".join(parts)
                out.appendleft(first)
            try:
                n = conn.sock.send(first)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            conn.out_bytes -= n
            if n == len(first):
                out.popleft()
            else:
                out[0] = memoryview(first)[n:]
                break
        if conn.closing and not out and conn.waiting is None and not conn.deferred:
            self._close(conn)
            return
        if held and conn.out_bytes < HOLD_REPLIES_BYTES:
            self._runnable.append(conn)     # below the hold again: buffered requests go on
        self._set_events(conn)

    def _set_events(self, conn: Conn) -> None:
        if conn.closed or conn.detached:
            return
        reading = (not conn.eof and not conn.big_since
                   and (conn.need_data or conn.parser.buffered < READ_AHEAD_BYTES))
        sendable = conn.out and not (isinstance(conn.out[0], Deferred) and conn.out[0].data is None)
        events = (selectors.EVENT_READ if reading else 0) | (selectors.EVENT_WRITE if sendable else 0)
        if events == conn.events:
            return
        if conn.events == 0:
            self.sel.register(conn.sock, events, conn)
        elif events == 0:
            self.sel.unregister(conn.sock)
        else:
            self.sel.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.discard(conn)
        if conn.events:
            try:
                self.sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.events = 0
        if conn.big:
            conn.big = False
            self._release_big()
        if conn.big_since:
            conn.big_since = 0.0
            try:
                self._big_waiters.remove(conn)
            except ValueError:
                pass
        try:
            conn.sock.close()
        except OSError:
            pass

    def close_connections(self, keep=None) -> None:
        """Close every connection but `keep`, as a crash would (KILL)."""
        for conn in list(self.conns):
            if conn is keep:
                continue
            if conn.detached:
                # its thread owns the socket: make its I/O fail, it closes when done
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.closing = True
            else:
                self._close(conn)

    def _shut(self) -> None:
        self.close_connections()
        if self._listener is not None:
            self._listener.close()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- big requests: a few slots, so 64 MiB literals cannot exhaust memory ----------------

    def _admit_big(self, conn: Conn, buffered: int) -> None:
        """Before reading more of a request: one holding more than
        BIG_REQUEST_BYTES needs a slot; without one its connection stops
        being read until a slot frees (or BIG_REQUEST_WAIT_S passes)."""
        self._free_big(conn, buffered)
        if conn.big or buffered <= BIG_REQUEST_BYTES or conn.big_since:
            return
        if self.big_free > 0:
            self.big_free -= 1
            conn.big = True
        else:
            conn.big_since = time.monotonic()
            self._big_waiters.append(conn)

    def _free_big(self, conn: Conn, buffered: int) -> None:
        if conn.big and buffered <= BIG_REQUEST_BYTES:
            conn.big = False
            self._release_big()

    def _release_big(self) -> None:
        self.big_free += 1
        while self._big_waiters and self.big_free > 0:
            conn = self._big_waiters.popleft()
            conn.big_since = 0.0
            self.big_free -= 1
            conn.big = True
            self._runnable.append(conn)
            self._set_events(conn)

    def _expire_big_waiters(self) -> None:
        now = time.monotonic()
        while self._big_waiters and now - self._big_waiters[0].big_since > BIG_REQUEST_WAIT_S:
            conn = self._big_waiters.popleft()
            conn.big_since = 0.0
            self._reply(conn, error("RETRY", "busy: too many big requests at once"))
            conn.closing = True        # mid-literal: answer, then close
            self._send(conn)

    # -- writes (called by the server's command handlers, on the loop thread) --------------

    def busy(self, tablet_id: int, row: bytes, col: bytes | None) -> bool:
        """Does a write in flight hold this cell (col None: any cell of the row)?
        A write holds its cell, DELROW its whole row, from the condition
        check until it is answered."""
        if (tablet_id, row, None) in self._cells:
            return True
        if col is None:
            return (tablet_id, row) in self._row_writes
        return (tablet_id, row, col) in self._cells

    def park(self, conn: Conn, tablet_id: int, row: bytes):
        """The cell is held by a write in flight: dispatch this request again
        once a write of its row is answered."""
        key = (tablet_id, row)
        self._row_waiters.setdefault(key, collections.deque()).append(conn)
        conn.parked_on = key        # _advance keeps the request in conn.parked
        return LATER

    def wait_for_memory(self, conn: Conn):
        """The memtables are far over budget: try again shortly. After
        MEMORY_WAIT_S the write goes ahead anyway (returns None)."""
        now = time.monotonic()
        if not conn.memory_since:
            conn.memory_since = now
        elif now - conn.memory_since > MEMORY_WAIT_S:
            conn.memory_since = 0.0
            return None
        self._memory_waiters.append(conn)
        conn.parked_on = MEMORY
        return LATER

    def begun(self, conn: Conn, tablet, row: bytes, col: bytes | None, handle):
        """A write's record is enqueued: hold its cell (or row), answer when done."""
        conn.memory_since = 0.0
        key = (tablet.id, row, col)
        w = Write(conn, tablet, key, handle)
        self._cells[key] = w
        self._row_writes[key[:2]] = self._row_writes.get(key[:2], 0) + 1
        conn.waiting = w
        self._unsynced.append(w)
        return LATER

    def after_sync(self, conn: Conn, fn):
        """A reply made by `fn()` after this turn's sync (a replica's ACK once
        the Append's records are durable), in its place among the
        connection's replies; the connection goes on meanwhile."""
        d = Deferred()
        conn.deferred += 1
        self._after_sync.append((conn, d, fn))
        return d

    def _sync(self) -> None:
        """Step 3: make the turn's writes (and a replica's appends) durable:
        the first wait leads one group flush of every dirty tablet log, on
        this thread (what arrives meanwhile waits in the sockets and makes
        the next turn's batch bigger; a sync thread beside the loop was
        measured slower: smaller batches, and hand-offs between threads).
        Without group commit each write is synced by itself."""
        writes, self._unsynced = self._unsynced, []
        appends, self._after_sync = self._after_sync, []
        for conn, d, fn in appends:
            try:
                d.data = fn()
            except Exception as e:
                d.data = self.server.error_reply(conn, "REPL", e)
                conn.closing = True
            conn.deferred -= 1
            conn.out_bytes += len(d.data)
            if not conn.closed:
                if not conn.deferred and conn.parked_on == APPENDS:
                    conn.parked_on = None
                self._runnable.append(conn)
        self._step(writes, self.server.writer.durable)

    def _settle(self) -> None:
        writes, self._unsettled = self._unsettled, []
        self._step(writes, self.server.writer.settle)

    def _step(self, writes: list[Write], step) -> None:
        """Ask `step` (writer.durable after the sync, writer.settle after) of
        each write: done -> answer it; not yet -> it waits for its replicas."""
        for w in writes:
            try:
                done = step(w.tablet, w.handle)
            except Exception as e:
                self._done(w, self.server.error_reply(w.conn, "write", e))
                continue
            if done:
                self._done(w, self.server.written(w.tablet))
            else:
                self._unsettled.append(w)

    def _release(self, conns) -> None:
        for conn in conns:
            conn.parked_on = None
            self._runnable.append(conn)

    def _done(self, w: Write, reply) -> None:
        if self._cells.get(w.key) is w:
            del self._cells[w.key]
            row = w.key[:2]
            left = self._row_writes[row] - 1
            if left:
                self._row_writes[row] = left
            else:
                del self._row_writes[row]
        waiters = self._row_waiters.pop(w.key[:2], None)
        if waiters:
            self._release(waiters)
        conn = w.conn
        conn.waiting = None
        if conn.closed:
            return
        self._reply(conn, reply)
        self._runnable.append(conn)

    # -- blocking commands: on a thread of their own ----------------------------------------

    def _detach(self, conn: Conn, ev) -> None:
        """Run a command that may block (replication, WAKE) on its own thread,
        with the socket out of the loop and blocking meanwhile; the command
        may use the socket itself (REPLSTREAM keeps it)."""
        if conn.events:
            self.sel.unregister(conn.sock)
            conn.events = 0
        conn.detached = True
        conn.waiting = LATER
        conn.sock.setblocking(True)

        def run():
            try:
                reply = self.server.dispatch(conn, ev)
            except Exception:
                log.exception("%s: %s failed", self.name, ev.cmd)
                reply, conn.closing = b"", True
            self.call_soon(lambda: self._reattach(conn, reply))

        threading.Thread(target=run, name=f"{self.name}-{ev.cmd.lower()}", daemon=True).start()

    def _reattach(self, conn: Conn, reply) -> None:
        conn.detached = False
        conn.waiting = None
        if self._stopping or conn.closed:
            self._close(conn)
            return
        try:
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        self._reply(conn, reply)
        self._advance(conn)
