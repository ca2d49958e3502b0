"""HTTP frontend throughput vs Python's http.server, keep-alive, 32 connections.

    .venv/bin/python bench/http_bench.py [--seconds 5] [--procs 4] [--conns 32]

Starts, each in its own process:
  * a PennCloud frontend (httpserver.frontend.Frontend over an in-memory KV),
  * `http.server.ThreadingHTTPServer` with `protocol_version = "HTTP/1.1"`
    and `SimpleHTTPRequestHandler`, serving the same directory
    (httpserver/static),
then drives each from `--procs` load processes holding `--conns` keep-alive
connections in total (one request in flight per connection, a selector loop
per process: the load generator is cheap, so the servers are measured).
Uses `wrk` instead when it is installed (same connections and duration).

Prints one table: requests/s for the static file on both servers, the ratio,
and `/home` with a logged-in session on PennCloud (one KV read per request
for the session, plus the page). The machine's other work adds noise: run it
on a quiet machine for numbers worth quoting.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STATIC_DIR = os.path.join(REPO, "httpserver", "static")
STATIC_FILE = "style.css"


# -- servers (each runs in a child process and reports its port on a pipe) ------------

def serve_penncloud(conn) -> None:
    import logging
    logging.disable(logging.WARNING)
    from httpserver.frontend import Frontend
    from src.config import Node, parse_config
    from src.kv import MemoryKV
    import tempfile
    cfg = parse_config({"http": {"admin_password": "bench-admin-1"}}, "bench", tempfile.mkdtemp())
    fe = Frontend(cfg, Node("bench", "127.0.0.1", 0), MemoryKV(), port=0).start()
    conn.send(fe.port)
    conn.recv()   # wait for "stop"
    fe.stop()


def serve_stdlib(conn, nodelay: bool = False) -> None:
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = nodelay

        def log_message(self, *a):
            pass
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=STATIC_DIR))
    srv.daemon_threads = True
    srv.handle_error = lambda *a: None   # connections cut at shutdown are not news
    import threading
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    conn.send(srv.server_address[1])
    conn.recv()
    srv.shutdown()


def serve_stdlib_nodelay(conn) -> None:
    serve_stdlib(conn, nodelay=True)


def start_server(target):
    parent, child = mp.Pipe()
    p = mp.Process(target=target, args=(child,), daemon=True)
    p.start()
    port = parent.recv()
    return p, parent, port


# -- load ---------------------------------------------------------------------------

def load_worker(port: int, request: bytes, conns: int, seconds: float, out) -> None:
    sel = selectors.DefaultSelector()
    bufs = {}
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = b""
        s.send(request)
    done = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            try:
                data = s.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                errors += 1
                sel.unregister(s)
                continue
            buf = bufs[s] + data
            while True:
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                head = buf[:i].lower()
                j = head.find(b"content-length:")
                n = int(head[j + 15:head.find(b"\r\n", j) if head.find(b"\r\n", j) > 0 else None]) if j >= 0 else 0
                if len(buf) < i + 4 + n:
                    break
                if not buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    errors += 1
                buf = buf[i + 4 + n:]
                done += 1
                s.send(request)
            bufs[s] = buf
    for s in bufs:
        s.close()
    out.put((done, errors))


def measure(port: int, path: str, procs: int, conns: int, seconds: float, cookie: str = "") -> tuple[float, int]:
    extra = f"Cookie: {cookie}\r\n" if cookie else ""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
    if shutil.which("wrk"):
        args = ["wrk", "-t", str(procs), "-c", str(conns), "-d", f"{int(seconds)}s"]
        if cookie:
            args += ["-H", f"Cookie: {cookie}"]
        out = subprocess.run(args + [f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Requests/sec:"):
                return float(line.split()[1]), 0
    q = mp.Queue()
    per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    workers = [mp.Process(target=load_worker, args=(port, request, n, seconds, q)) for n in per if n]
    for w in workers:
        w.start()
    results = [q.get() for _ in workers]
    for w in workers:
        w.join()
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results)


def login_cookie(port: int) -> str:
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port)
    body = urllib.parse.urlencode({"username": "bench", "password": "bench password"})
    c.request("POST", "/signup", body, {"Content-Type": "application/x-www-form-urlencoded"})
    r = c.getresponse()
    r.read()
    cookie = r.getheader("Set-Cookie").split(";")[0]
    c.request("GET", "/home", headers={"Cookie": cookie})
    r = c.getresponse()
    assert r.status == 200 and b"Hello, bench" in r.read()
    return cookie


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=4, help="load-generating processes")
    ap.add_argument("--conns", type=int, default=32, help="keep-alive connections in total")
    args = ap.parse_args()

    pc, pc_pipe, pc_port = start_server(serve_penncloud)
    sl, sl_pipe, sl_port = start_server(serve_stdlib)
    sn, sn_pipe, sn_port = start_server(serve_stdlib_nodelay)
    try:
        cookie = login_cookie(pc_port)
        path = f"/static/{STATIC_FILE}"
        rows = []
        for name, port, p, ck in (("http.server (ThreadingHTTPServer, HTTP/1.1)", sl_port, f"/{STATIC_FILE}", ""),
                                  ("http.server + TCP_NODELAY (for fairness)", sn_port, f"/{STATIC_FILE}", ""),
                                  ("PennCloud frontend", pc_port, path, ""),
                                  ("PennCloud frontend, /home with session", pc_port, "/home", cookie)):
            measure(port, p, args.procs, args.conns, 1.0, ck)   # warm-up
            rate, errors = measure(port, p, args.procs, args.conns, args.seconds, ck)
            rows.append((name, p, rate, errors))
    finally:
        for pipe, proc in ((pc_pipe, pc), (sl_pipe, sl), (sn_pipe, sn)):
            pipe.send("stop")
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    size = os.path.getsize(os.path.join(STATIC_DIR, STATIC_FILE))
    tool = "wrk" if shutil.which("wrk") else f"{args.procs} load processes"
    print(f"HTTP keep-alive, {args.conns} connections, {args.seconds:g} s per row, {tool}, "
          f"static file {STATIC_FILE} ({size} bytes), {os.cpu_count()} CPUs")
    print(f"{'server':48} {'path':22} {'requests/s':>11} {'errors':>7}")
    for name, p, rate, errors in rows:
        print(f"{name:48} {p:22} {rate:11.0f} {errors:7d}")
    print(f"PennCloud static / http.server static: {rows[2][2] / (rows[0][2] or 1):.2f}x (target >= 3x); "
          f"/ http.server with TCP_NODELAY: {rows[2][2] / (rows[1][2] or 1):.2f}x")


if __name__ == "__main__":
    main()
