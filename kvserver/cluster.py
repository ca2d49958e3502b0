"""Cluster mode of a tablet server: the glue around kvserver/replication.py.

`ClusterNode` plugs into `KVServer` (kvserver/server.py) through its two
seams: it is the server's `role` (may this server serve tablet t now?) and
its `writer` (make an effect durable on every member of the view, then
apply it). It also adds the internal commands replicas answer, and runs four
kinds of background threads (`start` starts heartbeat, control and tick;
each stream has its own):

    heartbeat   every heartbeat_interval_s: HEARTBEAT to the master with, per
                tablet, the epoch and seq of the last log record; the answer
                is every tablet's view, fed to each TabletReplica.set_view.
                An answered heartbeat renews the primary LEASE (below).
    streams     one `PeerStream` per peer server this server leads tablets
                with. Its thread connects and does the handshake; then the
                server's event loop sends the queued REPL requests (coalesced
                per tablet, once per turn, without blocking) and reads the
                answers (fed to TabletReplica.on_reply). The thread sends only
                what the socket could not take at once, and catch-ups
                (records from the log, SNAPCHUNK / SNAPSHOT). On the replica
                the stream is a connection of its event loop: a REPL's
                records are enqueued at once and its ACK goes after the
                turn's sync, which they share with every other write.
    control     view changes the state machine asks for (VIEWCHANGE to the
                master).
    tick        every TICK_S: `TabletReplica.tick()` for every tablet, the
                logical clock that re-probes lagging replicas and times out
                hand-overs.

Locks: one per tablet (`TabletGlue.lock`), held while the state machine runs
and while its actions are carried out: those never do I/O (a Send is a queue
put; master requests go to the control thread), so the lock is never held
across socket or disk I/O. `tablet.submit` (which only enqueues in the log)
runs under it too, so seqs, the log and every peer's stream stay in one order.

The lease. A primary serves (reads and writes) only while its last heartbeat
answered by the master was SENT less than LEASE_FRACTION x failure_timeout_s
ago. The master declares a server dead only after failure_timeout_s without
RECEIVING a heartbeat, so a primary cut off from the master stops serving
before the master can elect another one, and no read can return a value a
new primary has already overwritten.

Unknown outcomes. A write whose record was logged and sent, but whose
primary was deposed before every member acknowledged it, may or may not
survive the failover. Its client gets no reply: the writer raises
`WriteInDoubt` (a DropConnection) and the connection is closed, which the
client reads as "outcome unknown" (src/kvclient.py's `OutcomeUnknown`, a
different class), never `RETRY` (RETRY promises the write was not applied).

Internal commands (docs/replication.md has the grammar):

    REPLSTREAM                                   (once: this connection is a stream)
    REPL <tablet> <epoch> <prev_seq> <prev_epoch> <meta> <value>...
    SNAPCHUNK <tablet> <epoch> <offset> <bytes>
    SNAPSHOT <tablet> <epoch> <seq> <seq_epoch> <ckpt_bytes> <meta> <value>...
      -> +OK ACK <tablet> <epoch> <seq> | +OK GAP <tablet> <epoch> <last_seq> <last_epoch>
       | +OK STALE <tablet> <epoch>
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import selectors
import socket
import threading
import time

from master.placement import initial_views
from src.config import Config, ConfigError
from src.kv import KVError, Moved, Retry
from src.kvclient import split_addr
from src.kvproto import (NEED_DATA, RAW, TEXT, VALUE, CommandSpec, Error, Listing, Ok, ProtocolErrorEvent,
                         ReplyParser, Request, encode_request, error, ok)

from kvserver import replication as rp
from kvserver.server import DropConnection
from kvserver.replication import Append, Record, Snapshot, TabletReplica, View
from kvserver.tablet import Tablet, TabletError
from kvserver.wal import KINDS, Effect, LogRecord

log = logging.getLogger(__name__)

HANDOVER_AFTER_S = 1.0         # a tablet's view must be this old before its primary hands it back
LEASE_FRACTION = 0.75          # of failure_timeout_s, measured from a heartbeat's send time
CONNECT_TIMEOUT_S = 0.5
IO_TIMEOUT_S = 10.0            # a peer or the master silent this long is broken
TICK_S = 0.2                   # the replication state machines' logical clock
MAX_BATCH_RECORDS = 1000       # records per REPL (each is a `{N}` token on the line)
MAX_BATCH_BYTES = 4 << 20      # ... and bytes of values per REPL (one big value may exceed it)
SNAPSHOT_CHUNK = 4 << 20       # bytes of checkpoint file per SNAPCHUNK
LANES = 1                      # streams (connections) per peer; tablet t uses lane t % LANES.
                               # Measured (docs/performance.md): with the replica's batching
                               # stream loop, one stream per peer batches best; 2 and 4 were slower
RECONNECT_S = 0.1
SEND_INLINE_BYTES = 1 << 20    # a bigger batch of REPLs is sent by the stream's thread, not the loop
RECV_BYTES = 256 * 1024
INCOMING = "snapshot.incoming"   # + ".<epoch>": a snapshot being received (SNAPCHUNK)

INTERNAL_COMMANDS = {
    "REPLSTREAM": CommandSpec(()),
    "REPL": CommandSpec((RAW, RAW, RAW, RAW, VALUE, VALUE), variadic=True),
    "SNAPCHUNK": CommandSpec((RAW, RAW, RAW, VALUE)),
    "SNAPSHOT": CommandSpec((RAW, RAW, RAW, RAW, RAW, VALUE, VALUE), variadic=True),
}
BLOCKING_COMMANDS = frozenset(("SNAPCHUNK", "SNAPSHOT"))   # disk-heavy: run off the server's loop
MASTER_INTERNAL = {
    "AUTH": CommandSpec((TEXT,)),
    "HEARTBEAT": CommandSpec((RAW, RAW, RAW, VALUE)),
    "VIEWCHANGE": CommandSpec((RAW, RAW, RAW, RAW, RAW)),
    "BYE": CommandSpec((RAW, RAW)),
}


class WriteInDoubt(DropConnection):
    """A write was logged and sent to the replicas but cannot be settled
    here (its primary was deposed before it committed, or the local log
    failed after sending it): the server closes the client's connection
    instead of replying. Not src/kvclient.py's OutcomeUnknown, which is
    what the client makes of the closed connection."""


# -- the wire form of records (pure) ---------------------------------------------------


def encode_records(recs) -> tuple[bytes, list[bytes]]:
    """(meta, values): meta has one line `seq epoch kind row_hex col_hex` per
    record; each value travels as its own literal (so a 64 MiB cell fits)."""
    lines = []
    values = []
    for r in recs:
        e = r.effect
        lines.append(b"%d %d %d %s %s" % (r.seq, r.epoch, e.kind, e.row.hex().encode(),
                                          e.col.hex().encode() or b"-"))
        values.append(e.value)
    return b"\n".join(lines), values


def decode_records(meta: bytes, values: list[bytes]) -> tuple[Record, ...]:
    """Inverse of encode_records; ValueError for anything malformed."""
    lines = meta.split(b"\n") if meta else []
    if len(lines) != len(values):
        raise ValueError(f"{len(lines)} records but {len(values)} values")
    out = []
    for line, v in zip(lines, values):
        seq, epoch, kind, row, col = line.split(b" ")
        kind = int(kind)
        if kind not in KINDS:
            raise ValueError(f"unknown effect kind {kind}")
        eff = Effect(kind, bytes.fromhex(row.decode()), b"" if col == b"-" else bytes.fromhex(col.decode()),
                     bytes(v))
        out.append(Record(int(seq), int(epoch), eff))
    return tuple(out)


def reply_text(reply: rp.Reply) -> bytes:
    if isinstance(reply, rp.Ack):
        return ok(f"ACK {reply.tablet} {reply.epoch} {reply.seq}")
    if isinstance(reply, rp.Gap):
        return ok(f"GAP {reply.tablet} {reply.epoch} {reply.last_seq} {reply.last_epoch}")
    return ok(f"STALE {reply.tablet} {reply.epoch}")


def parse_reply(text: str) -> rp.Reply:
    f = text.split()
    kind, nums = f[0], [int(x) for x in f[1:]]
    if kind == "ACK" and len(nums) == 3:
        return rp.Ack(*nums)
    if kind == "GAP" and len(nums) == 4:
        return rp.Gap(*nums)
    if kind == "STALE" and len(nums) == 2:
        return rp.Stale(*nums)
    raise ValueError(f"bad replication reply {text!r}")


def _refused_epoch(reply) -> int | None:
    """The view's epoch named by a refused VIEWCHANGE (`-ERR RETRY ... (current
    epoch E)`), or None: the outcome is unknown. Only that answer proves the
    master changed nothing; no answer, or any other (`-ERR INTERNAL` when the
    change raised, say after its state file was renamed in), may come from a
    change that was applied, and treating it as a refusal would stop counting
    a peer the view may already hold as a member."""
    if not isinstance(reply, Error) or reply.code != "RETRY":
        return None
    marker = "current epoch "
    i = reply.text.rfind(marker)
    if i >= 0:
        digits = reply.text[i + len(marker):].rstrip(")").strip()
        if digits.isdigit():
            return int(digits)
    return None


def parse_view(line: str) -> View:
    t, e, p, m, r = line.split()
    return View(int(t), int(e), None if p == "-" else p, () if m == "-" else tuple(m.split(",")),
                tuple(r.split(",")))


# -- a blocking client connection (master requests) ----------------------------------------


class Conn:
    """One request at a time over a socket (heartbeats, view changes)."""

    def __init__(self, addr: str, secret: str, timeout: float = IO_TIMEOUT_S):
        self.sock = socket.create_connection(split_addr(addr), timeout=CONNECT_TIMEOUT_S)
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ReplyParser()
        if secret:
            r = self.call("AUTH", secret)
            if isinstance(r, Error):
                raise ConnectionError(f"AUTH refused: {r.code} {r.text}")

    def call(self, cmd, *args):
        self.sock.sendall(b"".join(bytes(b) for b in encode_request(cmd, *args, commands=MASTER_INTERNAL)))
        while True:
            ev = self.parser.next_event()
            if ev is not NEED_DATA:
                return ev
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.parser.feed(data)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# -- per tablet ------------------------------------------------------------------------------


class TabletGlue:
    """One tablet's state in cluster mode: the store, its replication state
    machine, and what the glue tracks around it.

    `lock` is the tablet's lock of the module docstring: held while `sm` runs
    and its actions are carried out, and while `tablet.submit` enqueues, so
    seqs, the log and every stream stay in one order; never across I/O.
    Everything below is read and written under it. `view_since` moves when
    `_set_view` sees a new epoch from the master, not when a message's newer
    epoch deposes this primary (`_adopt`): it only times hand-overs, which
    only a primary begins."""

    def __init__(self, tablet: Tablet, me: str):
        self.tablet = tablet
        self.sm = TabletReplica(tablet.id, me, last_seq=tablet.last_seq, last_epoch=tablet.epoch)
        self.lock = threading.Lock()
        self.aborted: set[int] = set()
        self.inflight: dict = {}          # seq -> Pending: proposed here, not yet applied
        self.installing = False           # a snapshot is being installed (outside the lock)
        self.view_since = 0.0             # monotonic time of the last new epoch seen here

# -- the stream to one peer ------------------------------------------------------------------


class PeerStream:
    """Ordered, pipelined stream of replication messages to one peer server.

    The stream's own thread connects (and reconnects), does the handshake,
    and then hands the socket to the server's event loop, which from then on
    reads the peer's answers (`_on_readable`, fed to the state machines on
    the loop's thread) and sends queued messages once per turn (`flush`,
    without blocking: before the loop's own sync, so the replicas' syncs and
    ours overlap). When the socket cannot take a whole batch, or a catch-up
    must read the log or a snapshot, the thread takes over sending (`owner`
    "thread") until the queue is empty again. Sends stay in queue order.
    """

    def __init__(self, node: "ClusterNode", peer: str, addr: str, lane: int):
        self.node = node
        self.peer = peer
        self.addr = addr
        self.lane = lane
        self.q: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.connected = False
        self.sock: socket.socket | None = None
        self.owner = "loop"             # who sends what is queued: "loop" or "thread"
        self.flush_due = False          # a flush is scheduled on the loop
        self.parser = ReplyParser()
        self.released = threading.Event()   # the loop let go of the socket
        self.down_since = time.monotonic()
        self.was_up = False
        # Since when the peer owes an answer: the first send after its last
        # reply (0: it owes none; an idle stream is not a dead one). Not the
        # last send: the state machine re-probes a lagging peer every 0.6 s,
        # and a peer that takes the bytes and never answers (its heartbeats
        # go on, its loop or disk is stuck) would never count as silent.
        self.owed_since = 0.0
        self.thread = threading.Thread(target=self._run, name=f"stream-{peer}-{lane}", daemon=True)
        self.thread.start()

    @property
    def loop(self):
        return self.node.server.loop

    def put(self, item) -> None:
        """Queue a message (any thread). Nothing is queued while disconnected:
        the state machines probe anew when the stream comes up."""
        with self.cv:
            if not self.connected:
                return
            self.q.append(item)
            if self.owner == "thread":
                self.cv.notify()
                return
            if self.flush_due:
                return
            self.flush_due = True
        self.loop.flush_soon(self)

    # -- on the loop's thread ---------------------------------------------------------------

    def flush(self) -> None:
        """Send what is queued without blocking; what does not fit, and any
        catch-up, goes to the stream's thread."""
        with self.cv:
            self.flush_due = False
            if self.owner != "loop" or not self.connected or not self.q:
                return
            items = list(self.q)
            self.q.clear()
            if any(it[0] == "catchup" for it in items):
                self._to_thread(items)
                return
        bufs = []
        for item in _coalesce(items):
            bufs += _encode_msg(item[1])
        if sum(len(b) for b in bufs) > SEND_INLINE_BYTES:
            # big values: no copy into one buffer, no long send on the loop
            self._to_thread([("raw", b) for b in bufs])
            return
        data = b"".join(bufs)
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._broken(e)
            return
        self.owed_since = self.owed_since or time.monotonic()
        if n < len(data):
            self._to_thread([("raw", memoryview(data)[n:])])

    def _to_thread(self, first: list) -> None:
        """The stream's thread sends from now on, starting with `first`
        (ahead of anything queued meanwhile)."""
        with self.cv:
            self.q.extendleft(reversed(first))
            self.owner = "thread"
            self.cv.notify()

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._broken(e)
            return
        if not data:
            self._broken(ConnectionError(f"{self.peer} closed the stream"))
            return
        self.owed_since = 0.0
        self.parser.feed(data)
        try:
            while (ev := self.parser.next_event()) is not NEED_DATA:
                if isinstance(ev, Ok) and ev.word == "OK" and ev.text:
                    if ev.text.startswith(("ACK", "GAP", "STALE")):
                        self.node.on_reply(self.peer, parse_reply(ev.text))
                    continue
                if isinstance(ev, Error):
                    raise ConnectionError(f"{self.peer} refused: {ev.code} {ev.text}")
        except (ValueError, ConnectionError) as e:
            self._broken(e)

    def _attach(self, sock) -> None:
        if self.sock is not sock or not self.connected:
            self.released.set()
            return
        self.loop.watch(sock, self._on_readable)
        self.flush()

    def _release(self, sock) -> None:
        self.loop.unwatch(sock)
        self.released.set()

    def _broken(self, e) -> None:
        if not self.node.stopped.is_set():
            log.info("stream to %s broke: %s", self.peer, e)
        with self.cv:
            self.connected = False
            self.cv.notify_all()

    # -- on the stream's thread ---------------------------------------------------------------

    def _run(self) -> None:
        stop = self.node.stopped
        while not stop.is_set():
            try:
                sock = socket.create_connection(split_addr(self.addr), timeout=CONNECT_TIMEOUT_S)
            except OSError:
                self._failed(connect=True)
                stop.wait(RECONNECT_S)
                continue
            sock.settimeout(IO_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            attached = False
            try:
                self._handshake(sock)
                sock.setblocking(False)
                self.parser = ReplyParser()
                self.released.clear()
                with self.cv:
                    self.q.clear()          # the state machines probe anew on connect
                    self.sock, self.owner, self.flush_due = sock, "loop", False
                    self.connected, self.was_up = True, True
                self.loop.call_soon(lambda: self._attach(sock))
                attached = True
                self.node.peer_up(self.peer, self.lane)
                self._send_loop(sock)
            except (OSError, ValueError, TabletError, ConnectionError) as e:
                if not stop.is_set():
                    log.info("stream to %s broke: %s", self.peer, e)
            finally:
                with self.cv:
                    self.connected = False
                    self.q.clear()
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                if attached:
                    # the loop watches the socket: it lets go before we close it
                    self.loop.call_soon(lambda: self._release(sock))
                    self.released.wait(2)
                sock.close()
                self.down_since = time.monotonic()
            self._failed(connect=False)
            stop.wait(RECONNECT_S)

    def _handshake(self, sock) -> None:
        """AUTH (with a secret), then REPLSTREAM; both answered before anything else is sent."""
        reqs = [("AUTH", self.node.secret)] if self.node.secret else []
        reqs.append(("REPLSTREAM",))
        parser = ReplyParser()
        for req in reqs:
            sock.sendall(b"".join(encode_request(*req, commands={**INTERNAL_COMMANDS, **MASTER_INTERNAL})))
            while (ev := parser.next_event()) is NEED_DATA:
                data = sock.recv(4096)
                if not data:
                    raise ConnectionError(f"{self.peer} closed the stream during the handshake")
                parser.feed(data)
            if isinstance(ev, Error):
                raise ConnectionError(f"{self.peer} refused {req[0]}: {ev.code} {ev.text}")

    def _failed(self, connect: bool) -> None:
        # A connection that broke: at once. One that never came up: only after
        # the failure timeout (peers start one by one; let the master decide first).
        if not connect or self.was_up or time.monotonic() - self.down_since > self.node.cc.failure_timeout_s:
            self.was_up = False
            self.node.peer_down(self.peer, self.lane)

    def _send_loop(self, sock) -> None:
        """While connected: send what the loop handed over (owner "thread"),
        blocking as long as the peer needs, then give sending back; and
        watch for a peer that stopped answering."""
        stop = self.node.stopped
        while not stop.is_set():
            with self.cv:
                while self.connected and not stop.is_set() and not (self.owner == "thread" and self.q):
                    if self.owner == "thread":
                        self.owner = "loop"     # all sent: the loop sends again
                    self.cv.wait(0.5)
                    if self.owed_since and time.monotonic() - self.owed_since > IO_TIMEOUT_S:
                        raise TimeoutError(f"{self.peer} did not answer for {IO_TIMEOUT_S:.0f}s")
                if not self.connected or stop.is_set():
                    return
                items = list(self.q)
                self.q.clear()
            bufs: list = []
            for item in _coalesce(items):
                if item[0] == "catchup":
                    _sendall(sock, bufs)      # what was queued before goes first
                    bufs = self.node.catch_up_bufs(self.peer, *item[1:], send=lambda b: _sendall(sock, b))
                elif item[0] == "raw":
                    bufs.append(item[1])
                else:
                    bufs += _encode_msg(item[1])
                if sum(len(b) for b in bufs) > MAX_BATCH_BYTES:
                    _sendall(sock, bufs)
                    bufs = []
            if bufs:
                _sendall(sock, bufs)
            # A long send (a catch-up, big values) was progress the peer made
            # (a stuck one stops taking bytes, and _sendall gives up): its
            # answer is owed from the end of the send.
            self.owed_since = time.monotonic()


def _sendall(sock, bufs) -> None:
    """Send every buffer on a non-blocking socket, waiting for room (at most
    IO_TIMEOUT_S at a time)."""
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        for b in _joined(bufs):
            view = memoryview(b)
            while view:
                try:
                    n = sock.send(view)
                except (BlockingIOError, InterruptedError):
                    if not sel.select(IO_TIMEOUT_S):
                        raise TimeoutError("the peer took nothing for too long") from None
                    continue
                view = view[n:]


def _joined(bufs):
    """Small buffers joined, big ones alone (no copy)."""
    small = []
    for b in bufs:
        if len(b) < 65536:
            small.append(b)
        else:
            if small:
                yield b"".join(small)
                small = []
            yield b
    if small:
        yield b"".join(small)


def _coalesce(items):
    """Merge each tablet's queued Appends that follow one another into one
    (fewer requests, one fsync on the replica). Per tablet the order is kept;
    a catch-up item stays in its tablet's place. Raw bytes (the unsent rest
    of an earlier batch) go first, as they came."""
    raw = [it for it in items if it[0] == "raw"]
    per: dict[int, list] = {}
    for it in items:
        if it[0] == "raw":
            continue
        tid = it[1].tablet if it[0] == "msg" else it[1]
        out = per.setdefault(tid, [])
        if it[0] == "msg" and isinstance(it[1], Append) and out and out[-1][0] == "msg":
            prev = out[-1][1]
            m = it[1]
            if (isinstance(prev, Append) and prev.epoch == m.epoch and prev.records and m.records
                    and prev.records[-1].seq == m.prev_seq and prev.records[-1].epoch == m.prev_epoch
                    and len(prev.records) < MAX_BATCH_RECORDS):
                out[-1] = ("msg", Append(m.tablet, m.epoch, prev.prev_seq, prev.prev_epoch, prev.records + m.records))
                continue
        out.append(it)
    return raw + [it for out in per.values() for it in out]


def _encode_msg(m) -> list:
    """A REPL request as buffers. Written out by hand (it is the hot path):
    the same bytes `encode_request` would make, every value a literal."""
    if not isinstance(m, Append):
        raise TypeError(m)
    meta, values = encode_records(m.records)
    line = b"REPL %d %d %d %d {%d}%s\r\n" % (m.tablet, m.epoch, m.prev_seq, m.prev_epoch, len(meta),
                                              b"".join(b" {%d}" % len(v) for v in values))
    out = [line, meta, b"\r\n"]
    for v in values:
        out += (v, b"\r\n")
    return out


class StreamReader:
    """The replica's parser for a replication stream (pure): `feed(bytes)`,
    then `next()` -> (CMD, args) or None for "need more". Stricter and much
    cheaper than the general request parser, for traffic only our own
    PeerStream sends: every line and literal ends in CRLF; a token `{N}` is a
    literal of N bytes (its bytes replace it in args), any other token is
    passed as a str. ValueError for anything else (the stream is then closed)."""

    ARITY = {"REPL": 5, "SNAPCHUNK": 4, "SNAPSHOT": 6}     # the least arguments of each command

    def __init__(self, max_literal: int, max_line: int = 65536):
        self.max_literal = max_literal
        self.max_line = max_line
        self.buf = bytearray()
        self.pos = 0
        self.closed = False

    @property
    def buffered(self) -> int:
        return len(self.buf) - self.pos

    def next_event(self):
        """The server's RequestParser interface, for a connection that became
        a stream: a `Request`, NEED_DATA, or a closing ProtocolErrorEvent for
        anything but REPL / SNAPCHUNK / SNAPSHOT with their least arities,
        or bytes `next()` refuses."""
        if self.closed:
            return NEED_DATA
        try:
            req = self.next()
        except ValueError as e:
            self.closed = True
            return ProtocolErrorEvent("BADREQ", str(e), close=True)
        if req is None:
            return NEED_DATA
        cmd, args = req
        if len(args) < self.ARITY.get(cmd, len(args) + 1):
            self.closed = True
            return ProtocolErrorEvent("BADREQ", f"{cmd} on a replication stream", close=True)
        return Request(cmd, args)

    def feed(self, data) -> None:
        if self.closed:
            return
        if self.pos and self.pos >= len(self.buf) // 2:
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def next(self):
        buf, pos = self.buf, self.pos
        nl = buf.find(b"\r\n", pos)
        if nl < 0:
            if len(buf) - pos > self.max_line:
                raise ValueError("replication request line too long")
            return None
        toks = bytes(buf[pos:nl]).split()
        if not toks:
            raise ValueError("empty line on a replication stream")
        at = nl + 2
        args = []
        for t in toks[1:]:
            if t[:1] == b"{" and t[-1:] == b"}":
                n = int(t[1:-1])
                if not 0 <= n <= self.max_literal:
                    raise ValueError(f"literal of {n} bytes on a replication stream")
                if len(buf) < at + n + 2:
                    return None
                if buf[at + n:at + n + 2] != b"\r\n":
                    raise ValueError("literal not followed by CRLF")
                args.append(bytes(buf[at:at + n]))
                at += n + 2
            else:
                args.append(t.decode("latin-1"))
        self.pos = at
        return toks[0].decode("latin-1").upper(), args


# -- the node --------------------------------------------------------------------------------


class ClusterNode:
    """The server's role and writer in cluster mode (see the module docstring)."""

    def __init__(self, cfg: Config, node_id: str):
        self.cfg = cfg
        self.cc = cfg.cluster
        self.me = node_id
        self.secret = self.cc.secret
        self.addrs = {n.id: n.addr for n in cfg.kvservers}
        ids = [n.id for n in cfg.kvservers]
        views = initial_views(ids, self.cc.tablets, self.cc.replication)
        self.tablet_ids = sorted(t for t, v in views.items() if node_id in v.replicas)
        self.server = None
        self.glue: dict[int, TabletGlue] = {}
        self.views: dict[int, View] = {}                 # the master's word on every tablet
        self.lease_until = 0.0
        self.boot = ""
        self.stopped = threading.Event()
        self.stopped.set()
        self.streams: dict[str, PeerStream] = {}
        self._streams_lock = threading.Lock()
        self._requests: collections.deque = collections.deque()
        self._requests_cv = threading.Condition()
        self._beat_now = threading.Event()
        self._threads: list[threading.Thread] = []
        self._masters: dict[str, Conn] = {}          # one connection per thread that calls the master

    # -- life cycle --------------------------------------------------------------------

    def attach(self, server) -> None:
        self.server = server

    def start(self, store) -> None:
        """Begin (or, after WAKE, begin again) with a freshly recovered store."""
        self.boot = secrets.token_hex(8)
        self.glue = {tid: TabletGlue(store.tablet(tid), self.me) for tid in self.tablet_ids}
        self.lease_until = 0.0
        self.stopped = threading.Event()
        self.streams = {}
        self._requests.clear()
        self._threads = [threading.Thread(target=f, name=n, daemon=True) for f, n in
                         ((self._heartbeat_loop, "heartbeat"), (self._control_loop, "control"),
                          (self._tick_loop, "tick"))]
        for t in self._threads:
            t.start()

    def stop(self, bye: bool = False) -> None:
        self.stopped.set()
        self._beat_now.set()
        with self._requests_cv:
            self._requests_cv.notify_all()
        self._writes_may_settle()      # writes in flight end as "outcome unknown"
        with self._streams_lock:
            streams = list(self.streams.values())
        for s in streams:
            with s.cv:
                s.connected = False
                s.cv.notify_all()
                sock = s.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(3)
        for s in streams:
            s.thread.join(3)
        if bye:
            try:
                c = Conn(self.cfg.master.addr, self.secret, timeout=1.0)
                c.call("BYE", self.me, self.boot)
                c.close()
            except (OSError, ConnectionError):
                pass
        for c in list(self._masters.values()):
            c.close()
        self._masters = {}

    # role seam (KVServer) -----------------------------------------------------------------

    def on_kill(self) -> None:
        self.stop(bye=True)

    def on_wake(self, store) -> None:
        self.start(store)

    def role_of(self, tid: int) -> str:
        g = self.glue.get(tid)
        if g is None or self.stopped.is_set():
            return "none"
        sm = g.sm
        if sm.is_primary:
            return "primary"
        if sm.view is not None and self.me in sm.view.members:
            return "secondary"
        return "recovering"

    def check(self, tid: int) -> None:
        """May this server serve tablet `tid` now? Raises Moved or Retry if not."""
        if self.stopped.is_set():
            # Stopping (KILL, SIGTERM): BYE may already have made the master
            # fail over, while the lease from the last heartbeat still runs.
            raise Retry("stopping")
        g = self.glue.get(tid)
        if g is None:
            v = self.views.get(tid)
            if v is not None and v.primary:
                raise Moved(tid, self.addrs[v.primary])
            raise Retry(f"tablet {tid} is not held here")
        sm = g.sm
        if not sm.is_primary:
            v = sm.view
            if v is not None and v.primary and v.primary != self.me:
                raise Moved(tid, self.addrs[v.primary])
            raise Retry(f"tablet {tid} has no primary (election)")
        if not sm.ready:
            raise Retry(f"tablet {tid}: new primary syncing its replicas")
        if time.monotonic() >= self.lease_until:
            raise Retry(f"tablet {tid}: no lease from the master")

    # writer seam (KVServer) ----------------------------------------------------------------

    def begin(self, tablet: Tablet, effect: Effect):
        """Number and log `effect` locally and send it to the view's other
        members; nothing here waits. The handle is for durable/settle."""
        g = self.glue[tablet.id]
        with g.lock:
            self.check(tablet.id)
            try:
                rec, actions = g.sm.propose(effect)
            except (rp.NotPrimary, rp.NotReady) as e:
                raise Retry(str(e)) from None
            tablet.epoch = rec.epoch
            p = tablet.submit(effect)
            if p.record.seq != rec.seq:      # cannot be: both advance together under g.lock
                raise TabletError(f"tablet {tablet.id}: seq {p.record.seq} != {rec.seq}")
            g.inflight[rec.seq] = p
            self._act(g, actions)
        return g, p

    def durable(self, tablet: Tablet, handle) -> bool:
        """Wait for the local log (the server's group flush) and tell the state
        machine; then as settle()."""
        g, p = handle
        try:
            tablet.wait_durable(p)
        except TabletError as e:
            # The local log failed or was dropped (KILL) after the record went
            # to the replicas: it may survive there, so no RETRY (which says
            # "not applied"): the outcome is unknown.
            raise WriteInDoubt(f"tablet {tablet.id} seq {p.record.seq}: {e}") from None
        with g.lock:
            self._act(g, g.sm.local_durable(p.record.seq))
        return self.settle(tablet, handle)

    def settle(self, tablet: Tablet, handle) -> bool:
        """True once every member of the view has the record (it is then
        applied); False while some have yet to acknowledge it; WriteInDoubt
        if this server stopped being its primary first."""
        g, p = handle
        seq = p.record.seq
        with g.lock:
            committed = g.sm.commit >= seq and seq not in g.aborted
            if (not committed and seq not in g.aborted and g.sm.is_primary
                    and not self.stopped.is_set()):
                return False
            g.aborted.discard(seq)
            # Applied under g.lock (a memtable update, no I/O), so a record from
            # a newer primary can never be applied before this older one.
            # Applied either way: it is in the local log, and memtable = log is
            # what a replica keeps (a later re-sync replaces a divergent tail).
            if g.inflight.pop(seq, None) is not None:
                tablet.apply(p)
        if not committed:
            raise WriteInDoubt(f"tablet {tablet.id} seq {seq}: primary deposed before commit")
        return True

    # -- actions -------------------------------------------------------------------------

    def _act(self, g: TabletGlue, actions) -> None:
        """Carry out a state machine's actions. Caller holds g.lock; no I/O here."""
        for a in actions:
            if isinstance(a, rp.Send):
                self.stream(a.peer, g.tablet.id).put(("msg", a.msg))
            elif isinstance(a, rp.Committed):
                self._writes_may_settle()
            elif isinstance(a, rp.Aborted):
                # Deposed: apply what is pending now, in seq order, before any
                # record of the new primary can be (see settle()).
                for seq in a.seqs:
                    p = g.inflight.pop(seq, None)
                    if p is not None:
                        g.tablet.apply(p)
                g.aborted.update(a.seqs)
                self._writes_may_settle()
            elif isinstance(a, rp.CatchUp):
                self.stream(a.peer, g.tablet.id).put(("catchup", g.tablet.id, a.after_seq, a.after_epoch))
            elif isinstance(a, (rp.AskRemove, rp.AskAdmit, rp.AskHandover)):
                with self._requests_cv:
                    self._requests.append((g.tablet.id, a))
                    self._requests_cv.notify()
            elif isinstance(a, rp.RefreshView):
                self._beat_now.set()

    def _writes_may_settle(self) -> None:
        """Commits advanced or writes were aborted: the server's loop asks settle() again."""
        if self.server is not None:
            self.server.wake()

    def stream(self, peer: str, tablet: int) -> PeerStream:
        """The stream that carries `tablet`'s messages to `peer` (started on first use)."""
        key = (peer, tablet % LANES)
        with self._streams_lock:
            s = self.streams.get(key)
            if s is None:
                s = self.streams[key] = PeerStream(self, peer, self.addrs[peer], key[1])
            return s

    def peer_up(self, peer: str, lane: int) -> None:
        for g in self._lane(lane):
            with g.lock:
                if g.sm.is_primary and peer in g.sm.peers:
                    self._act(g, g.sm.peer_up(peer))

    def peer_down(self, peer: str, lane: int) -> None:
        for g in self._lane(lane):
            with g.lock:
                if g.sm.is_primary and peer in g.sm.peers:
                    self._act(g, g.sm.peer_down(peer))

    def _lane(self, lane: int) -> list[TabletGlue]:
        return [g for tid, g in self.glue.items() if tid % LANES == lane]

    def on_reply(self, peer: str, reply: rp.Reply) -> None:
        g = self.glue.get(reply.tablet)
        if g is None:
            return
        with g.lock:
            self._act(g, g.sm.on_reply(peer, reply))

    def _set_view(self, v: View) -> None:
        self.views[v.tablet] = v
        g = self.glue.get(v.tablet)
        if g is None:
            return
        with g.lock:
            was = g.sm.role
            if v.epoch > g.sm.epoch:
                g.view_since = time.monotonic()
            self._act(g, g.sm.set_view(v))
            if g.sm.is_primary:
                if was != rp.PRIMARY:
                    log.info("tablet %d: primary at epoch %d (members %s)", v.tablet, v.epoch, ",".join(v.members))
                for p, peer in g.sm.peers.items():
                    if peer.state == rp.CONNECTING:
                        s = self.stream(p, v.tablet)
                        if s.connected:
                            self._act(g, g.sm.peer_up(p))
            elif was == rp.PRIMARY:
                log.info("tablet %d: no longer primary (epoch %d, primary %s)", v.tablet, v.epoch, v.primary)

    # -- catch-up (on the stream's thread) ------------------------------------------------

    def catch_up_bufs(self, peer: str, tid: int, after_seq: int, after_epoch, send) -> list:
        """Buffers that bring `peer`'s copy of tablet `tid` up to this log:
        the records after its last one, or a snapshot. Tells the state machine."""
        g = self.glue[tid]
        t = g.tablet
        with g.lock:
            epoch = g.sm.epoch
            if not g.sm.is_primary:
                return []
        recs = t.records_after(after_seq - 1) if after_seq > 0 else t.records_after(0)
        usable = recs is not None and (after_seq == 0 or (
            recs and recs[0].seq == after_seq and (after_epoch is None or recs[0].epoch == after_epoch)))
        bufs: list = []
        if usable:
            if after_seq > 0:
                prev_epoch = recs[0].epoch
                recs = recs[1:]
            else:
                prev_epoch = 0
            prev = after_seq
            for i in range(0, len(recs), MAX_BATCH_RECORDS):
                chunk = recs[i:i + MAX_BATCH_RECORDS]
                bufs += _encode_msg(Append(tid, epoch, prev, prev_epoch, tuple(chunk)))
                prev, prev_epoch = chunk[-1].seq, chunk[-1].epoch
                if sum(len(b) for b in bufs) > MAX_BATCH_BYTES:
                    send(bufs)
                    bufs = []
            upto = (prev, prev_epoch)
        else:
            snap = t.snapshot()
            base_epoch = snap.checkpoint.last_epoch if snap.checkpoint is not None else 0
            total = 0
            for chunk in snap.checkpoint_chunks(SNAPSHOT_CHUNK):
                send(encode_request("SNAPCHUNK", tid, epoch, total, chunk, commands=INTERNAL_COMMANDS))
                total += len(chunk)
            recs = snap.records
            last = (recs[-1].seq, recs[-1].epoch) if recs else (snap.last_seq, base_epoch)
            meta, values = encode_records(recs)
            bufs += encode_request("SNAPSHOT", tid, epoch, last[0], last[1], total, meta, *values,
                                   commands=INTERNAL_COMMANDS)
            upto = last
            log.info("tablet %d: sending %s a snapshot (seq %d, %d checkpoint bytes)", tid, peer, last[0], total)
        with g.lock:
            actions = g.sm.caught_up(peer, *upto)
            # what the state machine sends now must follow the catch-up: same stream, in order
            for a in actions:
                if isinstance(a, rp.Send):
                    bufs += _encode_msg(a.msg)
            self._act(g, [a for a in actions if not isinstance(a, rp.Send)])
        return bufs

    # -- internal commands (replica side) ------------------------------------------------------

    def _glue_for(self, tablet: str) -> TabletGlue:
        if self.stopped.is_set() or self.server is None or self.server.state != "serving":
            raise Retry("not serving")
        if not tablet.isdigit() or int(tablet) not in self.glue:
            raise Retry(f"tablet {tablet} is not held here")
        return self.glue[int(tablet)]

    def cmd_REPL(self, conn, tablet, epoch, prev_seq, prev_epoch, meta, *values):
        """Enqueue an Append's records in the local logs now; its ACK goes once
        they are durable, after the server loop's flush of this turn (shared
        with the turn's other appends and writes). The loop keeps a stream's
        replies in order."""
        try:
            g, pend, reply = self._submit_append(tablet, epoch, prev_seq, prev_epoch, meta, values)
        except (KVError, TabletError, ValueError) as e:
            conn.closing = True       # the stream is out of step with this replica: answer, end it
            return error("RETRY", str(e))
        return self.server.loop.after_sync(conn, lambda: self._appended(g, pend, reply))

    def append_now(self, tablet, epoch, prev_seq, prev_epoch, meta, *values) -> bytes:
        """cmd_REPL without a connection or a loop: returns once durable.
        For tests (tests/test_cluster_adversarial.py); the server's own REPL
        path is cmd_REPL."""
        g, pend, reply = self._submit_append(tablet, epoch, prev_seq, prev_epoch, meta, values)
        return self._appended(g, pend, reply)

    def _appended(self, g: TabletGlue, pend, reply) -> bytes:
        """Wait until the Append's records are durable, then apply them in
        order; only then may the ACK go. The server's tablet logs share one
        commit group, so the first wait is the turn's one sync (with group
        commit off each record is synced by itself)."""
        for p in pend:
            g.tablet.wait_durable(p)
        for p in pend:
            g.tablet.apply(p)
        return reply_text(reply)

    def _submit_append(self, tablet, epoch, prev_seq, prev_epoch, meta, values):
        """Check an Append against the state machine and enqueue its records
        in the local log (not yet durable): (glue, pendings, reply)."""
        g = self._glue_for(tablet)
        t = g.tablet
        msg = Append(t.id, int(epoch), int(prev_seq), int(prev_epoch), decode_records(meta, list(values)))
        with g.lock:
            if g.installing:
                # The state machine already describes the snapshot, the tablet
                # not yet: records now would be numbered by the old tablet and
                # then wiped by the install. The stream is refused and re-probed.
                raise Retry(f"tablet {t.id}: installing a snapshot")
            recs, reply = g.sm.on_append(msg)
            self._act(g, g.sm.take_aborted())
            pend = []
            for r in recs:
                t.epoch = r.epoch
                pend.append(t.submit(r.effect))
        return g, pend, reply

    def cmd_REPLSTREAM(self, conn, *args):
        """A primary's stream: from here on this connection carries only
        replication requests, parsed by the leaner `StreamReader`. The
        primary sends nothing after REPLSTREAM until it is answered, so
        nothing is left in the general parser."""
        if self.stopped.is_set():
            raise Retry("not serving")
        conn.parser = StreamReader(self.cfg.storage.max_cell_bytes)
        return ok("streaming")

    def _snapshot_command(self, handler):
        """SNAPCHUNK / SNAPSHOT (run on a thread of their own, after the
        stream's earlier appends are durable): an error ends the stream."""
        def run(conn, *args):
            try:
                return handler(conn, *args)
            except (KVError, TabletError, ValueError) as e:
                if conn is not None:
                    conn.closing = True
                return error("RETRY", str(e))
        return run

    @staticmethod
    def _incoming(t: Tablet, epoch) -> str:
        """Where a snapshot of `epoch` is written: one file per epoch, so the
        chunks of a deposed primary's snapshot (its stream may still be
        sending during a failover) never mix with the new primary's."""
        return os.path.join(t.path, f"{INCOMING}.{int(epoch)}")

    def _drop_incoming(self, t: Tablet, up_to_epoch: int) -> None:
        """Remove the snapshot files of epochs up to `up_to_epoch` (used or stale)."""
        for name in os.listdir(t.path):
            stem, _, ep = name.rpartition(".")
            if stem == INCOMING and ep.isdigit() and int(ep) <= up_to_epoch:
                try:
                    os.unlink(os.path.join(t.path, name))
                except FileNotFoundError:
                    pass

    def cmd_SNAPCHUNK(self, conn, tablet, epoch, offset, data):
        g = self._glue_for(tablet)
        with g.lock:
            if int(epoch) < g.sm.epoch:         # rule 1, as for REPL and SNAPSHOT
                raise Retry(f"tablet {g.tablet.id}: a snapshot of epoch {epoch}, older than {g.sm.epoch}")
        path = self._incoming(g.tablet, epoch)
        off = int(offset)
        with open(path, "r+b" if off else "wb") as f:
            f.seek(off)
            f.write(data)
        return ok()

    def cmd_SNAPSHOT(self, conn, tablet, epoch, seq, seq_epoch, total, meta, *values):
        g = self._glue_for(tablet)
        t = g.tablet
        recs = decode_records(meta, list(values))
        path = self._incoming(t, epoch)
        size = int(total)
        chunks = []
        if size:
            try:
                with open(path, "rb") as f:
                    data = f.read(size + 1)
            except FileNotFoundError:
                data = b""
            if len(data) != size:
                raise Retry(f"snapshot of tablet {t.id}: {len(data)} checkpoint bytes, expected {size}")
            chunks = [data]
        msg = Snapshot(t.id, int(epoch), int(seq), int(seq_epoch))
        with g.lock:
            if g.installing:
                raise Retry(f"tablet {t.id}: installing a snapshot")
            install, reply = g.sm.on_snapshot(msg)
            self._act(g, g.sm.take_aborted())
            g.installing = install
        if install:
            # Outside the tablet lock (disk I/O; heartbeats must not wait on
            # it). Meanwhile `installing` refuses every other stream's records
            # for this tablet (a newer primary's may arrive during a failover).
            try:
                t.install_snapshot(chunks, [LogRecord(r.seq, r.epoch, r.effect) for r in recs])
            except Exception:
                with g.lock:       # the state machine must describe the log as it is
                    g.sm.last_seq, g.sm.last_epoch = t.last_seq, t.epoch
                raise
            finally:
                with g.lock:
                    g.installing = False
            if t.last_seq != msg.seq:
                log.error("tablet %d: snapshot ended at seq %d, expected %d", t.id, t.last_seq, msg.seq)
            log.info("tablet %d: installed a snapshot up to seq %d", t.id, t.last_seq)
        self._drop_incoming(t, int(epoch))
        return reply_text(reply)

    # -- heartbeats and the master ------------------------------------------------------------

    def _master_call(self, which: str, cmd, *args):
        """One request to the master on this thread's own connection (`which`)."""
        c = self._masters.get(which)
        if c is None:
            c = self._masters[which] = Conn(self.cfg.master.addr, self.secret)
        try:
            return c.call(cmd, *args)
        except (OSError, ConnectionError, ValueError):
            c.close()
            self._masters.pop(which, None)
            raise

    def _heartbeat_loop(self) -> None:
        stop = self.stopped
        while not stop.is_set():
            try:
                self._heartbeat_once()
            except (OSError, ConnectionError, ValueError) as e:
                log.debug("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat")
            self._beat_now.wait(self.cc.heartbeat_interval_s)
            self._beat_now.clear()

    def _heartbeat_once(self) -> None:
        report = "\n".join(f"{tid} {g.sm.last_epoch} {g.sm.last_seq} {g.sm.role}"
                           for tid, g in self.glue.items()).encode()
        sent = time.monotonic()
        r = self._master_call("heartbeat", "HEARTBEAT", self.me, self.boot, "serving", report)
        if self.stopped.is_set():
            return
        if not isinstance(r, Listing):
            log.warning("master refused the heartbeat: %s", r)
            return
        for line in r.lines:
            self._set_view(parse_view(line.decode()))
        # Renewed only once the views are in: an answer that deposes this
        # server (declared dead while it was slow) must not first give its
        # old primaryship a fresh lease, however briefly.
        self.lease_until = sent + LEASE_FRACTION * self.cc.failure_timeout_s
        self._maybe_hand_over()

    def _maybe_hand_over(self) -> None:
        """Give a tablet back to the server placed to lead it (the first of
        its replicas) once that server is a member again, e.g. after it
        restarted: otherwise every failure moves primaries for good and the
        load piles up on the servers that never failed. One tablet at a
        time per server, and only after its view has been quiet for
        HANDOVER_AFTER_S (rule 7 in replication.py: writes pause while the
        tablet drains, nothing is aborted)."""
        if any(g.sm.handing_to is not None for g in self.glue.values()):
            return
        now = time.monotonic()
        for g in self.glue.values():
            with g.lock:
                sm, v = g.sm, g.sm.view
                if not (sm.is_primary and sm.ready and v is not None and v.replicas
                        and v.replicas[0] != self.me and v.replicas[0] in v.members
                        and now - g.view_since >= HANDOVER_AFTER_S and now < self.lease_until):
                    continue
                actions = sm.begin_handover(v.replicas[0])
                if sm.handing_to is None:
                    continue
                log.info("tablet %d: handing over to %s, its placed primary", g.tablet.id, sm.handing_to)
                self._act(g, actions)
                return

    def _control_loop(self) -> None:
        stop = self.stopped
        while not stop.is_set():
            with self._requests_cv:
                while not self._requests and not stop.is_set():
                    self._requests_cv.wait(0.5)
                if stop.is_set():
                    return
                tid, a = self._requests.popleft()
            op = ("REMOVE" if isinstance(a, rp.AskRemove) else
                  "ADMIT" if isinstance(a, rp.AskAdmit) else "HANDOVER")
            try:
                r = self._master_call("control", "VIEWCHANGE", tid, a.epoch, op, a.peer, self.me)
            except (OSError, ConnectionError, ValueError) as e:
                log.info("VIEWCHANGE %s %s: master unreachable: %s", op, a.peer, e)
                r = None
            g = self.glue[tid]
            if isinstance(r, Listing) and r.lines:
                log.info("tablet %d: %s %s accepted", tid, op, a.peer)
                self._set_view(parse_view(r.lines[0].decode()))
            else:
                with g.lock:
                    if op == "REMOVE":
                        self._act(g, g.sm.remove_refused(a.peer))
                    elif op == "HANDOVER":
                        log.info("tablet %d: hand-over to %s refused (%s): serving on", tid, a.peer, r)
                        self._act(g, g.sm.handover_refused())
                    else:
                        # a refusal names the view's epoch; anything else: outcome unknown (None)
                        current = _refused_epoch(r)
                        self._act(g, g.sm.admit_refused(a.peer, a.epoch, current))
                stop.wait(0.05)

    def _tick_loop(self) -> None:
        while not self.stopped.wait(TICK_S):
            for g in self.glue.values():
                with g.lock:
                    self._act(g, g.sm.tick())


def cluster_server(cfg: Config, node_id: str):
    """A KVServer in cluster mode for `node_id` of `cfg` (not yet started)."""
    from kvserver.server import KVServer
    node_cfg = cfg.node(node_id)
    if node_cfg not in cfg.kvservers:
        raise ConfigError(f"{cfg.path}: {node_id!r} is not a [[kvserver]]")
    node = ClusterNode(cfg, node_id)
    internal = {name: (spec, getattr(node, f"cmd_{name}")) for name, spec in INTERNAL_COMMANDS.items()}
    for name in BLOCKING_COMMANDS:
        spec, handler = internal[name]
        internal[name] = (spec, node._snapshot_command(handler))
    server = KVServer(node_id, node_cfg.host, node_cfg.port, cfg.process_dir(node_id), cfg.storage,
                      cfg.cluster.tablets, secret=cfg.cluster.secret, role=node, writer=node,
                      tablet_ids=node.tablet_ids, internal_commands=internal,
                      blocking_commands=BLOCKING_COMMANDS)
    node.attach(server)
    return server
