"""The load balancer in-process, in front of small real HTTP servers (stdlib http.server).

These check the LB's own behaviour: policy order, stickiness, streaming both
ways, retry of a GET when a frontend is gone, redirect mode, control-endpoint
protection. tests/test_lb_procs.py runs it with real PennCloud frontends.
"""

import dataclasses
import hashlib
import http.client
import json
import os
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lb.server import LoadBalancer
from src.config import parse_config
from src.heartbeat import LBControlClient, LBControlError
from tests.harness import send_in_background, wait_until


class Backend:
    """A tiny HTTP/1.1 server that says who it is and echoes what it got."""

    def __init__(self, name):
        self.name = name
        self.hits = 0
        self.conns = set()
        backend = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                backend.conns.add(self.connection)

            def _send(self, body: bytes, ctype="text/plain"):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Backend", backend.name)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                backend.hits += 1
                if self.path.startswith("/big/"):
                    n = int(self.path.split("/")[2])
                    self.send_response(200)
                    self.send_header("Content-Length", str(n))
                    self.end_headers()
                    block = bytes(range(256)) * 256
                    left = n
                    while left:
                        k = min(left, len(block))
                        self.wfile.write(block[:k])
                        left -= k
                    return
                info = {"backend": backend.name, "path": self.path, "via": self.headers.get("Via"),
                        "xff": self.headers.get("X-Forwarded-For"), "cookie": self.headers.get("Cookie")}
                self._send(json.dumps(info).encode(), "application/json")

            do_HEAD = do_GET

            def do_POST(self):
                backend.hits += 1
                if self.path.startswith("/slow"):
                    time.sleep(2.5)             # a long piece of work (a big upload's last chunks)
                n = int(self.headers.get("Content-Length", "0"))
                h = hashlib.sha256()
                while n:
                    chunk = self.rfile.read(min(n, 65536))
                    if not chunk:
                        break
                    h.update(chunk)
                    n -= len(chunk)
                self._send(json.dumps({"backend": backend.name, "sha256": h.hexdigest()}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *a: None  # connections the LB or a test cut are expected
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        """Stop as a crash would: the listener and every open connection go."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def make_cfg(tmp_path, ports, policy="round_robin", mode="proxy", secret="", timeout=3.0):
    raw = {
        "cluster": {"secret": secret},
        "frontend": [{"id": f"fe{i + 1}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)],
        "lb": {"id": "lb", "host": "127.0.0.1", "port": 0, "policy": policy, "mode": mode,
               "heartbeat_timeout_s": timeout},
    }
    return parse_config(raw, str(tmp_path / "test.toml"), str(tmp_path / "data"))


@pytest.fixture
def backends():
    bs = [Backend(f"fe{i + 1}") for i in range(3)]
    yield bs
    for b in bs:
        b.stop()


def start_lb(cfg):
    return LoadBalancer(cfg, cfg.lb.node).start()


def beat(lb, cfg, backends, loads=None):
    ctl = LBControlClient("127.0.0.1", lb.port, cfg.cluster.secret)
    for i, b in enumerate(backends):
        ctl.heartbeat(b.name, b.port, (loads or [0] * len(backends))[i])


def get(port, path="/", headers=None, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r, r.read()
    finally:
        c.close()


def test_round_robin_for_new_visitors_and_sticky_cookie(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends)
        order = []
        for _ in range(6):
            r, body = get(lb.port)
            assert r.status == 200
            order.append(json.loads(body)["backend"])
            assert r.getheader("X-PennCloud-Frontend") == order[-1]
        assert order == ["fe1", "fe2", "fe3", "fe1", "fe2", "fe3"]
        # a visitor with the cookie stays on its frontend; the frontend still sees its cookies
        r, _ = get(lb.port)
        cookie = r.getheader("Set-Cookie").split(";")[0]
        first = r.getheader("X-PennCloud-Frontend")
        for _ in range(4):
            r, body = get(lb.port, headers={"Cookie": f"{cookie}; sid=abc"})
            info = json.loads(body)
            assert info["backend"] == first
            assert "sid=abc" in info["cookie"]
            assert info["xff"] == "127.0.0.1"
    finally:
        lb.stop()


def test_least_loaded_sends_new_visitors_to_the_idlest(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends], policy="least_loaded")
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends, loads=[7, 0, 3])
        got = [json.loads(get(lb.port)[1])["backend"] for _ in range(3)]
        assert got == ["fe2", "fe2", "fe2"]  # estimates 1, 2 then 3 (ties rotate: fe3 comes next)
        assert json.loads(get(lb.port)[1])["backend"] == "fe3"
    finally:
        lb.stop()


def test_keep_alive_and_streaming_both_ways(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=20)
        size = 24 * 1024 * 1024
        c.request("GET", f"/big/{size}")
        r = c.getresponse()
        h = hashlib.sha256()
        got = 0
        while chunk := r.read(1 << 20):
            h.update(chunk)
            got += len(chunk)
        assert got == size
        block = bytes(range(256)) * 256
        assert h.hexdigest() == hashlib.sha256(block * (size // len(block))).hexdigest()

        def body():
            for _ in range(16):
                yield b"x" * (1 << 20)
        c.request("POST", "/upload", body=body(), headers={"Content-Length": str(16 << 20)})
        r = c.getresponse()
        assert json.loads(r.read())["sha256"] == hashlib.sha256(b"x" * (16 << 20)).hexdigest()
        c.request("HEAD", "/")  # same connection, kept alive
        r = c.getresponse()
        assert r.status == 200 and r.read() == b""
        c.close()
    finally:
        lb.stop()


def test_dead_frontend_is_invisible_to_gets(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends)
        r, _ = get(lb.port)
        cookie = r.getheader("Set-Cookie").split(";")[0]
        assert r.getheader("X-PennCloud-Frontend") == "fe1"
        backends[0].stop()  # fe1 gone, though its heartbeat is still fresh
        for _ in range(5):
            r, body = get(lb.port, headers={"Cookie": cookie})
            assert r.status == 200
            assert json.loads(body)["backend"] in ("fe2", "fe3")
        st = lb.status()
        assert [f["live"] for f in st["frontends"]] == [False, True, True]
    finally:
        lb.stop()


def test_heartbeat_timeout_and_no_frontend(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]], timeout=1.5)
    lb = start_lb(cfg)
    try:
        r, body = get(lb.port)
        assert r.status == 503 and b"try again" in body
        # the LB's own pages are not to be sniffed or framed (security QA S8)
        assert r.getheader("X-Content-Type-Options") == "nosniff" and r.getheader("X-Frame-Options") == "DENY"
        beat(lb, cfg, backends[:1])
        assert get(lb.port)[0].status == 200
        wait_until(lambda: get(lb.port)[0].status == 503, timeout=6, what="fe1 timed out")
    finally:
        lb.stop()


def test_disabled_frontend_gets_nobody_and_state_survives_restart(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends)
        ctl = LBControlClient("127.0.0.1", lb.port)
        assert ctl.set_enabled("fe2", False) == {"ok": True, "id": "fe2", "enabled": False}
        got = {json.loads(get(lb.port)[1])["backend"] for _ in range(6)}
        assert got == {"fe1", "fe3"}
        with pytest.raises(LBControlError):
            ctl.set_enabled("nope", False)
    finally:
        lb.stop()
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends)
        st = LBControlClient("127.0.0.1", lb.port).status()
        assert [f["enabled"] for f in st["frontends"]] == [True, False, True]
    finally:
        lb.stop()


def test_redirect_mode(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends], mode="redirect")
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends)
        locs = []
        for _ in range(3):
            r, _ = get(lb.port, "/drive?x=1")
            assert r.status == 302
            locs.append(r.getheader("Location"))
        assert locs == [f"http://127.0.0.1:{b.port}/drive?x=1" for b in backends]
    finally:
        lb.stop()


def test_control_endpoints_need_the_secret(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends], secret="s3cret")
    lb = start_lb(cfg)
    try:
        for path, method in [("/_lb/status", "GET"), ("/_lb/heartbeat", "POST"), ("/_lb/frontend/fe1/disable", "POST")]:
            r, _ = get(lb.port, path, method=method)
            assert r.status == 403, path
            r, _ = get(lb.port, path, method=method, headers={"X-PennCloud-Secret": "wrong"})
            assert r.status == 403, path
        with pytest.raises(LBControlError):
            LBControlClient("127.0.0.1", lb.port, "wrong").heartbeat("fe1", backends[0].port, 0)
        beat(lb, cfg, backends)  # with the right secret
        assert get(lb.port)[0].status == 200
        # control paths are never forwarded to a frontend
        assert all(b.hits == 1 or b.hits == 0 for b in backends)
    finally:
        lb.stop()


def test_control_endpoints_refuse_hosts_outside_the_config(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends])
    lb = start_lb(cfg)
    try:
        lb.allowed_ips = {"10.99.99.99"}  # as if this test ran on a machine outside the cluster
        r, _ = get(lb.port, "/_lb/status")
        assert r.status == 403
    finally:
        lb.stop()


def test_malformed_request_gets_400_and_lb_keeps_serving(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends)
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        assert get(lb.port)[0].status == 200
    finally:
        lb.stop()


def test_expect_100_continue_is_passed_on_from_the_frontend(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        body = b"y" * 100_000
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body))
            assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            s.sendall(body)
            data = b""
            while b"}" not in data:
                chunk = s.recv(65536)
                assert chunk
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert hashlib.sha256(body).hexdigest().encode() in data
    finally:
        lb.stop()


def test_malformed_chunked_body_gets_400(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400"), data[:80]  # one clear answer, then the connection ends
        assert get(lb.port)[0].status == 200
    finally:
        lb.stop()


def test_a_head_dripping_in_gets_408_within_the_idle_timeout(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, idle_timeout_s=1.0))
    lb = start_lb(cfg)
    try:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
            t0 = time.monotonic()
            got = b""
            for ch in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
                try:
                    s.sendall(bytes([ch]))
                    time.sleep(0.1)
                except OSError:
                    break
                r, _, _ = select.select([s], [], [], 0)
                if r:
                    got = s.recv(200)
                    break
            assert got.startswith(b"HTTP/1.1 408"), got
            assert time.monotonic() - t0 < 3
    finally:
        lb.stop()


def test_http10_client_without_host(tmp_path, backends):
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
            s.sendall(b"GET /ten HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):  # HTTP/1.0 without keep-alive: the LB closes after the answer
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower()
        assert json.loads(body)["path"] == "/ten"
    finally:
        lb.stop()


def test_a_visitor_right_after_the_lb_starts_waits_for_the_first_beat_not_a_503(tmp_path, backends):
    """./run_all.sh starts the LB last and prints its URL; the frontends beat
    only every quarter of the timeout. Whoever opens the page at once must
    get it, not "PennCloud is busy"."""
    import threading
    import time
    cfg = make_cfg(tmp_path, [b.port for b in backends])
    lb = start_lb(cfg)
    try:
        threading.Timer(0.5, beat, (lb, cfg, backends[:1])).start()
        t0 = time.monotonic()
        r, body = get(lb.port)
        assert r.status == 200 and json.loads(body)["backend"] == "fe1"
        assert time.monotonic() - t0 >= 0.4           # it did wait for the beat
    finally:
        lb.stop()
    cfg = make_cfg(tmp_path, [b.port for b in backends], timeout=1.0)
    lb = start_lb(cfg)
    try:
        time.sleep(1.1)                                # past start-up: no frontend is a 503 at once
        t0 = time.monotonic()
        r, _ = get(lb.port)
        assert r.status == 503 and time.monotonic() - t0 < 0.5
    finally:
        lb.stop()


def test_a_get_waiting_on_a_frontend_that_froze_goes_elsewhere_once_it_stops_beating(tmp_path, backends):
    """A frontend that takes a request and then freezes (SIGSTOP, a host cut
    off) answers nothing; once its heartbeats stop, the LB gives up on it
    and sends the GET to another frontend, in seconds rather than after the
    60 s upstream timeout."""
    hole = socket.socket()                  # accepts, never answers: a frozen frontend
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    cfg = make_cfg(tmp_path, [hole.getsockname()[1], backends[1].port], timeout=1.5)
    lb = start_lb(cfg)
    try:
        ctl = LBControlClient("127.0.0.1", lb.port, cfg.cluster.secret)
        ctl.heartbeat("fe1", hole.getsockname()[1], 0)
        ctl.heartbeat("fe2", backends[1].port, 0)
        stop = threading.Event()

        def keep_fe2_alive():              # fe2 beats on; fe1 has beaten once and is silent now
            while not stop.wait(0.3):
                ctl.heartbeat("fe2", backends[1].port, 0)
        t = threading.Thread(target=keep_fe2_alive, daemon=True)
        t.start()
        began = time.monotonic()
        try:
            r, body = get(lb.port, headers={"Cookie": "pcfe=fe1"})
        finally:
            stop.set()
            t.join(5)
        assert r.status == 200 and json.loads(body)["backend"] == "fe2"
        assert time.monotonic() - began < 8
    finally:
        lb.stop()
        hole.close()


def test_the_body_keeps_its_length_when_connection_names_content_length(tmp_path, backends):
    """`Connection: Content-Length` asks the LB to drop the field it frames
    the body with; the frontend must still get the body."""
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        body = b"username=alice&password=secret"
        s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        s.sendall(b"POST /login HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Content-Length\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        got = b""
        while b"}" not in got:
            data = s.recv(65536)
            if not data:
                break
            got += data
        s.close()
        assert got.startswith(b"HTTP/1.1 200")
        assert json.loads(got.split(b"\r\n\r\n", 1)[1])["sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        lb.stop()


def test_a_client_that_sends_more_still_gets_the_whole_answer(tmp_path, backends):
    """The LB closes a `Connection: close` exchange with unread input from the
    client (a pipelined request, the rest of an upload) by half-closing and
    draining first: a plain close would be a reset that throws away the end
    of the answer still in the LB's send buffer."""
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        n = 3_000_000
        s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        s.sendall(f"GET /big/{n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        time.sleep(0.3)
        s.sendall(b"x" * 1000)               # late input the LB never reads
        time.sleep(0.3)
        got = b""
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += data
        s.close()
        head, _, payload = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(payload) == n
    finally:
        lb.stop()


@pytest.mark.parametrize("load", ["inf", "1e999", "nan", "-1"])
def test_a_heartbeat_with_a_load_that_is_not_a_finite_number_is_refused(tmp_path, backends, load):
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        c.request("POST", "/_lb/heartbeat", body=f"id=fe1&port={backends[0].port}&load={load}",
                  headers={"Content-Type": "application/x-www-form-urlencoded"})
        r = c.getresponse()
        r.read()
        c.close()
        assert r.status == 400
        r, body = get(lb.port, "/_lb/status")
        json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} in /_lb/status"))
    finally:
        lb.stop()


def test_control_endpoints_refuse_browsers_even_from_an_allowed_host(tmp_path, backends):
    """Without a secret the control endpoints trust the configured hosts
    (127.0.0.1): a web page the operator opened could post to them from the
    operator's browser (security QA: it disabled every frontend). A request
    a browser sent (Origin, Sec-Fetch-Site) is refused."""
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
            c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
            c.request("POST", "/_lb/frontend/fe1/disable", body=b"",
                      headers=dict(headers, **{"Content-Type": "text/plain"}))
            r = c.getresponse()
            r.read()
            c.close()
            assert r.status == 403
        assert [f["enabled"] for f in lb.status()["frontends"]] == [True]
        beat(lb, cfg, backends[:1])                        # our own control client still works
        assert get(lb.port)[0].status == 200
    finally:
        lb.stop()


def test_a_slow_request_to_a_beating_frontend_is_not_cut_when_another_request_fails(tmp_path, backends):
    """Review: the LB's wait for an answer gave up on a frontend once it was
    marked failed (by some other request's failure), though it still beat:
    a POST it carried out was answered 502. Only missed heartbeats count."""
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]], timeout=1.5)
    lb = start_lb(cfg)
    stop = threading.Event()
    try:
        ctl = LBControlClient("127.0.0.1", lb.port, cfg.cluster.secret)

        def beat_on():
            while not stop.wait(0.3):
                ctl.heartbeat("fe1", backends[0].port, 0)
        beater = threading.Thread(target=beat_on, daemon=True)
        ctl.heartbeat("fe1", backends[0].port, 0)
        beater.start()
        threading.Timer(1.0, lambda: lb.mark_failed("fe1")).start()   # another request to fe1 failed
        c = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        c.request("POST", "/slow", body=b"work", headers={"Content-Type": "text/plain"})
        r = c.getresponse()
        body = r.read()
        c.close()
        assert r.status == 200 and json.loads(body)["backend"] == "fe1"
    finally:
        stop.set()
        lb.stop()


def test_the_lb_adds_itself_to_via(tmp_path, backends):
    """RFC 9110 7.6.3: a proxy adds itself to Via (security QA: it added only X-Forwarded-*)."""
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        assert json.loads(get(lb.port)[1])["via"] == "1.1 penncloud-lb"
        assert json.loads(get(lb.port, headers={"Via": "1.0 corp-proxy"})[1])["via"] == "1.0 corp-proxy, 1.1 penncloud-lb"
        # Several X-Forwarded-For lines are one list (HTTP QA: only the last was kept).
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n"
                      b"X-Forwarded-For: 10.0.0.2\r\nConnection: close\r\n\r\n")
            got = b""
            while data := s.recv(65536):
                got += data
        assert json.loads(got.partition(b"\r\n\r\n")[2])["xff"] == "10.0.0.1, 10.0.0.2, 127.0.0.1"
    finally:
        lb.stop()


def test_the_pool_keeps_connections_for_less_than_the_frontends_idle_timeout():
    # http.idle_timeout_s may be set as low as 0.1 s: a pooled connection
    # kept the usual 4 s would by then have been closed by the frontend, and
    # the next request sent on it would meet a reset.
    from lb.proxy import POOL_IDLE_S, UpstreamPool
    listener = socket.create_server(("127.0.0.1", 0))
    now = [100.0]
    try:
        addr = listener.getsockname()
        for fe_timeout, idle, reused in ((0.5, 0.3, False), (0.5, 0.2, True), (30.0, POOL_IDLE_S - 0.5, True),
                                         (30.0, POOL_IDLE_S + 0.5, False)):
            pool = UpstreamPool(8192, 65536, 1 << 20, clock=lambda: now[0], frontend_idle_timeout_s=fe_timeout)
            first = pool.get("fe1", addr, pooled_ok=True)
            pool.put(first)
            now[0] += idle
            again = pool.get("fe1", addr, pooled_ok=True)
            assert (again is first) == reused, (fe_timeout, idle)
            again.close()
            first.close()
    finally:
        listener.close()


@pytest.fixture
def real_frontend(tmp_path):
    """One real PennCloud frontend (in-process, MemoryKV) behind an LB."""
    from httpserver.frontend import Frontend
    from src.kv import MemoryKV
    fcfg = parse_config({"drive": {"quota_bytes": "1MiB"},
                         "frontend": [{"id": "fe1", "host": "127.0.0.1", "port": 0}]}, data_dir=str(tmp_path))
    fe = Frontend(fcfg, fcfg.node("fe1"), MemoryKV(), port=0)
    fe.start()
    cfg = make_cfg(tmp_path, [fe.port])
    lb = start_lb(cfg)
    LBControlClient("127.0.0.1", lb.port, "").heartbeat("fe1", fe.port, 0)
    lb.fe = fe                              # (for tests that set up the frontend's store)
    try:
        yield lb
    finally:
        lb.stop()
        fe.stop()


def _answer_within(s, seconds):
    s.settimeout(seconds)
    got = b""
    try:
        while b"\r\n\r\n" not in got:
            data = s.recv(65536)
            if not data:
                break
            got += data
    except socket.timeout:
        pass
    return got



def _signed_up(port, name):
    """Sign `name` up through the LB: (its cookies, its CSRF token, its root folder id)."""
    import re
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", "/signup", body=f"username={name}&password=correct+horse",
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    assert r.status == 303
    cookies = "; ".join(v.split(";")[0] for k, v in r.getheaders() if k.lower() == "set-cookie")
    c.request("GET", "/drive", headers={"Cookie": cookies})
    page = c.getresponse().read().decode()
    c.close()
    return (cookies, re.search(r'name="csrf" value="([^"]+)"', page).group(1),
            re.search(r'action="/drive/upload/([^"]+)"', page).group(1))

@pytest.mark.parametrize("expect", [False, True])
def test_a_frontend_refusing_before_the_body_is_heard_at_once_through_the_lb(real_frontend, expect):
    """Docs QA: the LB streamed the whole body before it read the frontend's
    answer, so a refusal the frontend gives at once (here: no session, 401)
    reached a visitor who sends the head and waits only at its idle
    timeout, with no answer at all; and the LB said `100 Continue` itself,
    so curl uploaded 55 MiB for nothing. The LB now listens to the frontend
    while it streams, and lets it decide about 100 Continue."""
    lb = real_frontend
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(b"POST /drive/upload/x HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                  + (b"Expect: 100-continue\r\n" if expect else b"") + b"Content-Length: 100000000\r\n\r\n")
        got = _answer_within(s, 5)
    assert got.startswith(b"HTTP/1.1 401"), got[:200]


def test_an_upload_over_quota_is_refused_before_its_body_through_the_lb(real_frontend):
    lb = real_frontend
    cookies, csrf, folder = _signed_up(lb.port, "alice")
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(f"POST /drive/upload/{folder} HTTP/1.1\r\nHost: x\r\nCookie: {cookies}\r\n"
                  f"X-CSRF-Token: {csrf}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                  f"Content-Length: 5000000\r\n\r\n".encode())
        s.sendall(b"--zz\r\n" + b"x" * 1000)            # a slow start of a body over the 1 MiB quota
        got = _answer_within(s, 5)
    assert got.startswith(b"HTTP/1.1 413"), got[:200]


def test_after_the_lb_itself_stood_still_it_waits_for_beats_instead_of_503(tmp_path, backends):
    """Gray-failure QA: the LB paused 30 s (SIGSTOP, a paused VM) judged the
    frontends on waking by heartbeats it had not yet read from its socket:
    the requests that had waited through the pause got 503 "busy", every
    frontend up. Like the master, it notices its own stall and waits for
    a beat, as just after its start."""
    class Clock:
        t = 1000.0

        def __call__(self):
            return self.t
    clock = Clock()
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = LoadBalancer(cfg, cfg.lb.node, clock=clock).start()
    try:
        beat(lb, cfg, backends[:1])
        r, _ = get(lb.port, "/x")
        assert r.status == 200
        clock.t += 30.0                                   # the LB stood still; nothing was read
        threading.Timer(0.3, lambda: beat(lb, cfg, backends[:1])).start()   # the beat that waited
        r, body = get(lb.port, "/after")
        assert r.status == 200 and json.loads(body)["path"] == "/after"
    finally:
        lb.stop()


@pytest.mark.parametrize("how", ["waits for 100 Continue", "streams a big body"])
def test_a_post_to_a_frontend_that_froze_gets_its_502_in_seconds(tmp_path, backends, how):
    """HTTP QA: while the LB streamed an upload to a frontend that froze,
    its send blocked for the whole 60 s upstream timeout; a visitor waiting
    for 100 Continue got nothing for 30 s and then a bare close, and the
    frontend was not blamed. Both now end once its heartbeats stop."""
    hole = socket.socket()                  # accepts, never reads or answers: a frozen frontend
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    cfg = make_cfg(tmp_path, [hole.getsockname()[1], backends[1].port], timeout=1.5)
    lb = start_lb(cfg)
    try:
        LBControlClient("127.0.0.1", lb.port, cfg.cluster.secret).heartbeat("fe1", hole.getsockname()[1], 0)
        size = 1000 if how == "waits for 100 Continue" else 64 << 20
        s = socket.create_connection(("127.0.0.1", lb.port), timeout=20)
        s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nCookie: pcfe=fe1\r\nContent-Length: %d\r\n" % size
                  + (b"Expect: 100-continue\r\n" if size == 1000 else b"") + b"\r\n")
        if size > 1000:
            send_in_background(s, 64)
        began = time.monotonic()
        got = _answer_within(s, 15)
        s.close()
        assert got.startswith(b"HTTP/1.1 502"), got[:100]
        assert time.monotonic() - began < 10
    finally:
        lb.stop()
        hole.close()


def test_an_upload_is_answered_when_the_lb_has_more_than_1024_descriptors_open(tmp_path, backends):
    """HTTP QA: with 1,000+ connections open, a POST whose body came in a
    packet of its own got no answer at all: the LB waited on it with
    select(), which cannot watch a descriptor numbered 1024 or more."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("cannot open 1,200 descriptors here")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096, hard))
    filler = [os.pipe() for _ in range(560)]           # the next sockets get numbers over 1024
    cfg = make_cfg(tmp_path, [b.port for b in backends[:1]])
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            assert s.fileno() > 1024
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
            time.sleep(0.2)                              # the body in a packet of its own
            s.sendall(b"hello")
            got = _answer_within(s, 5)
        assert got.startswith(b"HTTP/1.1 200"), got[:100]
    finally:
        lb.stop()
        for r, w in filler:
            os.close(r)
            os.close(w)


def test_a_big_refusal_through_the_lb_while_the_body_streams_is_not_a_deadlock(real_frontend):
    """HTTP QA: a frontend refusing an upload with a big page (its folder
    listing) wrote the page while the LB was blocked sending it more body:
    each waited for the other, and the visitor got 127 KB of the page after
    31 s. The LB now listens to the frontend while a send waits."""
    import re
    lb = real_frontend
    cookies, csrf, root = _signed_up(lb.port, "carol")
    drive = lb.fe.ctx.drive
    for i in range(6000):                   # a page bigger than the sockets' buffers
        drive.mkdir("carol", root, f"{i:04d} " + "x" * 200)
    s = socket.create_connection(("127.0.0.1", lb.port), timeout=20)
    s.sendall(f"POST /drive/upload/{root} HTTP/1.1\r\nHost: x\r\nCookie: {cookies}\r\nX-CSRF-Token: {csrf}\r\n"
              f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {40 << 20}\r\n\r\n".encode())
    send_in_background(s, 40, b"\0")
    beating = threading.Event()

    def beat_on():                          # the frontend is alive all along, as in production
        ctl = LBControlClient("127.0.0.1", lb.port, "")
        while not beating.wait(0.3):
            ctl.heartbeat("fe1", lb.fe.port, 0)
    threading.Thread(target=beat_on, daemon=True).start()
    began = time.monotonic()
    got = b""
    s.settimeout(15)
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            got += data
    finally:
        beating.set()
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head[:100]
    assert len(body) == int(re.search(rb"(?i)content-length: (\d+)", head).group(1)) > 12_000_000
    assert time.monotonic() - began < 10


def test_a_body_over_the_limit_gets_a_too_large_page(tmp_path, backends):
    """HTTP QA: the LB's page for a chunked body over the limit said "Bad request"."""
    raw = {"frontend": [{"id": "fe1", "host": "127.0.0.1", "port": backends[0].port}],
           "lb": {"id": "lb", "host": "127.0.0.1", "port": 0}, "http": {"max_body_bytes": 1000}}
    cfg = parse_config(raw, str(tmp_path / "test.toml"), str(tmp_path / "data"))
    lb = start_lb(cfg)
    try:
        beat(lb, cfg, backends[:1])
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n7D0\r\n" + b"x" * 2000
                      + b"\r\n0\r\n\r\n")
            got = _answer_within(s, 5)
            while b"</html>" not in got and (more := s.recv(65536)):
                got += more
        assert got.startswith(b"HTTP/1.1 413") and b"Too large" in got and b"Bad request" not in got
    finally:
        lb.stop()
