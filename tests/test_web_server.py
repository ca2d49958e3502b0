"""The HTTP server over real sockets: keep-alive, pipelining, chunked bodies,
100-continue, error statuses, slowloris, static files, uploads, and the same
answers through http.client and curl."""

import hashlib
import http.client
import os
import shutil
import socket
import subprocess
import time

import pytest

from httpserver import http11
from httpserver.serve import HTTPServer
from httpserver.sessions import Sessions
from httpserver.web import App, BodyCut, Response, Router, StaticFiles, json_response, text
from src.config import parse_config
from src.kv import MemoryKV


def make_app(static_dir):
    r = Router()
    static = StaticFiles(str(static_dir))

    @r.route("GET", "/hello", login=False)
    def hello(req):
        return text(f"hello {req.arg('name', 'world')}")

    @r.route("POST", "/echo", login=False, csrf=False)
    def echo(req):
        h, n = hashlib.sha256(), 0
        while chunk := req.read(65536):
            h.update(chunk)
            n += len(chunk)
        return json_response({"bytes": n, "sha256": h.hexdigest()})

    @r.route("POST", "/ignore", login=False, csrf=False)
    def ignore(req):
        return text("did not read")

    @r.route("GET", "/stream", login=False)
    def stream(req):
        return Response(200, (b"part%d," % i for i in range(5)), content_type="text/plain")

    @r.route("GET", "/stream-len", login=False)
    def stream_len(req):
        return Response(200, iter([b"abc", b"def"]), content_type="text/plain", content_length=6)

    @r.route("GET", "/cut/<why>", login=False)
    def cut(req, why):
        def body():
            yield b"first part,"
            raise BodyCut("the file was deleted meanwhile") if why == "gone" else RuntimeError("a bug")
        return Response(200, body(), content_type="text/plain", content_length=100)

    @r.route("POST", "/upload", login=False, csrf=False)
    def upload(req):
        out = []
        for part in req.multipart():
            h, n = hashlib.sha256(), 0
            for chunk in part:
                h.update(chunk)
                n += len(chunk)
            out.append([part.name, part.filename, n, h.hexdigest()])
        return json_response(out)

    r.route("GET", "/static/<name:path>", login=False, session=False)(lambda req, name: static.serve(req, name))
    return App(r, Sessions(MemoryKV()))


@pytest.fixture
def server(tmp_path):
    static_dir = tmp_path / "static"
    static_dir.mkdir()
    (static_dir / "page.txt").write_bytes(b"0123456789" * 100)
    (tmp_path / "secret.txt").write_bytes(b"not for the web")
    cfg = parse_config({"http": {"idle_timeout_s": 0.6, "max_body_bytes": "64MiB", "max_line_bytes": 1024,
                                 "max_header_bytes": 4096}}, "test", str(tmp_path))
    srv = HTTPServer("127.0.0.1", 0, make_app(static_dir), cfg.http, name="test").start()
    try:
        yield srv
    finally:
        srv.stop()


def connect(srv) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    return s


def read_responses(sock, n, methods=None):
    """Parse `n` responses with the codec's client side; [(status, headers, body)]."""
    conn = http11.Connection(http11.CLIENT)
    for m in (methods or ["GET"] * n):
        conn.send(http11.Request(m, "/", [("Host", "x")]))
        conn.send(http11.EndOfMessage())
    out, cur = [], None
    while len(out) < n:
        ev = conn.next_event()
        if ev is http11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        if type(ev) is http11.Response:
            cur = [ev.status, ev.headers, b""]
        elif type(ev) is http11.Data:
            cur[2] += ev.data
        elif type(ev) is http11.EndOfMessage:
            out.append(tuple(cur))
        elif type(ev) is http11.ConnectionClosed:
            break
    return out


def closed(sock, timeout=3.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_keep_alive_and_pipelining(server):
    s = connect(server)
    s.sendall(b"GET /hello?name=a HTTP/1.1\r\nHost: x\r\n\r\n"
              b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
              b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    rs = read_responses(s, 4, ["GET", "POST", "HEAD", "GET"])
    assert [r[0] for r in rs] == [200, 200, 200, 200]
    assert rs[0][2] == b"hello a"
    assert b'"bytes":3' in rs[1][2]
    assert rs[2][2] == b"" and rs[2][1].get("content-length") == "11"
    assert rs[3][2] == b"part0,part1,part2,part3,part4," and rs[3][1].get("transfer-encoding") == "chunked"
    # still open: one more on the same connection
    s.sendall(b"GET /stream-len HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    r = read_responses(s, 1)[0]
    assert r[2] == b"abcdef" and r[1].get("content-length") == "6"
    assert closed(s)
    s.close()


def test_chunked_request_body_with_trailers(server):
    s = connect(server)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n")
    r = read_responses(s, 1, ["POST"])[0]
    assert r[0] == 200 and hashlib.sha256(b"hello world").hexdigest().encode() in r[2]
    s.close()


def test_expect_100_continue(server):
    s = connect(server)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
    assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"data")
    r = read_responses(s, 1, ["POST"])[0]
    assert r[0] == 200 and b'"bytes":4' in r[2]
    # A handler that does not read: no 100, an answer, and the connection closes.
    s2 = connect(server)
    s2.sendall(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
    r = read_responses(s2, 1, ["POST"])[0]
    assert r[0] == 200 and r[1].get("connection") == "close"
    assert closed(s2)
    s.close()
    s2.close()


def test_unread_small_body_is_drained_and_connection_kept(server):
    s = connect(server)
    s.sendall(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
              b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    rs = read_responses(s, 2, ["POST", "GET"])
    assert [r[2] for r in rs] == [b"did not read", b"hello world"]
    s.close()


@pytest.mark.parametrize("raw,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 2000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 0123456789012345678901234567890\r\n" * 150 + b"\r\n", 431),
    (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
])
def test_malformed_requests_get_their_status_and_a_close(server, raw, status):
    s = connect(server)
    s.sendall(raw)
    data = b""
    s.settimeout(5)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:100]
    assert b"Connection: close" in data
    s.close()
    # and the server still serves
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    c.request("GET", "/hello")
    assert c.getresponse().read() == b"hello world"
    c.close()


def test_bad_chunk_mid_body_is_400(server):
    s = connect(server)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX")
    r = read_responses(s, 1, ["POST"])[0]
    assert r[0] == 400 and b"malformed" in r[2]
    assert closed(s)
    s.close()


def test_slowloris_head_deadline(server):
    """Dripping a header byte every 0.1 s does not keep the thread: 408 after ~idle_timeout_s."""
    s = connect(server)
    start = time.monotonic()
    head = b"GET /hello HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200
    got = b""
    s.settimeout(0.1)
    for b in head:
        try:
            s.send(bytes([b]))
        except OSError:
            break
        try:
            got += s.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
        if got:
            break
        if time.monotonic() - start > 5:
            break
    elapsed = time.monotonic() - start
    assert got.startswith(b"HTTP/1.1 408 "), got[:80]
    assert elapsed < 2.0
    s.close()


def test_idle_keep_alive_connection_is_closed(server):
    s = connect(server)
    s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_responses(s, 1)[0][0] == 200
    start = time.monotonic()
    assert closed(s, timeout=3)
    assert time.monotonic() - start < 2.0
    s.close()


def test_static_conditional_and_range(server):
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    c.request("GET", "/static/page.txt")
    r = c.getresponse()
    body = r.read()
    assert r.status == 200 and len(body) == 1000 and r.getheader("Content-Type") == "text/plain; charset=utf-8"
    etag, lm = r.getheader("ETag"), r.getheader("Last-Modified")
    c.request("GET", "/static/page.txt", headers={"If-None-Match": etag})
    r = c.getresponse()
    assert r.status == 304 and r.read() == b""
    c.request("GET", "/static/page.txt", headers={"If-Modified-Since": lm})
    r = c.getresponse()
    assert r.status == 304 and r.read() == b""
    c.request("GET", "/static/page.txt", headers={"Range": "bytes=10-14"})
    r = c.getresponse()
    assert r.status == 206 and r.read() == b"01234" and r.getheader("Content-Range") == "bytes 10-14/1000"
    c.request("GET", "/static/page.txt", headers={"Range": "bytes=5000-"})
    r = c.getresponse()
    assert r.status == 416 and r.getheader("Content-Range") == "bytes */1000"
    r.read()
    for bad in ("/static/../secret.txt", "/static/%2e%2e/secret.txt", "/static/..%2fsecret.txt", "/static/nope.css"):
        c.request("GET", bad)
        r = c.getresponse()
        r.read()
        assert r.status == 404
    c.close()


def test_multipart_upload_streams(server):
    big = os.urandom(256 * 1024) * 40      # 10 MiB
    boundary = "----pytestBoundary7"
    pre = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\nT\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\n"
           f"Content-Type: application/octet-stream\r\n\r\n").encode()
    post = f"\r\n--{boundary}--\r\n".encode()

    def body():
        yield pre
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]
        yield post
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("POST", "/upload", body=body(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(pre) + len(big) + len(post))})
    r = c.getresponse()
    import json
    parts = json.loads(r.read())
    assert r.status == 200
    assert parts == [["csrf", None, 1, hashlib.sha256(b"T").hexdigest()],
                     ["file", "big.bin", len(big), hashlib.sha256(big).hexdigest()]]
    c.close()


CASES = [
    ("GET", "/hello?name=x", None, {}),
    ("HEAD", "/hello", None, {}),
    ("GET", "/static/page.txt", None, {"Range": "bytes=-3"}),
    ("GET", "/stream", None, {}),
    ("POST", "/echo", b"some body bytes", {"Content-Type": "application/octet-stream"}),
    ("GET", "/no/such/page", None, {}),
    ("DELETE", "/hello", None, {}),
]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_http_client_and_curl_agree(server):
    for method, path, body, headers in CASES:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        py = (r.status, r.read(), r.getheader("Content-Type"), r.getheader("Allow"))
        c.close()
        args = ["curl", "-s", "-S", "--max-time", "5", "-X", method, "-D", "-", "-o", "-"]
        if method == "HEAD":
            args = ["curl", "-s", "-S", "--max-time", "5", "-I"]
        for k, v in headers.items():
            args += ["-H", f"{k}: {v}"]
        if body is not None:
            args += ["--data-binary", body.decode()]
        out = subprocess.run(args + [f"http://127.0.0.1:{server.port}{path}"], capture_output=True,
                             timeout=10).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        if method == "HEAD":
            rest = b""
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        assert (status, rest, hdrs.get("content-type"), hdrs.get("allow")) == py, (method, path)


def test_dripping_body_gets_408(server):
    """A body sent a byte at a time, each just inside the recv timeout, is cut off
    by the minimum body rate: the thread is not held for ever."""
    s = connect(server)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    start = time.monotonic()
    s.settimeout(0.4)
    got = b""
    while time.monotonic() - start < 5:
        try:
            s.send(b"a")
            got += s.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
        if got:
            break
    assert got.startswith(b"HTTP/1.1 408 "), got[:80]
    assert time.monotonic() - start < 3.0
    s.close()


def test_stalled_body_gets_408(server):
    s = connect(server)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    start = time.monotonic()
    r = read_responses(s, 1, ["POST"])[0]
    assert r[0] == 408 and time.monotonic() - start < 3.0
    assert closed(s)
    s.close()


@pytest.mark.parametrize("why,level", [("gone", "INFO"), ("bug", "ERROR")])
def test_a_body_that_fails_after_the_head_is_cut_and_logged_as_what_it_is(server, caplog, why, level):
    """Too late for an error page: the connection is cut so the client sees an
    incomplete body. A file deleted meanwhile (BodyCut) is one INFO line; a
    bug is an ERROR with its traceback."""
    import logging
    caplog.set_level(logging.INFO, logger="httpserver.serve")
    sock = connect(server)
    sock.sendall(f"GET /cut/{why} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    got = b""
    while True:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    sock.close()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"first part,")
    [rec] = [r for r in caplog.records if "response body" in r.getMessage()]
    assert rec.levelname == level and (rec.exc_info is None) == (why == "gone")


def test_options_star_is_about_the_whole_server(server):
    sock = connect(server)
    sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        got += sock.recv(4096)
    sock.close()
    assert got.startswith(b"HTTP/1.1 200") and b"Allow: GET, HEAD, POST" in got
