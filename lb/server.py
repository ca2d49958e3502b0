"""The load balancer process: the one address visitors type (8080).

Every visitor connection is served on its own thread (src/server.TCPServer)
with an HTTP/1.1 codec in the server role; keep-alive and pipelining towards
the visitor work as on a frontend. Each request goes one of three ways:

1. `/_lb/...`: the LB's own control endpoints (docs/lb.md). Only the cluster
   may call them: with `cluster.secret` set, the request must carry it in the
   `X-PennCloud-Secret` header; without a secret, the peer's address must be
   one of the hosts named in the config. Never forwarded to a frontend.
       POST /_lb/heartbeat              id, port, load (urlencoded)
       GET  /_lb/status                 JSON: mode, policy, every frontend
       POST /_lb/frontend/<id>/enable   and .../disable
2. mode "redirect": `302 Found` to the chosen frontend's own address.
3. mode "proxy" (the default): the request is forwarded to the chosen frontend
   and the answer streamed back (lb/proxy.py). A visitor is sticky to one
   frontend through the cookie `pcfe` while that frontend is usable; a new
   visitor, or one whose frontend died or was disabled, gets the next one by
   the policy (lb/balancer.py). If the frontend cannot be reached, or fails
   before answering a GET or HEAD that has no body, the request is retried on
   another frontend, so a dead frontend is invisible to visitors; other
   requests (a POST whose body is already gone) get a 502 page instead.

Disabled frontends are remembered in `<data>/<lb id>/disabled.json`, so an
LB restart keeps the operator's choice.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import threading
import time
import urllib.parse

from httpserver.http11 import (NEED_DATA, REASONS, SERVER, Connection, Data, EndOfMessage, InformationalResponse,
                               ProtocolError, Request, Response)
from httpserver.serve import linger
from httpserver.web import parse_cookies
from lb.balancer import Balancer, UnknownFrontend
from lb.proxy import RECV_BYTES, Channel, ChannelError, UpstreamPool, end_to_end, forward_body, has_body, \
    read_response_head, stream_body, upstream_request
from src.config import Config, Node
from src.fsutil import atomic_write
from src.heartbeat import CONTROL_PREFIX, SECRET_HEADER
from src.server import TCPServer

log = logging.getLogger(__name__)

STICKY_COOKIE = "pcfe"
FRONTEND_HEADER = "X-PennCloud-Frontend"
MAX_CONTROL_BODY = 64 * 1024
STARTUP_POLL_S = 0.05        # how often a request that came before any frontend's beat looks again
CLOCK_TICK_S = 0.1           # the clock watcher looks this often...
STALL_S = 1.0                # ...and a look this much later means the LB itself stood still
SAFE_METHODS = ("GET", "HEAD")

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title} - PennCloud</title>
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36rem;margin:12vh auto;padding:0 1rem;color:#1f2937}}
h1{{font-size:1.4rem}}a{{color:#2563eb}}</style></head>
<body><h1>{title}</h1><p>{text}</p><p><a href="/">Try again</a></p></body></html>"""


def _page(title: str, text: str) -> bytes:
    # Only fixed strings from this module go in: nothing from the request.
    return _PAGE.format(title=title, text=text).encode()


class LoadBalancer:
    def __init__(self, cfg: Config, node: Node, port: int | None = None, clock=time.monotonic):
        self.cfg = cfg
        self.node = node
        self.mode = cfg.lb.mode
        self.clock = clock
        self.started = clock()
        self._awake_since = self.started   # since the start, or since the LB last stood still
        self._ticked = self.started        # the clock watcher's last look
        self._stop = threading.Event()
        self._state_path = os.path.join(cfg.process_dir(node.id), "disabled.json")
        self.balancer = Balancer(cfg.frontends, cfg.lb.policy, cfg.lb.heartbeat_timeout_s,
                                 disabled=set(self._load_disabled()))
        self._lock = threading.Lock()  # guards balancer and the counters; never held across I/O
        self.requests = 0
        self.failures = 0  # frontends found dead by the proxy
        self.pool = UpstreamPool(cfg.http.max_line_bytes, cfg.http.max_header_bytes, cfg.http.max_body_bytes,
                                 frontend_idle_timeout_s=cfg.http.idle_timeout_s)
        self.allowed_ips = self._cluster_ips(cfg)
        self.server = TCPServer(node.host, node.port if port is None else port, self._handle, name=node.id)

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> "LoadBalancer":
        self.server.start()
        threading.Thread(target=self._watch_clock, name=f"{self.node.id}-clock", daemon=True).start()
        log.info("load balancer %s: mode %s, policy %s, %d frontends", self.node.id, self.mode,
                 self.balancer.policy, len(self.cfg.frontends))
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
        self.pool.close_all()

    def _watch_clock(self) -> None:
        while not self._stop.wait(CLOCK_TICK_S):
            with self._lock:
                self._noticed_stall(self.clock())

    def _noticed_stall(self, now: float) -> None:
        """(Under the lock.) Has the LB itself stood still (a paused VM,
        SIGSTOP) since the watcher last looked? Then the frontends' beats of
        that time wait unread in its socket, and for one heartbeat timeout
        it judges nobody by them, as just after its start. Also asked by
        requests, which may run before the watcher after a pause."""
        if now - self._ticked > STALL_S:
            self._awake_since = now
            log.warning("the load balancer stood still for %.1fs: waiting for heartbeats before judging "
                        "frontends", now - self._ticked)
        self._ticked = now

    # -- state -------------------------------------------------------------------------

    def _load_disabled(self) -> list[str]:
        try:
            with open(self._state_path) as f:
                ids = json.load(f).get("disabled", [])
            return [i for i in ids if isinstance(i, str)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, AttributeError) as e:
            log.warning("ignoring unreadable %s: %s", self._state_path, e)
            return []

    def _save_disabled(self, ids: list[str]) -> None:
        os.makedirs(os.path.dirname(self._state_path), exist_ok=True)
        atomic_write(self._state_path, json.dumps({"disabled": ids}).encode())

    @staticmethod
    def _cluster_ips(cfg: Config) -> set[str]:
        """Addresses of every host the config names (who may call control endpoints without a secret)."""
        ips = set()
        for n in cfg.processes:
            try:
                for info in socket.getaddrinfo(n.host, None, proto=socket.IPPROTO_TCP):
                    ips.add(info[4][0])
            except OSError:
                log.warning("cannot resolve %s (%s); it may not call the LB's control endpoints", n.host, n.id)
        return ips

    def status(self) -> dict:
        with self._lock:
            now = self.clock()
            return {"id": self.node.id, "addr": f"{self.node.host}:{self.port}", "mode": self.mode,
                    "policy": self.balancer.policy, "timeout_s": self.balancer.timeout_s,
                    "uptime_s": round(now - self.started, 1), "requests": self.requests,
                    "frontend_failures": self.failures, "connections": self.server.connection_count,
                    "frontends": self.balancer.snapshot(now)}

    def pick(self, sticky: str | None, exclude: set[str]):
        """(frontend, newly_assigned) for a request; (None, False) when none is usable.

        Just after the LB starts, no frontend has had time to beat yet (they
        beat every quarter of the timeout, and `./run_all.sh` starts the LB
        last): a request then waits for the first beat, up to the timeout,
        instead of a 503 to whoever opens the page first. The same after the
        LB itself stood still (`_noticed_stall`)."""
        while True:
            with self._lock:
                now = self.clock()
                self._noticed_stall(now)
                if sticky and sticky not in exclude and self.balancer.usable(sticky, now):
                    return self.balancer.get(sticky), False
                fe = self.balancer.choose(now, exclude)
                waking = now - self._awake_since <= self.balancer.timeout_s
            if fe is not None or exclude or not waking:
                return fe, True
            time.sleep(STARTUP_POLL_S)

    def _stopped_beating(self, fe_id: str) -> bool:
        """Has `fe_id` missed its heartbeats (frozen, or cut off) since a
        request went to it? Heartbeats only: a frontend marked failed because
        one other request to it failed may still be doing this one's work
        (cutting it would answer 502 for a POST it carried out)."""
        with self._lock:
            now = self.clock()
            self._noticed_stall(now)
            if now - self._awake_since <= self.balancer.timeout_s:
                return False            # (the LB has just stood still itself: no judging yet)
            return not self.balancer.get(fe_id).beating(now, self.balancer.timeout_s)

    def mark_failed(self, fe_id: str) -> None:
        with self._lock:
            self.balancer.mark_failed(fe_id)
            self.failures += 1
        self.pool.drop(fe_id)
        log.warning("frontend %s failed; out of rotation until its next heartbeat", fe_id)

    # -- one visitor connection ----------------------------------------------------------

    def _handle(self, sock: socket.socket, peer: tuple) -> None:
        try:
            self._serve(sock, peer)
        finally:
            linger(sock)    # else late input makes the close a reset that eats our answer's end

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        sock.settimeout(self.cfg.http.idle_timeout_s)
        h = self.cfg.http
        client = Channel(sock, Connection(SERVER, h.max_line_bytes, h.max_header_bytes, h.max_body_bytes), "client")
        while True:
            ev = self._read_head(client)
            if type(ev) is not Request:
                return
            try:
                if not has_body(ev):
                    end = client.next_event()  # a body-less request ends at once
                    if type(end) is not EndOfMessage:
                        return
                if ev.target.startswith(CONTROL_PREFIX):
                    self._control(client, ev, peer[0])
                else:
                    with self._lock:
                        self.requests += 1  # visitors' requests only, not heartbeats
                    if self.mode == "redirect":
                        self._redirect(client, ev)
                    else:
                        self._proxy(client, ev, peer[0])
            except ChannelError as e:
                if e.side == "client":
                    if isinstance(e.cause, ProtocolError) and client.conn.out_state == "idle":
                        try:  # a malformed body: answer it if nothing was answered yet
                            too_large = e.cause.status == 413
                            self._reply(client, e.cause.status, "Too large" if too_large else "Bad request",
                                        "The request is larger than this site takes." if too_large
                                        else "The request could not be read.", close=True)
                        except ChannelError:
                            pass
                    return
                log.warning("proxying %s %s failed: %s", ev.method, ev.target.split("?")[0], e)
                return
            if not client.conn.keep_alive or client.conn.in_state != "done" or client.conn.out_state != "done":
                return
            client.conn.start_next_cycle()

    def _read_head(self, client: Channel):
        """The next request head, or None to close the connection.

        The whole head must arrive within `idle_timeout_s` (a client dripping
        one byte at a time cannot hold a thread longer); a malformed head gets
        its status and a close, a stalled one 408.
        """
        conn, sock = client.conn, client.sock
        idle = self.cfg.http.idle_timeout_s
        deadline = time.monotonic() + idle
        try:
            while True:
                ev = conn.next_event()
                if ev is not NEED_DATA:
                    return ev if type(ev) is Request else None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                sock.settimeout(left)
                conn.receive_data(sock.recv(RECV_BYTES))
        except ProtocolError as e:
            _raw_error(sock, e.status)
        except (TimeoutError, socket.timeout):
            if conn.trailing_data[0]:
                _raw_error(sock, 408)
        except OSError:
            pass
        finally:
            try:
                sock.settimeout(idle)
            except OSError:
                pass
        return None

    def _reply(self, client: Channel, status: int, title: str, text: str, close: bool = False,
               headers=(), body: bytes | None = None, content_type: str = "text/html; charset=utf-8"):
        if body is None:
            body = _page(title, text)
        items = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                 ("Cache-Control", "no-store"), *_OWN_PAGE_HEADERS, *headers]
        if close or client.conn.in_state not in ("done",):
            items.append(("Connection", "close"))
        client.send(Response(status, items), Data(body), EndOfMessage())

    # -- control endpoints -----------------------------------------------------------------

    def _authorized(self, req: Request, client_ip: str) -> bool:
        if req.headers.get("origin") is not None or req.headers.get("sec-fetch-site") is not None:
            # A browser: a web page the operator visits could otherwise send
            # these from 127.0.0.1 (disable every frontend, or point one at
            # its own port). Our processes' control client sends neither.
            return False
        secret = self.cfg.cluster.secret
        if secret:
            given = req.headers.get(SECRET_HEADER) or ""
            return hmac.compare_digest(given.encode(), secret.encode())
        return client_ip in self.allowed_ips

    def _read_small_body(self, client: Channel) -> bytes | None:
        """The request body if it is at most MAX_CONTROL_BODY bytes, else None."""
        if client.conn.in_state == "done":
            return b""
        if client.conn.they_are_waiting_for_100_continue:
            client.send(InformationalResponse(100))
        body = bytearray()
        while True:
            ev = client.next_event()
            if type(ev) is EndOfMessage:
                return bytes(body)
            if type(ev) is not Data:
                raise ChannelError("client", "body ended unexpectedly")
            body += ev.data
            if len(body) > MAX_CONTROL_BODY:
                return None

    def _json(self, client: Channel, status: int, obj) -> None:
        self._reply(client, status, "", "", body=json.dumps(obj).encode(), content_type="application/json")

    def _control(self, client: Channel, req: Request, client_ip: str) -> None:
        if not self._authorized(req, client_ip):
            log.warning("refused LB control request %s %s from %s", req.method, req.target.split("?")[0], client_ip)
            return self._json(client, 403, {"error": "control endpoints are for the cluster only"})
        body = self._read_small_body(client)
        if body is None:
            return self._json(client, 413, {"error": "body too large"})
        path = urllib.parse.urlsplit(req.target).path
        parts = [urllib.parse.unquote(p) for p in path[len(CONTROL_PREFIX):].split("/")]
        form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode("latin-1")).items()}
        try:
            if parts == ["heartbeat"] and req.method == "POST":
                with self._lock:
                    self.balancer.heartbeat(form.get("id", ""), int(form.get("port", "0")),
                                            float(form.get("load", "0")), self.clock())
                return self._json(client, 200, {"ok": True})
            if parts == ["status"] and req.method in ("GET", "HEAD"):
                return self._json(client, 200, self.status())
            if len(parts) == 3 and parts[0] == "frontend" and parts[2] in ("enable", "disable") \
                    and req.method == "POST":
                with self._lock:
                    fe = self.balancer.set_enabled(parts[1], parts[2] == "enable")
                    disabled = self.balancer.disabled_ids()
                self._save_disabled(disabled)
                log.info("frontend %s %sd by an operator", fe.id, parts[2])
                return self._json(client, 200, {"ok": True, "id": fe.id, "enabled": fe.enabled})
        except UnknownFrontend as e:
            return self._json(client, 404, {"error": f"no frontend named {e.args[0]!r} in the config"})
        except ValueError as e:
            return self._json(client, 400, {"error": f"bad request: {e}"})
        return self._json(client, 404, {"error": "no such control endpoint"})

    # -- redirect mode -------------------------------------------------------------------

    def _redirect(self, client: Channel, req: Request) -> None:
        fe, _ = self.pick(None, set())
        if fe is None:
            return self._unavailable(client, req)
        target = req.target if req.target.startswith("/") else "/"
        location = f"http://{fe.host}:{fe.port}{target}"
        self._reply(client, 302, "Moved", "This page is served by another address.",
                    headers=[("Location", location), (FRONTEND_HEADER, fe.id)], close=has_body(req))

    def _unavailable(self, client: Channel, req: Request) -> None:
        self._reply(client, 503, "PennCloud is busy",
                    "No web server is available right now. Please try again in a few seconds.",
                    headers=[("Retry-After", "2")], close=has_body(req))

    # -- proxy mode ------------------------------------------------------------------------

    def _proxy(self, client: Channel, req: Request, client_ip: str) -> None:
        sticky = _cookie(req, STICKY_COOKIE)
        body = has_body(req)
        safe = req.method in SAFE_METHODS and not body
        tried: set[str] = set()
        fresh_for: set[str] = set()  # frontends whose pooled connection failed: use a new one
        out = upstream_request(req, client_ip, expect_continue=client.conn.they_are_waiting_for_100_continue)
        while True:
            fe, assigned = self.pick(sticky, tried)
            if fe is None:
                return self._unavailable(client, req)
            try:
                up = self.pool.get(fe.id, (fe.host, fe.port), pooled_ok=safe and fe.id not in fresh_for,
                                   gone=self._stopped_beating)
            except OSError as e:
                log.info("cannot connect to frontend %s at %s: %s", fe.id, fe.addr, e)
                self.mark_failed(fe.id)
                tried.add(fe.id)
                continue
            try:
                resp = self._exchange(client, up, out, body)
            except ChannelError as e:
                up.close()
                if e.side == "client":
                    raise
                if not safe:
                    log.warning("frontend %s failed during %s %s: %s", fe.id, req.method,
                                req.target.split("?")[0], e)
                    self.mark_failed(fe.id)
                    return self._reply(client, 502, "Something went wrong",
                                       "The web server handling your request failed. Please try again.",
                                       close=True)
                if up.reused and not up.received_any:
                    fresh_for.add(fe.id)  # the frontend may simply have closed an idle connection
                else:
                    self.mark_failed(fe.id)
                    tried.add(fe.id)
                continue
            break
        self._respond(client, up, resp, fe, set_cookie=assigned or sticky != fe.id)

    def _exchange(self, client: Channel, up, out: Request, body: bool) -> Response:
        """Send the request (streaming its body) and read the response head."""
        up.send(out)
        if body:
            try:
                early = forward_body(client, up)
            except ChannelError as e:
                if e.side == "client":
                    raise
                # The frontend stopped reading (e.g. it refused the upload early):
                # its answer may still be there; the visitor's connection must close.
                client.conn.keep_alive = False
            else:
                if early is not None:           # answered before the body ended: the rest stays unread
                    client.conn.keep_alive = False
                    return early
        else:
            up.send(EndOfMessage())
        return read_response_head(up)

    def _respond(self, client: Channel, up, resp: Response, fe, set_cookie: bool) -> None:
        items = end_to_end(resp.headers)
        items.append((FRONTEND_HEADER, fe.id))
        if set_cookie:
            items.append(("Set-Cookie", f"{STICKY_COOKIE}={fe.id}; Path=/; HttpOnly; SameSite=Lax"))
        if not client.conn.keep_alive:
            items.append(("Connection", "close"))
        try:
            first = up.next_event()  # sent with the head: one write for a small answer
            client.send(Response(resp.status, items, resp.reason), first)
            if type(first) is Data:
                stream_body(up, client)
            elif type(first) is not EndOfMessage:
                raise ChannelError("upstream", f"unexpected {first!r}")
        except ChannelError:
            up.close()
            raise
        self.pool.put(up)


# The LB's own pages (502, 503, its errors, /_lb/status) carry what the
# frontends' pages do: no sniffing, no framing by other sites.
_OWN_PAGE_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                     ("Content-Security-Policy",
                      "frame-ancestors 'none'; default-src 'none'; style-src 'unsafe-inline'"))


def _raw_error(sock: socket.socket, status: int) -> None:
    """Answer a request the codec could not parse (it has no request to answer), then close."""
    reason = REASONS.get(status, "Error")
    body = _page(f"{status} {reason}", "The request took too long to arrive." if status == 408
                 else "The request could not be understood.")
    extra = "".join(f"{n}: {v}\r\n" for n, v in _OWN_PAGE_HEADERS)
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    try:
        sock.sendall(head + body)
    except OSError:
        pass


def _cookie(req: Request, name: str) -> str | None:
    return parse_cookies(req.headers.get_all("cookie")).get(name)
