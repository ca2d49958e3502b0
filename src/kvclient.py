"""Clients of the KV store: one server (`ServerClient`) and the cluster (`ClusterClient`).

Both implement the `KV` interface of src/kv.py, so the web apps and the mail
servers run unchanged against `MemoryKV` in unit tests and against the real
cluster here. The protocol itself is src/kvproto.py; this module only moves
its buffers over sockets.

ServerClient — one tablet server (or the master).
  A small pool of connections, each used by one thread at a time, so one
  client object is safe to share between threads. With a secret, every new
  connection sends `AUTH` before anything else. A request that fails before
  it was completely sent cannot have been executed (a server acts only on a
  whole request line and all its literals), so it is retried once on a fresh
  connection. Once sent, a broken connection means the outcome is unknown:
  the client raises `OutcomeUnknown` and never silently resends a write.
  Reads are the exception: a read that broke on a connection taken from the
  pool (which the server may have closed meanwhile) is resent once.

ClusterClient — the whole store, the only way the apps reach it.
  It caches the master's MAP, routes each row to the primary of
  `tablet_of(row, T)`, follows `-ERR MOVED` (updating the cached entry),
  and retries `-ERR RETRY`, refused connections and dead servers with
  exponential back-off plus jitter and a refreshed MAP, until its deadline;
  then it raises `Unavailable`.

Writes whose outcome is unknown (the connection broke after the request was
sent, e.g. the primary was SIGKILLed mid-request). The write may or may not
have been applied. What the cluster client does, command by command:

  PUT     resent. Setting a cell to the same value twice leaves the same
          state, so the caller sees one successful PUT. (A concurrent reader
          could, in a narrow window, see our value, then another client's,
          then ours again; the final state is what a single PUT gives.)
  DELROW  resent; if the resend answers NOTFOUND, our first attempt is what
  DELETE  removed it, so success is reported. (If someone else removed it
          in between, reporting success is still a correct linearization:
          the row is gone when we return.)
  PUTNX   resent; if the resend answers EXISTS, the cell is read: if it holds
          exactly our value, the first attempt created it and success is
          reported, otherwise Exists is raised.
  CPUT    never blindly resent. The cell is re-read: if it holds `new`,
          success is reported (taken as our CPUT having applied); if it
          still holds `old`, the CPUT is sent again (taken as not applied);
          anything else is Mismatch, and an absent cell is NotFound.
  reads   (GET, COLS) resent.

  The PUTNX and CPUT settle rules are EXACT ONLY WHEN THE VALUE IS UNIQUE TO THE
  CALL and the cell never returns to an earlier value. Otherwise they can
  be wrong: another client's identical CPUT old->new (or PUTNX of the same
  bytes) makes both clients report success, so a shared counter bumped by
  CPUT n -> n+1 can lose an increment; and a cell that went old -> new ->
  old makes the resend apply a second time. Every caller in this project
  puts a random token or a timestamp in the values it CPUTs or PUTNXes, or
  makes a change that is harmless to apply twice (the tests
  test_two_clients_same_* in tests/test_cluster_adversarial.py pin the
  problem down). The real fix, not built yet, is a request id that the
  primary remembers per tablet, so a resent write is recognised and
  answered with its first outcome.

`Unavailable` is raised only after the deadline; if a write's outcome was
still unknown at that point, the exception is `OutcomeUnknown` so the caller
knows the write may have happened.
"""

from __future__ import annotations

import logging
import random
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from src import kv
from src.kv import KVError, Unavailable, name_bytes, tablet_of
from src.kvproto import (
    COMMANDS, NEED_DATA, Error, KVProtocolError, Listing, Ok, ReplyParser, Value, decode_name, encode_name,
    encode_request,
)

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
WAIT_SLICE_S = 0.5      # a slow reply: how often the cluster client asks the master whether to wait on
PIPELINE_THREAD_BYTES = 64 * 1024   # above this a pipeline sends from a helper thread (no deadlock)
GET_MANY_BATCH = 256                # GETs per pipeline in get_many (bounds the replies held at once)

# Commands that change nothing, so resending one after an unknown outcome is harmless.
READ_ONLY = frozenset({"PING", "GET", "COLS", "MAP", "LOOKUP", "NODES", "STATUS", "TABLETS", "ROWS", "AUTH"})


class Unreachable(Unavailable):
    """The request surely did not reach the server (connect refused, send failed)."""


class OutcomeUnknown(Unavailable):
    """The request was sent, then the connection broke: it may or may not have been applied."""


def split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be host:port, not {addr!r}")
    return host.strip("[]"), int(port)


# -- one connection --------------------------------------------------------------


class _Connection:
    """A socket plus its reply parser; used by one thread at a time."""

    def __init__(self, addr: str, timeout: float):
        self.addr = addr
        self.sock = socket.create_connection(split_addr(addr), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = ReplyParser()
        self.received = 0           # bytes received since the last send: 0 means "no answer at all"

    def send(self, bufs) -> None:
        self.received = 0
        for b in bufs:
            self.sock.sendall(b)

    def read_reply(self, keep_waiting=None):
        """The next reply. With `keep_waiting`, a socket timeout asks it
        whether to wait on (True) or give up (False: the timeout is raised)."""
        while True:
            ev = self.parser.next_event()
            if ev is not NEED_DATA:
                return ev
            try:
                data = self.sock.recv(RECV_BYTES)
            except TimeoutError:
                if keep_waiting is not None and keep_waiting():
                    continue
                raise
            if not data:
                raise ConnectionError("connection closed by the server")
            self.received += len(data)
            self.parser.feed(data)

    def looks_closed(self) -> bool:
        """An idle connection with something to read has been closed (or is out of step)."""
        poller = select.poll()      # not select.select: it fails for descriptors over 1023
        poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- parsed admin and master replies ---------------------------------------------


@dataclass(frozen=True)
class TabletEntry:
    tablet: int
    primary: str | None                # host:port, None when the tablet has no live server
    secondaries: tuple[str, ...] = ()


@dataclass(frozen=True)
class TabletMap:
    """The master's MAP: tablet count, epoch, and one entry per tablet."""

    tablets: int
    epoch: int
    entries: dict[int, TabletEntry] = field(default_factory=dict)

    def primary(self, tablet: int) -> str | None:
        e = self.entries.get(tablet)
        return e.primary if e else None


def _addr_or_none(tok: str) -> str | None:
    return None if tok == "-" else tok


def parse_placement(tablet: str, primary: str, secondaries: str = "-") -> TabletEntry:
    return TabletEntry(int(tablet), _addr_or_none(primary),
                       tuple(s for s in secondaries.split(",") if s and s != "-"))


def parse_map(lines: list[bytes]) -> TabletMap:
    """Parse MAP's listing (PROTOCOL.md "Master commands"); KVProtocolError if malformed."""
    try:
        head = dict(kv_.split("=", 1) for kv_ in lines[0].decode().split())
        tablets, epoch = int(head["tablets"]), int(head["epoch"])
        entries = {}
        for line in lines[1:]:
            parts = line.decode().split()
            if len(parts) not in (2, 3):
                raise ValueError(line)
            e = parse_placement(*parts)
            entries[e.tablet] = e
    except (IndexError, KeyError, ValueError, UnicodeDecodeError) as e:
        raise KVProtocolError("BADREPLY", f"malformed MAP reply: {e}") from None
    if tablets < 1:
        raise KVProtocolError("BADREPLY", "MAP says there are no tablets")
    return TabletMap(tablets, epoch, entries)


def _keyvalues(lines: list[bytes]) -> dict[str, str]:
    out = {}
    for line in lines:
        k, _, v = line.decode("utf-8", "replace").partition("=")
        out[k] = v
    return out


def _expect(reply, kind):
    if not isinstance(reply, kind):
        raise kv.Internal(f"unexpected reply {reply!r}")
    return reply


def _value(v) -> bytes:
    if not isinstance(v, (bytes, bytearray, memoryview)):
        raise TypeError("values must be bytes")
    return v


# -- ServerClient ----------------------------------------------------------------


class ServerClient:
    """A thread-safe client of one server, with a pool of connections."""

    def __init__(self, addr: str, timeout: float = 10.0, secret: str = "", pool_size: int = 8,
                 commands=COMMANDS):
        split_addr(addr)
        self.addr = addr
        self.timeout = timeout
        self.secret = secret
        self.pool_size = pool_size
        self.commands = commands
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"ServerClient({self.addr!r})"

    # -- connections --

    def _connect(self) -> _Connection:
        try:
            conn = _Connection(self.addr, self.timeout)
        except OSError as e:
            raise Unreachable(f"cannot connect to {self.addr}: {e}") from None
        if self.secret:
            try:
                conn.send(encode_request("AUTH", self.secret))
                reply = conn.read_reply()
            except (OSError, KVProtocolError) as e:
                conn.close()
                raise Unreachable(f"{self.addr}: connection lost during AUTH: {e}") from None
            if isinstance(reply, Error):
                conn.close()
                raise reply.exception()
        return conn

    def _acquire(self) -> tuple[_Connection, bool]:
        """A connection and whether it was reused from the pool."""
        while True:
            with self._lock:
                if self._closed:
                    raise Unreachable("client is closed")
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._connect(), False
            if conn.looks_closed():
                conn.close()
                continue
            return conn, True

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Close every pooled connection; later calls raise Unreachable."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    # -- requests --

    def request(self, cmd: str, *args, still_worth_waiting=None):
        """Send one request, return its reply event (Ok, Value, Listing or Error).

        Raises Unreachable if it could not be delivered, OutcomeUnknown if the
        connection broke after it was sent. With `still_worth_waiting`, the
        reply is awaited in slices of WAIT_SLICE_S, and between slices that
        function may call the wait off (False: OutcomeUnknown); `timeout`
        still bounds the whole wait.
        """
        cmd = cmd.upper()
        bufs = encode_request(cmd, *args, commands=self.commands)
        for attempt in (1, 2):
            conn, reused = self._acquire()
            try:
                conn.send(bufs)
            except OSError as e:
                conn.close()
                if attempt == 1:
                    continue      # never fully sent, so never executed: a fresh connection is safe
                raise Unreachable(f"{self.addr}: send failed: {e}") from None
            try:
                if still_worth_waiting is None:
                    reply = conn.read_reply()
                else:
                    reply = self._read_in_slices(conn, still_worth_waiting)
            except (OSError, KVProtocolError) as e:
                conn.close()
                if attempt == 1 and reused and conn.received == 0 and cmd in READ_ONLY:
                    continue      # a pooled connection the server had closed; a read is safe to resend
                raise OutcomeUnknown(f"{self.addr}: {cmd} sent, then the connection broke: {e}") from None
            if cmd == "QUIT":
                conn.close()
            else:
                self._release(conn)
            return reply
        raise AssertionError("unreachable")

    def _read_in_slices(self, conn: _Connection, still_worth_waiting):
        # `timeout` bounds the time without a byte, as the socket timeout
        # does (a big value streaming in may take longer as a whole).
        heard = [conn.received, time.monotonic()]
        conn.sock.settimeout(min(WAIT_SLICE_S, self.timeout))

        def keep_waiting():
            now = time.monotonic()
            if conn.received != heard[0]:
                heard[:] = [conn.received, now]
            return now - heard[1] < self.timeout and still_worth_waiting()
        try:
            return conn.read_reply(keep_waiting)
        finally:
            conn.sock.settimeout(self.timeout)

    def call(self, cmd: str, *args, still_worth_waiting=None):
        """Like `request`, but an `-ERR` reply is raised as its src.kv exception."""
        reply = self.request(cmd, *args, still_worth_waiting=still_worth_waiting)
        if isinstance(reply, Error):
            raise reply.exception()
        return reply

    def pipeline(self, requests: list[tuple[str, tuple]]) -> list:
        """Send every `(cmd, args)` on one connection, then read the replies in order.

        Returns one item per request: a reply event (Ok, Value, Listing) or
        the exception for an `-ERR` reply; if the connection breaks, the
        requests still unanswered get an OutcomeUnknown each.
        """
        if not requests:
            return []
        bufs_list = [encode_request(cmd, *args, commands=self.commands) for cmd, args in requests]
        total = sum(len(b) for bufs in bufs_list for b in bufs)
        conn, _ = self._acquire()
        send_error: list[BaseException] = []
        sent = [0]          # how many requests went out whole: any of them may have run

        def send_all():
            try:
                for bufs in bufs_list:
                    conn.send(bufs)
                    sent[0] += 1
            except OSError as e:
                send_error.append(e)
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)   # wake the reader
                except OSError:
                    pass

        sender = None
        if total > PIPELINE_THREAD_BYTES:
            # Both sides could block writing if we sent everything before reading.
            sender = threading.Thread(target=send_all, name="kv-pipeline-send", daemon=True)
            sender.start()
        else:
            send_all()
        out: list = []
        broken = bool(send_error)
        if not broken:
            try:
                for _ in requests:
                    ev = conn.read_reply()
                    out.append(ev.exception() if isinstance(ev, Error) else ev)
            except (OSError, KVProtocolError) as e:
                broken = True
                log.debug("%s: pipeline broke after %d replies: %s", self.addr, len(out), e)
        if sender is not None:
            if broken:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)   # unblock a sender still writing
                except OSError:
                    pass
            sender.join()
            broken = broken or bool(send_error)
        while len(out) < len(requests):
            # A request the send never finished cannot have run (the server
            # acts on whole requests only); one sent whole may have.
            cls = Unreachable if send_error and len(out) >= sent[0] else OutcomeUnknown
            out.append(cls(f"{self.addr}: connection broke during a pipeline"))
        if broken:
            conn.close()
        else:
            self._release(conn)
        return out

    # -- the KV interface --

    def get(self, row, col) -> bytes:
        return _expect(self.call("GET", name_bytes(row), name_bytes(col)), Value).data

    def put(self, row, col, value) -> None:
        _expect(self.call("PUT", name_bytes(row), name_bytes(col), _value(value)), Ok)

    def putnx(self, row, col, value) -> None:
        _expect(self.call("PUTNX", name_bytes(row), name_bytes(col), _value(value)), Ok)

    def cput(self, row, col, old, new) -> None:
        _expect(self.call("CPUT", name_bytes(row), name_bytes(col), _value(old), _value(new)), Ok)

    def delete(self, row, col) -> None:
        _expect(self.call("DELETE", name_bytes(row), name_bytes(col)), Ok)

    def cols(self, row) -> list[bytes]:
        return [decode_name(n) for n in _expect(self.call("COLS", name_bytes(row)), Listing).lines]

    def delrow(self, row) -> None:
        _expect(self.call("DELROW", name_bytes(row)), Ok)

    def get_many(self, row, cols) -> dict[bytes, bytes]:
        return _pipelined_gets(self, self, row, cols)

    # -- admin and master helpers --

    def ping(self) -> bool:
        return _expect(self.call("PING"), Ok).word == "PONG"

    def status(self) -> dict[str, str]:
        return _keyvalues(_expect(self.call("STATUS"), Listing).lines)

    def tablets(self) -> list[str]:
        return [line.decode("utf-8", "replace") for line in _expect(self.call("TABLETS"), Listing).lines]

    def rows(self, tablet: int, after: bytes | None, limit: int) -> list[bytes]:
        """Up to `limit` row names of `tablet` after `after` (None: from the start)."""
        if after is None:
            tok = "-"
        else:
            after = name_bytes(after)
            tok = "%2D" if after == b"-" else encode_name(after).decode("ascii")
        return [decode_name(n) for n in _expect(self.call("ROWS", int(tablet), tok, int(limit)), Listing).lines]

    def kill(self) -> None:
        _expect(self.call("KILL"), Ok)

    def wake(self) -> None:
        _expect(self.call("WAKE"), Ok)

    def map(self) -> TabletMap:
        return parse_map(_expect(self.call("MAP"), Listing).lines)

    def lookup(self, row) -> TabletEntry:
        parts = _expect(self.call("LOOKUP", name_bytes(row)), Ok).text.split()
        try:
            return parse_placement(*parts)
        except (TypeError, ValueError):
            raise KVProtocolError("BADREPLY", f"malformed LOOKUP reply: {parts!r}") from None

    def nodes(self) -> list[dict[str, str]]:
        """One dict per server: id, addr, state, and the line's key=value fields."""
        out = []
        for line in _expect(self.call("NODES"), Listing).lines:
            parts = line.decode("utf-8", "replace").split()
            d = {"id": parts[0] if parts else "", "addr": parts[1] if len(parts) > 1 else "",
                 "state": parts[2] if len(parts) > 2 else ""}
            d.update(_keyvalues([p.encode() for p in parts[3:]]))
            out.append(d)
        return out


# -- ClusterClient ----------------------------------------------------------------


class ClusterClient:
    """The `KV` interface over the whole cluster; safe to share between threads.

    `deadline` bounds how long one operation keeps retrying (seconds);
    `timeout` is the socket timeout of one attempt.
    """

    BACKOFF_FIRST = 0.02
    BACKOFF_MAX = 0.5
    MAX_MOVES = 8            # MOVED hops in a row before backing off and asking the master

    def __init__(self, master_addr: str, secret: str = "", deadline: float = 15.0, timeout: float = 5.0,
                 pool_size: int = 8):
        self.secret = secret
        self.deadline = deadline
        self.timeout = timeout
        self.pool_size = pool_size
        self.master = ServerClient(master_addr, timeout=timeout, secret=secret, pool_size=2)
        self._map: TabletMap | None = None
        self._primaries: dict[int, str | None] = {}   # the cache MOVED updates
        self._map_lock = threading.Lock()             # guards _map and _primaries
        self._refresh_lock = threading.Lock()         # one MAP request at a time
        self._map_version = 0
        self._clients: dict[str, ServerClient] = {}
        self._clients_lock = threading.Lock()

    # -- plumbing --

    def server(self, addr: str) -> ServerClient:
        """The pooled client of one server (also for admin commands)."""
        with self._clients_lock:
            c = self._clients.get(addr)
            if c is None:
                c = self._clients[addr] = ServerClient(addr, timeout=self.timeout, secret=self.secret,
                                                       pool_size=self.pool_size)
            return c

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            c.close()
        self.master.close()

    def map(self, refresh: bool = False) -> TabletMap:
        """The cached tablet map (asked from the master when absent or `refresh`)."""
        with self._map_lock:
            m, version = self._map, self._map_version
        if m is not None and not refresh:
            return m
        with self._refresh_lock:
            with self._map_lock:
                if self._map_version != version and self._map is not None:
                    return self._map      # another thread refreshed while we waited
            m = self.master.map()
            with self._map_lock:
                self._map = m
                self._primaries = {t: e.primary for t, e in m.entries.items()}
                self._map_version += 1
            log.debug("tablet map epoch %d, %d tablets", m.epoch, m.tablets)
            return m

    def nodes(self) -> list[dict[str, str]]:
        return self.master.nodes()

    def _route(self, row: bytes, refresh: bool = False) -> tuple[int, str | None]:
        try:
            m = self.map(refresh)
        except (KVError, KVProtocolError) as e:
            with self._map_lock:
                m = self._map
            if m is None:
                raise
            log.debug("cannot refresh the tablet map (%s); using the cached one", e)
        t = tablet_of(row, m.tablets)
        with self._map_lock:
            return t, self._primaries.get(t)

    def _still_primary(self, tablet: int, addr: str) -> bool:
        """Asked while a reply from `addr` is slow: does the master still name
        it primary? A hung or cut-off primary is replaced after the failure
        timeout; waiting for it until our socket timeout would only stall."""
        try:
            m = self.map(refresh=True)
        except (KVError, KVProtocolError):
            return True                   # the master cannot tell: keep waiting
        e = m.entries.get(tablet)
        return e is None or e.primary in (None, addr)

    def _moved(self, tablet: int, addr: str) -> None:
        with self._map_lock:
            self._primaries[tablet] = addr

    def _execute(self, row: bytes, cmd: str, args: tuple, on_unknown=None, settle=None):
        """Run one data command on the primary of `row`'s tablet, retrying until the deadline.

        `on_unknown(exc)` runs when an attempt's outcome is unknown, before
        any resend; it returns ("done", reply), ("raise", exc) or ("retry", None).
        `settle(exc)` runs when a definite error (NotFound, Exists, ...) answers a
        resend that followed an unknown outcome; it returns a reply or raises.
        """
        end = time.monotonic() + self.deadline
        delay = self.BACKOFF_FIRST
        moves = 0
        unknown = False
        refresh = False
        last: BaseException | None = None
        while True:
            try:
                tablet, addr = self._route(row, refresh)
                refresh = False
            except (KVError, KVProtocolError) as e:     # the master is down or busy
                last, addr = e, None
            else:
                if addr is None:
                    last = kv.Retry(f"tablet {tablet} has no live primary")
                    refresh = True
            if addr is not None:
                try:
                    return self.server(addr).call(cmd, row, *args,
                                                  still_worth_waiting=lambda: self._still_primary(tablet, addr))
                except kv.Moved as e:
                    last = e
                    self._moved(e.tablet, e.addr)
                    moves += 1
                    if moves < self.MAX_MOVES:
                        continue
                    moves, refresh = 0, True
                except OutcomeUnknown as e:
                    last, unknown, refresh = e, True, True
                    if on_unknown is not None:
                        action, result = on_unknown(e)
                        if action == "done":
                            return result
                        if action == "raise":
                            raise result
                except (kv.Retry, Unreachable, KVProtocolError) as e:
                    last, refresh = e, True
                except KVError as e:
                    if unknown and settle is not None:
                        return settle(e)
                    raise
            remaining = end - time.monotonic()
            if remaining <= 0:
                cls = OutcomeUnknown if unknown else Unavailable
                raise cls(f"{cmd} on row {row[:64]!r}: gave up after {self.deadline}s: {last}")
            time.sleep(min(delay * random.uniform(0.5, 1.0), remaining))
            delay = min(delay * 2, self.BACKOFF_MAX)

    # -- the KV interface --

    def get(self, row, col) -> bytes:
        return _expect(self._execute(name_bytes(row), "GET", (name_bytes(col),)), Value).data

    def cols(self, row) -> list[bytes]:
        return [decode_name(n) for n in _expect(self._execute(name_bytes(row), "COLS", ()), Listing).lines]

    def put(self, row, col, value) -> None:
        _expect(self._execute(name_bytes(row), "PUT", (name_bytes(col), _value(value))), Ok)

    def delete(self, row, col) -> None:
        _expect(self._execute(name_bytes(row), "DELETE", (name_bytes(col),), settle=_gone_is_done), Ok)

    def delrow(self, row) -> None:
        _expect(self._execute(name_bytes(row), "DELROW", (), settle=_gone_is_done), Ok)

    def putnx(self, row, col, value) -> None:
        row, col, value = name_bytes(row), name_bytes(col), _value(value)

        def settle(exc):
            if isinstance(exc, kv.Exists):
                try:
                    if self.get(row, col) == value:
                        return Ok("")     # the attempt whose outcome was unknown created it
                except kv.NotFound:
                    pass
            raise exc

        _expect(self._execute(row, "PUTNX", (col, value), settle=settle), Ok)

    def get_many(self, row, cols) -> dict[bytes, bytes]:
        """Pipelined GETs on the row's primary; a cell that gets any other
        answer (MOVED, RETRY, a broken connection) is read again by `get`,
        with all of its retries."""
        try:
            _, addr = self._route(name_bytes(row))
        except (KVError, KVProtocolError):
            addr = None
        if addr is None:
            return kv.get_each(self, row, cols)
        return _pipelined_gets(self.server(addr), self, row, cols)

    def cput(self, row, col, old, new) -> None:
        row, col, old, new = name_bytes(row), name_bytes(col), _value(old), _value(new)

        def on_unknown(exc):
            try:
                current = self.get(row, col)
            except kv.NotFound as e:
                return "raise", e
            except Unavailable:
                return "retry", None
            if current == new:
                return "done", Ok("")     # our CPUT applied
            if current == old:
                return "retry", None      # it did not: sending it again is safe
            return "raise", kv.Mismatch("the cell changed while the outcome of our CPUT was unknown")

        _expect(self._execute(row, "CPUT", (col, old, new), on_unknown=on_unknown), Ok)


def _pipelined_gets(server: ServerClient, reader: kv.KV, row, cols) -> dict[bytes, bytes]:
    """get_many: GETs of one row sent to `server` GET_MANY_BATCH at a time,
    each batch in one pipeline; a cell answered with anything but its value
    or NOTFOUND is read again with `reader.get` (which knows how to retry)."""
    row = name_bytes(row)
    cols = [name_bytes(c) for c in cols]
    out: dict[bytes, bytes] = {}
    again: list[bytes] = []
    for i in range(0, len(cols), GET_MANY_BATCH):
        batch = cols[i:i + GET_MANY_BATCH]
        try:
            replies = server.pipeline([("GET", (row, col)) for col in batch])
        except (KVError, KVProtocolError):       # could not even connect
            again += batch
            continue
        for col, reply in zip(batch, replies):
            if isinstance(reply, Value):
                out[col] = reply.data
            elif not isinstance(reply, kv.NotFound):
                again.append(col)
    out.update(kv.get_each(reader, row, again))
    return out


def _gone_is_done(exc: KVError):
    """DELETE/DELROW resent after an unknown outcome: NOTFOUND means the first attempt did it."""
    if isinstance(exc, kv.NotFound):
        return Ok("")
    raise exc
