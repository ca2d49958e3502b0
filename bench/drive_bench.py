"""Drive benchmark: upload and download of one big file through a frontend.

    .venv/bin/python bench/drive_bench.py                    # 1 GiB (a few minutes)
    .venv/bin/python bench/drive_bench.py --size 128MiB      # a quick run
    .venv/bin/python bench/drive_bench.py --cluster 3         # its own master + 3 tablet servers, R = 3
    .venv/bin/python bench/drive_bench.py --config configs/local.toml   # a running cluster (./run_all.sh)

What it does. Without --config it starts its own standalone tablet server
(`python -m kvserver --standalone --port 0 --data <tmp>`: every write
fsynced before the reply, but one copy) and a frontend process
(`python -m httpserver --config <tmp>/bench.toml --id fe1 --kv-server ...`).
With --cluster N it starts its own cluster on free ports: a master and N
tablet servers with replication 3 (every chunk written to 3 servers, each
fsyncing, before the reply). With --config it starts only a frontend, talking
to the running cluster of that config through its master. Then, with curl as the client for everything:

  loopback   `python -m http.server` serves the same file from disk; curl
             downloads it: the ceiling for "bytes over loopback HTTP".
  upload     curl -F file=@<file> to /drive/upload/<root> (multipart,
             streamed by the frontend into 1 MiB chunks in the store).
  download   curl GET /drive/file/<root>/<name>, bytes compared by SHA-256.

and the frontend's peak resident memory (VmHWM from /proc) after each.

Everything it starts is stopped at the end, and its temporary directory
removed, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote, urlencode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_UNITS = {"": 1, "B": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]iB|B)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (try 1GiB, 256MiB)")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").upper()]


class Child:
    """A child process that prints READY <port> (or, for http.server, just listens)."""

    def __init__(self, args: list[str], log_path: str, ready: bool = True):
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.log = open(log_path, "ab")
        self.p = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE if ready else self.log,
                                  stderr=self.log, stdin=subprocess.DEVNULL)
        self.port = None
        if ready:
            deadline = time.monotonic() + 30
            line = b""
            while time.monotonic() < deadline:
                line = self.p.stdout.readline()
                if line.startswith(b"READY"):
                    self.port = int(line.split()[1])
                    break
                if not line and self.p.poll() is not None:
                    break
            if self.port is None:
                self.stop()
                raise SystemExit(f"{args[2:4]} did not start (see {log_path})")

    def peak_rss(self) -> int:
        """Peak resident set size in bytes (VmHWM)."""
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far."""
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.log.close()


def make_file(path: str, size: int) -> str:
    """`size` random bytes (1 MiB blocks of urandom), returns the SHA-256."""
    h = hashlib.sha256()
    block = 1 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            b = os.urandom(min(block, left))
            f.write(b)
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def curl(args: list[str]) -> tuple[float, str]:
    """Run curl; returns (seconds, stdout)."""
    t = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "--fail-with-body", *args], check=True, capture_output=True)
    return time.perf_counter() - t, out.stdout.decode(errors="replace")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="file size (default 1GiB)")
    ap.add_argument("--config", default=None, help="use the running cluster of this config (else a standalone server)")
    ap.add_argument("--cluster", type=int, default=0, metavar="N",
                    help="start a master and N tablet servers (replication 3) for the run")
    ap.add_argument("--tmp", default=None, help="where to put the file and data (default: a temp dir)")
    args = ap.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("drive_bench: needs curl")

    tmp = tempfile.mkdtemp(prefix="drive-bench-", dir=args.tmp)
    children: list[Child] = []
    try:
        src = os.path.join(tmp, "www", "big.bin")
        os.makedirs(os.path.dirname(src))
        print(f"writing {args.size / 2**20:.0f} MiB of random bytes ...", file=sys.stderr)
        digest = make_file(src, args.size)
        py = sys.executable

        if args.cluster:
            cfg_path = os.path.join(tmp, "cluster.toml")
            ports = [free_port() for _ in range(args.cluster + 1)]
            with open(cfg_path, "w") as f:
                f.write(f'data_dir = "{tmp}/data"\n[cluster]\ntablets = 24\nreplication = {min(3, args.cluster)}\n'
                        f'[master]\nid = "master"\nhost = "127.0.0.1"\nport = {ports[0]}\n'
                        f'[drive]\nquota_bytes = "{max(args.size * 2, 1 << 30)}"\n'
                        '[[frontend]]\nid = "fe1"\nhost = "127.0.0.1"\nport = 0\n')
                for i, p in enumerate(ports[1:], 1):
                    f.write(f'[[kvserver]]\nid = "kv{i}"\nhost = "127.0.0.1"\nport = {p}\n')
            children.append(Child([py, "-m", "master", "--config", cfg_path, "--id", "master"],
                                  os.path.join(tmp, "master.log")))
            for i in range(1, args.cluster + 1):
                children.append(Child([py, "-m", "kvserver", "--config", cfg_path, "--id", f"kv{i}"],
                                      os.path.join(tmp, f"kv{i}.log")))
            fe_args = ["--config", cfg_path, "--id", "fe1"]
            store = f"cluster: master + {args.cluster} tablet servers, replication {min(3, args.cluster)}"
        elif args.config:
            cfg_path = os.path.abspath(args.config)
            fe_args = ["--config", cfg_path, "--id", "fe1", "--port", "0", "--data", os.path.join(tmp, "fe")]
            store = f"cluster of {os.path.basename(cfg_path)} (replicated)"
        else:
            kv = Child([py, "-m", "kvserver", "--standalone", "--port", "0", "--data", os.path.join(tmp, "kv")],
                       os.path.join(tmp, "kv.log"))
            children.append(kv)
            cfg_path = os.path.join(tmp, "bench.toml")
            with open(cfg_path, "w") as f:
                f.write(f'data_dir = "{tmp}/fe"\n[drive]\nquota_bytes = "{max(args.size * 2, 1 << 30)}"\n'
                        '[[frontend]]\nid = "fe1"\nhost = "127.0.0.1"\nport = 0\n')
            fe_args = ["--config", cfg_path, "--id", "fe1", "--kv-server", f"127.0.0.1:{kv.port}"]
            store = "standalone tablet server (fsync, 1 copy)"
        fe = Child([py, "-m", "httpserver", *fe_args], os.path.join(tmp, "fe.log"))
        children.append(fe)
        rss_idle = fe.peak_rss()

        # A user and its CSRF token, over plain HTTP.
        user = f"bench{os.getpid()}"
        conn = http.client.HTTPConnection("127.0.0.1", fe.port, timeout=30)
        conn.request("POST", "/signup", urlencode({"username": user, "password": "benchmark pw"}),
                     {"Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        sid = re.search(r"sid=([^;]+)", r.getheader("Set-Cookie") or "")
        if r.status != 303 or not sid:
            raise SystemExit(f"drive_bench: sign-up failed ({r.status})")
        sid = sid.group(1)
        conn.request("GET", "/drive", headers={"Cookie": f"sid={sid}"})
        page = conn.getresponse().read().decode()
        conn.close()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        root = re.search(r'action="/drive/upload/([0-9a-f]{32})"', page).group(1)
        cookie = f"sid={sid}"

        # Loopback ceiling: curl from python -m http.server.
        port = free_port()
        www = Child([py, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", os.path.dirname(src)],
                    os.path.join(tmp, "www.log"), ready=False)
        children.append(www)
        wait_listening(port)
        out = os.path.join(tmp, "out.bin")
        t_loop, _ = curl(["-o", out, f"http://127.0.0.1:{port}/big.bin"])
        os.unlink(out)

        servers = [c for c in children if c is not fe]
        cpu0 = (fe.cpu_seconds(), sum(c.cpu_seconds() for c in servers))
        t_up, reply = curl(["-H", f"Cookie: {cookie}", "-H", "Accept: application/json", "-F", f"csrf={csrf}",
                            "-F", f"file=@{src};filename=big.bin", f"http://127.0.0.1:{fe.port}/drive/upload/{root}"])
        rss_up = fe.peak_rss()
        cpu1 = (fe.cpu_seconds(), sum(c.cpu_seconds() for c in servers))
        t_down, _ = curl(["-H", f"Cookie: {cookie}", "-o", out,
                          f"http://127.0.0.1:{fe.port}/drive/file/{root}/{quote('big.bin')}"])
        rss_down = fe.peak_rss()
        cpu2 = (fe.cpu_seconds(), sum(c.cpu_seconds() for c in servers))
        ok = sha256_file(out) == digest
        os.unlink(out)

        mb = args.size / 1e6
        print()
        print(f"Drive benchmark: one {args.size / 2**20:.0f} MiB file, curl over loopback, store: {store}")
        print(f"{'what':<34}{'seconds':>9}{'MB/s':>9}{'vs loopback':>13}")
        print(f"{'loopback: curl <- http.server':<34}{t_loop:>9.2f}{mb / t_loop:>9.0f}{'100%':>13}")
        print(f"{'upload: curl -F -> frontend':<34}{t_up:>9.2f}{mb / t_up:>9.0f}{100 * t_loop / t_up:>12.0f}%")
        print(f"{'download: curl <- frontend':<34}{t_down:>9.2f}{mb / t_down:>9.0f}{100 * t_loop / t_down:>12.0f}%")
        print(f"frontend peak RSS: {rss_idle / 2**20:.0f} MiB at start, {rss_up / 2**20:.0f} MiB after the upload, "
              f"{rss_down / 2**20:.0f} MiB after the download")
        print(f"CPU seconds, upload: frontend {cpu1[0] - cpu0[0]:.1f}, store {cpu1[1] - cpu0[1]:.1f}; "
              f"download: frontend {cpu2[0] - cpu1[0]:.1f}, store {cpu2[1] - cpu1[1]:.1f} "
              f"(machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
        print(f"downloaded bytes identical: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    finally:
        for c in reversed(children):
            c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("drive_bench: http.server did not start")


if __name__ == "__main__":
    sys.exit(main())
