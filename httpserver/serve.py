"""The socket shell around the pure HTTP codec: one thread per connection.

    HTTPServer(host, port, app, http_cfg, name).start() / .port / .stop()

`app(req) -> Response` is any callable (normally `web.App`). For each
connection (src.server.TCPServer gives us the thread and TCP_NODELAY):

    loop:
      wait for a request head      deadline: idle_timeout_s for the WHOLE head,
                                   so a client dripping bytes (slowloris)
                                   cannot hold the thread longer than that
      call the app                 the body is read by the handler, on demand,
                                   through `BodyStream` (100 Continue is sent
                                   at the first read); each recv waits at most
                                   idle_timeout_s, and every idle_timeout_s the
                                   body must have moved MIN_BODY_RATE bytes/s,
                                   so a client dripping a byte just under the
                                   timeout is cut off too (408)
      send the response            bytes in one sendall; iterables streamed
      drain what the handler left  up to DRAIN_LIMIT, else close
      keep-alive? next cycle : close

A malformed head gets its status (400/413/414/417/431/501/505) and the connection
is closed; a stalled head gets 408 and a close. A close after an error first
shuts down our side and discards what the client still sends for a moment, so
the client reads our answer instead of a connection reset.
"""

from __future__ import annotations

import email.utils
import logging
import socket
import threading
import time

from httpserver import http11
from httpserver.http11 import NEED_DATA, Connection, Data, EndOfMessage, ProtocolError
from httpserver.web import BodyCut, ClientGone, HTTPError, Request, Response
from src.server import TCPService

log = logging.getLogger(__name__)

RECV_BYTES = 256 * 1024
DRAIN_LIMIT = 1024 * 1024          # unread body we will swallow to keep a connection alive
MIN_BODY_RATE = 1024               # bytes/s a body must average over each idle_timeout_s window
LINGER_S = 2.0                     # at most this long, and...
LINGER_BYTES = 64 * 1024 * 1024    # ...this much late input, is swallowed after a refused body (linger)


class BodyStream:
    """The request body as a stream, pulled from the socket through the codec."""

    def __init__(self, server: "HTTPServer", sock: socket.socket, conn: Connection):
        self.server = server
        self.sock = sock
        self.conn = conn
        self.done = False
        self._buf = b""
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def _count(self, n: int) -> None:
        """Enforce MIN_BODY_RATE over windows of idle_timeout_s (slow-drip bodies)."""
        self._window_bytes += n
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed < self.server.idle_timeout:
            return
        if self._window_bytes < MIN_BODY_RATE * elapsed:
            self.conn.keep_alive = False
            self.done = True
            raise HTTPError(408, "The upload is too slow.")
        self._window_start, self._window_bytes = now, 0

    def _next_data(self) -> bytes:
        conn = self.conn
        if conn.they_are_waiting_for_100_continue:
            self.sock.sendall(conn.send(http11.InformationalResponse(100)))
        while True:
            try:
                ev = conn.next_event()
            except ProtocolError as e:
                self.done = True
                raise HTTPError(e.status, f"The request body is malformed: {e.text}.") from None
            if ev is NEED_DATA:
                self.sock.settimeout(self.server.idle_timeout)
                try:
                    data = self.sock.recv(RECV_BYTES)
                except (TimeoutError, socket.timeout):
                    conn.keep_alive = False
                    self.done = True
                    raise HTTPError(408, "The upload stalled.") from None
                if not data:
                    self.done = True
                    conn.keep_alive = False
                    raise ClientGone()
                self._count(len(data))
                conn.receive_data(data)
                continue
            if type(ev) is Data:
                return ev.data
            self.done = True
            return b""

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = [self._buf]
            self._buf = b""
            while not self.done:
                parts.append(self._next_data())
            return b"".join(parts)
        if not self._buf and not self.done:
            self._buf = self._next_data()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def drain(self, limit: int) -> bool:
        """Discard the rest of the body; False if more than `limit` bytes remained."""
        seen = len(self._buf)
        self._buf = b""
        while not self.done and seen <= limit:
            seen += len(self._next_data())
        return self.done


class HTTPServer(TCPService):
    def __init__(self, host: str, port: int, app, http_cfg, name: str = "http",
                 trusted_proxies: frozenset[str] = frozenset(), server_header: str = "PennCloud"):
        self.app = app
        self.cfg = http_cfg
        self.idle_timeout = http_cfg.idle_timeout_s
        self.trusted_proxies = trusted_proxies
        self.server_header = server_header
        super().__init__(host, port, name)
        self.requests = 0            # answered (or abandoned) since start
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active_requests(self) -> int:
        return self._active

    # -- one connection ------------------------------------------------------------

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        cfg = self.cfg
        conn = Connection(http11.SERVER, cfg.max_line_bytes, cfg.max_header_bytes, cfg.max_body_bytes)
        addr = peer[0]
        while not self.tcp.stopping:
            try:
                ev = self._read_head(sock, conn)
            except ProtocolError as e:
                self._fail(sock, e.status, e.text)
                return
            except (TimeoutError, socket.timeout):
                if conn.trailing_data[0]:
                    self._fail(sock, 408, "The request took too long to arrive.")
                return
            if type(ev) is not http11.Request:
                return  # the client closed between requests
            self._exchange(sock, conn, ev, addr)
            if not conn.keep_alive:
                linger(sock)
                return
            conn.start_next_cycle()

    def _read_head(self, sock: socket.socket, conn: Connection):
        deadline = time.monotonic() + self.idle_timeout
        while True:
            ev = conn.next_event()
            if ev is not NEED_DATA:
                return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            sock.settimeout(left)
            conn.receive_data(sock.recv(RECV_BYTES))

    def _exchange(self, sock: socket.socket, conn: Connection, ev: http11.Request, addr: str) -> None:
        body = BodyStream(self, sock, conn)
        if self.trusted_proxies and addr in self.trusted_proxies:
            fwd = ev.headers.get("x-forwarded-for")
            if fwd:
                addr = fwd.rsplit(",", 1)[-1].strip() or addr
        req = Request(ev.method, ev.target, ev.headers, body, addr, ev.version)
        with self._lock:
            self._active += 1
        try:
            try:
                resp = self.app(req)
            except ClientGone:
                conn.keep_alive = False
                return
            self._send(sock, conn, req, resp)
        finally:
            with self._lock:
                self._active -= 1
                self.requests += 1
        if conn.in_state == "body" and conn.keep_alive:
            if conn.they_are_waiting_for_100_continue or not self._drain(body):
                conn.keep_alive = False

    def _drain(self, body: BodyStream) -> bool:
        try:
            return body.drain(DRAIN_LIMIT)
        except (HTTPError, ClientGone):
            return False

    def _send(self, sock: socket.socket, conn: Connection, req: Request, resp: Response) -> None:
        headers = resp.headers
        present = {n.lower() for n, _ in headers}
        headers.append(("Date", _http_date_now()))
        if self.server_header:
            headers.append(("Server", self.server_header))
        # Defaults a handler may override: no MIME sniffing, no framing by other sites.
        if "x-content-type-options" not in present:
            headers.append(("X-Content-Type-Options", "nosniff"))
        if "x-frame-options" not in present:
            headers.append(("X-Frame-Options", "SAMEORIGIN"))
        if "content-security-policy" not in present:   # what every page allows (the mail page: more)
            headers.append(("Content-Security-Policy", "frame-ancestors 'self'; object-src 'none'; base-uri 'self'"))
        if "referrer-policy" not in present:           # no Referer (with its URL) leaves the site
            headers.append(("Referrer-Policy", "same-origin"))
        if req.user is not None and "cache-control" not in present:
            # A logged-in page is no one else's business: after log-out, Back
            # must not show the inbox from the browser's cache.
            headers.append(("Cache-Control", "no-store"))
        if resp.content_type:
            headers.append(("Content-Type", resp.content_type))
        body = resp.body
        status = resp.status
        if isinstance(body, (bytes, bytearray, memoryview)):
            if status != 304 and status != 204 and not 100 <= status < 200:
                headers.append(("Content-Length", str(len(body))))
            else:
                body = b""
            out = conn.send(http11.Response(status, headers))
            if req.method != "HEAD" and body:
                out += conn.send(Data(bytes(body)))
            sock.sendall(out + conn.send(EndOfMessage()))
            return
        if resp.content_length is not None:
            headers.append(("Content-Length", str(resp.content_length)))
        sock.sendall(conn.send(http11.Response(status, headers)))
        try:
            if req.method != "HEAD" and status not in (204, 304):
                for chunk in body:
                    if chunk:
                        sock.sendall(conn.send(Data(chunk)))
            sock.sendall(conn.send(EndOfMessage()))
        except ProtocolError as e:
            log.error("response body of %s %s broke framing: %s", req.method, req.raw_path, e.text)
            conn.keep_alive = False
            raise ConnectionAbortedError() from None
        except (OSError, ClientGone):
            conn.keep_alive = False
            raise
        except BodyCut as e:
            log.info("response body of %s %s cut: %s", req.method, req.raw_path, e)
            conn.keep_alive = False
            raise ConnectionAbortedError() from None
        except Exception:
            # Too late for an error page: the head is out. Cut the connection so
            # the client sees an incomplete body rather than a silently short one.
            log.exception("response body of %s %s failed", req.method, req.raw_path)
            conn.keep_alive = False
            raise ConnectionAbortedError() from None
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    def _fail(self, sock: socket.socket, status: int, text: str) -> None:
        reason = http11.REASONS.get(status, "Error")
        page = (f"<!doctype html><meta charset=utf-8><title>{status} {reason}</title>"
                f"<h1>{status} {reason}</h1><p>{_esc(text)}</p>\n").encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
                f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.sendall(head + page)
        except OSError:
            return
        linger(sock)


def linger(sock: socket.socket) -> None:
    """Half-close and swallow late input briefly, so the client reads our answer.

    Closing a socket whose receive queue holds unread bytes makes Linux send
    a reset, which throws away whatever of our answer is still in the send
    buffer: a client that sent more than we read (a pipelined request, the
    rest of an upload we refused) would get "connection reset" instead of
    the end of the answer. The load balancer uses this too."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        seen = 0
        # Not DRAIN_LIMIT: an uploader at loopback speed sends 1 MiB in a
        # millisecond, and a 2 MB answer (a big folder's page with its 413)
        # was then cut by the reset (QA). 64 MiB take tens of milliseconds.
        while seen < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(RECV_BYTES)
            if not data:
                break
            seen += len(data)
    except OSError:
        pass


_date_cache = (0, "")


def _http_date_now() -> str:
    """The Date header value (RFC 9110 §6.6.1), formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
