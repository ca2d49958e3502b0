"""Forwarding one HTTP exchange to a frontend, over the frontends' own codec.

The load balancer speaks HTTP/1.1 on both sides with `httpserver.http11`:
a `Connection(SERVER)` towards the visitor and a `Connection(CLIENT)` towards
the frontend. A `Channel` pairs one socket with one such codec and turns
socket and framing failures into `ChannelError`, tagged with the side that
failed, so the forwarding code can tell "the visitor went away" (give up)
from "the frontend failed" (maybe retry elsewhere).

Bodies stream both ways piece by piece (`Data` events); nothing is buffered
whole, so a multi-gigabyte upload or download passes through in constant
memory. Hop-by-hop headers (RFC 9110 §7.6.1: Connection and what it names,
Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-*) are dropped and
each side's codec frames the message for its own connection.

`UpstreamPool` keeps idle keep-alive connections per frontend for a few
seconds. A pooled connection may have been closed by the frontend meanwhile,
so a failure on one is retried on a fresh connection to the same frontend
before that frontend is blamed.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Callable

from httpserver.http11 import (CLIENT, NEED_DATA, PAUSED, Connection, ConnectionClosed, Data, EndOfMessage,
                               InformationalResponse, ProtocolError, Request, Response)

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 2.0
UPSTREAM_TIMEOUT_S = 60.0  # a frontend may wait on the KV store's own retries (15 s) and more
RECV_SLICE_S = 1.0         # waiting for a frontend's answer, look this often whether it still beats
POOL_IDLE_S = 4.0  # longest a pooled connection idles; UpstreamPool keeps it under the frontends' timeout
POOL_MAX_PER_FRONTEND = 32

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization"})


class ChannelError(Exception):
    """A socket or framing failure on one side: `side` is "client" or "upstream"."""

    def __init__(self, side: str, cause: BaseException | str):
        super().__init__(f"{side}: {cause}")
        self.side = side
        self.cause = cause


class Channel:
    """One socket and the HTTP/1.1 codec that frames it."""

    def __init__(self, sock: socket.socket, conn: Connection, side: str):
        self.sock = sock
        self.conn = conn
        self.side = side
        self.received_any = False  # did the peer send any bytes since the last reset

    def next_event(self):
        """The next event (never NEED_DATA), reading as needed. Raises ChannelError."""
        while (ev := self.buffered_event()) is NEED_DATA:
            self.receive_some()
        return ev

    def _recv(self) -> bytes:
        return self.sock.recv(RECV_BYTES)

    def buffered_event(self):
        """The next event already in the codec's buffer, or NEED_DATA (no recv)."""
        try:
            return self.conn.next_event()
        except ProtocolError as e:
            raise ChannelError(self.side, e) from e

    def receive_some(self) -> None:
        """One recv into the codec (blocking, within the socket's timeout)."""
        try:
            data = self._recv()
            if data:
                self.received_any = True
            self.conn.receive_data(data)
        except (OSError, ProtocolError) as e:
            raise ChannelError(self.side, e) from e

    def send(self, *events) -> None:
        try:
            out = b"".join(self.conn.send(ev) for ev in events)
            if out:
                self._sendall(out)
        except (OSError, ProtocolError) as e:
            raise ChannelError(self.side, e) from e

    def _sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def end_to_end(headers) -> list[tuple[str, str]]:
    """The header fields a proxy passes on: all but the hop-by-hop ones.

    `headers` are parsed ones, whose names the codec has lower-cased.
    """
    items = headers.items
    named = HOP_BY_HOP
    for n, v in items:
        if n == "connection":
            named = named | {t.strip().lower() for t in v.split(",")}
    return [(n, v) for n, v in items if n not in named]


def has_body(req: Request) -> bool:
    cl = req.headers.get("content-length")
    return req.headers.get("transfer-encoding") is not None or (cl is not None and cl.strip() not in ("0", ""))


class Upstream(Channel):
    """A client-role connection to one frontend.

    Reading, it waits in slices of RECV_SLICE_S and asks `gone(fe_id)`
    between them: a frontend that stopped beating (frozen, its host cut off)
    ends the wait after the heartbeat timeout, not UPSTREAM_TIMEOUT_S, so a
    safe request goes to another frontend and an unsafe one gets its 502 in
    seconds. A frontend that beats may take up to UPSTREAM_TIMEOUT_S to say
    anything (it may be waiting for the store's failover)."""

    def __init__(self, fe_id: str, sock: socket.socket, conn: Connection, reused: bool = False,
                 gone: Callable[[str], bool] | None = None):
        super().__init__(sock, conn, "upstream")
        self.fe_id = fe_id
        self.reused = reused
        self.idle_since = 0.0
        self.gone = gone
        self.on_input: Callable[[], None] | None = None   # see _sendall

    def _recv(self) -> bytes:
        if self.gone is None:
            return self.sock.recv(RECV_BYTES)
        waited = 0.0
        try:
            while True:
                self.sock.settimeout(RECV_SLICE_S)
                try:
                    return self.sock.recv(RECV_BYTES)
                except socket.timeout:
                    waited = self._one_more_slice(waited, "waited")
        finally:
            self.sock.settimeout(UPSTREAM_TIMEOUT_S)

    def _one_more_slice(self, waited: float, doing: str) -> float:
        """A RECV_SLICE_S more spent on the frontend: the new total, or
        socket.timeout once that is UPSTREAM_TIMEOUT_S or it stopped beating."""
        waited += RECV_SLICE_S
        if waited >= UPSTREAM_TIMEOUT_S:
            raise socket.timeout(f"frontend {self.fe_id} did nothing for {UPSTREAM_TIMEOUT_S:.0f}s")
        if self.gone is not None and self.gone(self.fe_id):
            raise socket.timeout(f"frontend {self.fe_id} stopped beating while we {doing}")
        return waited

    def _sendall(self, data: bytes) -> None:
        """sendall in slices too: a frontend that froze while a request body
        streams to it stops taking bytes, and the upload hung for the whole
        UPSTREAM_TIMEOUT_S before its 502 (HTTP QA). And while a send waits,
        what the frontend says goes to `on_input` (forward_body's), which may
        end the send: a frontend that answers instead of reading."""
        if self.gone is None and self.on_input is None:
            self.sock.sendall(data)
            return
        view, waited = memoryview(data), 0.0
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT | (select.POLLIN if self.on_input else 0))
        while view:
            events = 0
            for _, ev in poller.poll(RECV_SLICE_S * 1000):
                events |= ev
            if events & select.POLLIN and self.on_input is not None:
                self.on_input()
            if events & (select.POLLOUT | select.POLLERR | select.POLLHUP):
                try:
                    n = self.sock.send(view, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    continue
                view, waited = view[n:], 0.0
                continue
            if not events:
                waited = self._one_more_slice(waited, "sent")


class UpstreamPool:
    """Idle keep-alive connections to frontends, reused while younger than
    `idle_s`: POOL_IDLE_S, or half the frontends' keep-alive idle timeout
    (`http.idle_timeout_s`, which may be configured as low as 0.1 s) if that
    is shorter. A connection kept longer than the frontend keeps it would
    be closed under the LB's feet just as it sends the next request."""

    def __init__(self, max_line: int, max_header: int, max_body: int, clock=time.monotonic,
                 frontend_idle_timeout_s: float = float("inf")):
        self._idle: dict[str, list[Upstream]] = {}
        self._lock = threading.Lock()
        self._limits = (max_line, max_header, max_body)
        self._clock = clock
        self.idle_s = min(POOL_IDLE_S, frontend_idle_timeout_s / 2)

    def _codec(self) -> Connection:
        return Connection(CLIENT, *self._limits)

    def get(self, fe_id: str, addr: tuple[str, int], pooled_ok: bool,
            gone: Callable[[str], bool] | None = None) -> Upstream:
        """An idle pooled connection (when `pooled_ok`), else a new one. OSError if it cannot connect."""
        if pooled_ok:
            now = self._clock()
            with self._lock:
                idle = self._idle.get(fe_id, [])
                while idle:
                    up = idle.pop()
                    if now - up.idle_since < self.idle_s:
                        up.reused, up.gone = True, gone
                        return up
                    up.close()
        sock = socket.create_connection(addr, timeout=CONNECT_TIMEOUT_S)
        sock.settimeout(UPSTREAM_TIMEOUT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Upstream(fe_id, sock, self._codec(), gone=gone)

    def put(self, up: Upstream) -> None:
        """Give back a connection whose exchange is complete; closed if not reusable."""
        if not up.conn.keep_alive or up.conn.in_state != "head" or up.conn.out_state != "idle":
            up.close()
            return
        up.idle_since = self._clock()
        up.received_any = False
        with self._lock:
            idle = self._idle.setdefault(up.fe_id, [])
            if len(idle) < POOL_MAX_PER_FRONTEND:
                idle.append(up)
                return
        up.close()

    def drop(self, fe_id: str) -> None:
        """Close every idle connection to `fe_id` (it failed)."""
        with self._lock:
            idle = self._idle.pop(fe_id, [])
        for up in idle:
            up.close()

    def close_all(self) -> None:
        with self._lock:
            pools, self._idle = list(self._idle.values()), {}
        for idle in pools:
            for up in idle:
                up.close()


def read_response_head(up: Upstream) -> Response:
    """The frontend's final response head, skipping 1xx. Raises ChannelError."""
    while True:
        ev = up.next_event()
        if isinstance(ev, InformationalResponse):
            continue
        if isinstance(ev, Response):
            return ev
        raise ChannelError("upstream", f"connection closed before a response ({ev!r})")


def stream_body(src: Channel, dst: Channel) -> None:
    """Copy Data events from `src` to `dst` up to and including EndOfMessage."""
    while True:
        ev = src.next_event()
        if type(ev) is Data:
            dst.send(ev)
        elif type(ev) is EndOfMessage:
            dst.send(EndOfMessage())
            return
        elif ev is PAUSED or type(ev) is ConnectionClosed:
            raise ChannelError(src.side, "message ended unexpectedly")
        else:
            raise ChannelError(src.side, f"unexpected {ev!r} inside a body")


class EarlyAnswer(Exception):
    """The frontend answered before the request body was all sent."""

    def __init__(self, response: Response):
        super().__init__(f"{response.status} before the request ended")
        self.response = response


def forward_body(client: Channel, up: "Upstream") -> Response | None:
    """Stream the visitor's request body to the frontend, listening to the
    frontend meanwhile (also while a send to it waits). Its `100 Continue`
    goes on to a visitor that waits for one; an answer it gives before the
    body has ended (a refusal: no session, over quota, too large) is
    returned at once, the rest of the body unsent, so the visitor hears it
    as soon as it would from the frontend itself. None once the whole body
    went through."""

    def frontend_spoke() -> None:
        up.receive_some()
        while (answer := up.buffered_event()) is not NEED_DATA:
            if isinstance(answer, InformationalResponse):
                if client.conn.they_are_waiting_for_100_continue:
                    client.send(answer)
                continue
            if isinstance(answer, Response):
                raise EarlyAnswer(answer)
            raise ChannelError("upstream", f"{answer!r} before the request ended")

    # While a send waits, the frontend may be sending its answer instead of
    # reading: both sides would wait on each other (a big refusal page).
    up.on_input = frontend_spoke
    last_piece = [None]     # (see below; a list, as a name only ever assigned would look like a slip)
    try:
        while True:
            ev = client.buffered_event()
            if ev is NEED_DATA:
                if _first_readable(client, up) is client:
                    client.receive_some()
                else:
                    frontend_spoke()
                continue
            if type(ev) is Data:
                up.send(ev)
                # Kept until the next piece has arrived: freed just before recv
                # allocated the next 256 KiB, glibc handed the memory back and
                # faulted it in again every time (half the upload speed, measured).
                last_piece[0] = ev
            elif type(ev) is EndOfMessage:
                up.send(EndOfMessage())
                return None
            elif ev is PAUSED or type(ev) is ConnectionClosed:
                raise ChannelError("client", "message ended unexpectedly")
            else:
                raise ChannelError("client", f"unexpected {ev!r} inside a body")
    except EarlyAnswer as early:
        return early.response
    finally:
        up.on_input = None


def _first_readable(client: Channel, up: "Upstream") -> Channel:
    """Wait, at most the visitor's idle timeout, for either side to have
    something to read; the frontend first when both do. In slices, asking
    meanwhile whether the frontend still beats: one that froze gives the
    visitor a 502 after the heartbeat timeout (a visitor waiting for its
    100 Continue got nothing for 30 s, and the frontend was not blamed).
    poll, not select: select cannot watch a descriptor numbered 1024 or
    more, and a busy LB has that many connections open."""
    limit = client.sock.gettimeout() or UPSTREAM_TIMEOUT_S
    poller = select.poll()
    poller.register(up.sock, select.POLLIN)
    poller.register(client.sock, select.POLLIN)
    waited = 0.0
    while True:
        step = min(RECV_SLICE_S, limit - waited)
        try:
            ready = {fd for fd, _ in poller.poll(step * 1000)}
        except OSError as e:
            raise ChannelError("client", e) from e
        if up.sock.fileno() in ready:
            return up
        if client.sock.fileno() in ready:
            return client
        waited += step
        if up.gone is not None and up.gone(up.fe_id):
            raise ChannelError("upstream", socket.timeout(f"frontend {up.fe_id} stopped beating while we waited"))
        if waited >= limit:
            raise ChannelError("client", socket.timeout("the request body stopped arriving"))


# (Expect is dropped here and sent again only when the visitor waits for 100
# Continue: then the frontend, which knows whether it wants the body, says.)
_REFRAMED = frozenset({"expect", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via"})
VIA = "1.1 penncloud-lb"     # RFC 9110 7.6.3: an intermediary adds itself to Via


def upstream_request(req: Request, client_ip: str, expect_continue: bool = False) -> Request:
    """The request as sent to a frontend: end-to-end headers, our framing,
    X-Forwarded-*, and `Expect: 100-continue` when the visitor waits for it."""
    items, forwarded_for, host, length, chunked, via = [], None, None, None, False, []
    for n, v in end_to_end(req.headers):
        if n in _REFRAMED:
            if n == "x-forwarded-for":    # (several lines are one list, RFC 9110 5.3)
                forwarded_for = v if forwarded_for is None else f"{forwarded_for}, {v}"
            elif n == "via":
                via.append(v)
            continue
        if n == "host":
            host = v
        items.append((n, v))
    # The framing comes from the request as the codec read it, even when the
    # visitor named Content-Length in Connection (end_to_end drops what
    # Connection names): the body we forward must keep its length.
    for n, v in req.headers.items:
        if n == "transfer-encoding":
            chunked = True  # the codec accepts no coding but chunked
        elif n == "content-length" and length is None:
            length = v.split(",")[0].strip()
    items.append(("X-Forwarded-For", f"{forwarded_for}, {client_ip}" if forwarded_for else client_ip))
    items.append(("X-Forwarded-Proto", "http"))
    items.append(("Via", ", ".join([*via, VIA])))
    if host is not None:
        items.append(("X-Forwarded-Host", host))
    else:  # HTTP/1.0 without Host: the frontend still needs one
        items.append(("Host", "penncloud"))
    if chunked:
        items.append(("Transfer-Encoding", "chunked"))
    elif length is not None:
        items.append(("Content-Length", length))
    if expect_continue:
        items.append(("Expect", "100-continue"))
    return Request(req.method, req.target, items)
