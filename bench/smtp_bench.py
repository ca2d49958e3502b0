"""SMTP benchmark: messages per second accepted durably, PennCloud against aiosmtpd.

    .venv/bin/python bench/smtp_bench.py                     # the table (about a minute)
    .venv/bin/python bench/smtp_bench.py --seconds 5 --rounds 3 --sessions 10 --size 2048
    .venv/bin/python bench/smtp_bench.py --cluster 3        # its own master + 3 tablet servers, R = 3
    .venv/bin/python bench/smtp_bench.py --master 127.0.0.1:7000    # a running cluster

What it does. It starts, each as its own process:

- a standalone tablet server (`python -m kvserver --standalone`), and our SMTP
  server over it (`python -m smtp --id smtp --kv-server ...`); with
  `--cluster N` a master and N tablet servers (replication min(3, N)) on free
  ports instead, and with `--master ADDR` the running cluster of that master;
- aiosmtpd (the reference, from this file: `--serve-aiosmtpd DIR`) with a
  handler that writes each message to its own file and fsyncs it before
  answering 250 (in the event loop's thread pool, so fsyncs of concurrent
  sessions overlap), once with `fsync(file)` and once with `fsync(file)` plus
  `fsync(directory)` (what makes a new file's name durable too).

The load is `--sessions` smtplib clients (threads in this process), each
sending `--size`-byte messages to one local recipient over one session
(MAIL, RCPT, DATA per message, no pipelining) for `--seconds`. Counted:
messages answered 250 inside the window. Each server is measured `--rounds`
times, the servers taking turns; the table shows the median round. Our 250 means the message is in the
store's write-ahead log (fsynced; on every live replica in cluster mode); for
aiosmtpd, on disk as said above.

Postfix's `smtp-source` is used as the load instead when it is installed.
Everything started is stopped at the end, temporary directories removed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PASSWORD = "benchmark password"


# -- the reference server --------------------------------------------------------

def serve_aiosmtpd(directory: str, fsync_dir: bool) -> None:
    """Run aiosmtpd on 127.0.0.1:0 storing each message durably in `directory`; prints READY <port>."""
    import asyncio
    import signal
    from aiosmtpd.controller import Controller

    counter = iter(range(1, 1 << 62))
    dir_fd = os.open(directory, os.O_RDONLY)

    def store(data: bytes) -> None:
        path = os.path.join(directory, f"{os.getpid()}-{next(counter)}.eml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if fsync_dir:
            os.fsync(dir_fd)

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            await asyncio.get_running_loop().run_in_executor(None, store, envelope.original_content)
            return "250 2.0.0 OK"

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = Controller(Handler(), hostname="127.0.0.1", port=port)
    c.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"READY {port}", flush=True)
    while not stop.wait(0.5):
        pass
    c.stop()


# -- processes ----------------------------------------------------------------------

class Child:
    def __init__(self, args: list[str], log_path: str):
        env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
        self.log = open(log_path, "ab")
        self.p = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            if line.startswith(b"READY"):
                self.port = int(line.split()[1])
                return
        self.stop()
        raise SystemExit(f"{' '.join(args)} did not start; see {log_path}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()


# -- the load ---------------------------------------------------------------------

def message(size: int, n: int) -> bytes:
    head = (b"From: load@bench.test\r\nTo: bench@penncloud.local\r\nSubject: bench %d\r\n"
            b"Message-ID: <%d@bench.test>\r\n\r\n" % (n, n))
    line = b"x" * 70 + b"\r\n"
    body = line * max(0, (size - len(head)) // len(line))
    return (head + body + b"y" * (size - len(head) - len(body) - 2) + b"\r\n")[:size]


def drive(port: int, sessions: int, seconds: float, size: int, login: bool) -> tuple[int, float, int]:
    """(messages accepted, seconds measured, errors) with `sessions` concurrent smtplib clients."""
    start_evt = threading.Event()
    counts = [0] * sessions
    errors = [0] * sessions
    t_end = [0.0]

    def client(k: int) -> None:
        s = smtplib.SMTP("127.0.0.1", port, timeout=60)
        try:
            s.ehlo("bench.test")
            if login:
                s.login("bench", PASSWORD)
            start_evt.wait()
            i = 0
            while time.monotonic() < t_end[0]:
                msg = message(size, k * 1_000_000 + i)
                try:
                    s.sendmail("load@bench.test", ["bench@penncloud.local"], msg)
                    if time.monotonic() <= t_end[0]:
                        counts[k] += 1
                except smtplib.SMTPResponseException:
                    errors[k] += 1
                i += 1
            s.quit()
        except Exception:
            errors[k] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(sessions)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # let every session connect (and log in) before the clock starts
    t0 = time.monotonic()
    t_end[0] = t0 + seconds
    start_evt.set()
    for t in threads:
        t.join()
    return sum(counts), seconds, sum(errors)


def drive_smtp_source(port: int, sessions: int, seconds: float, size: int) -> tuple[int, float, int]:
    """The same load with Postfix's smtp-source (a fixed message count sized to the time)."""
    n = max(100, int(seconds * 300))
    t0 = time.monotonic()
    r = subprocess.run(["smtp-source", "-s", str(sessions), "-l", str(size), "-m", str(n), "-c",
                        "-f", "load@bench.test", "-t", "bench@penncloud.local", f"127.0.0.1:{port}"],
                       capture_output=True, timeout=600)
    return (n if r.returncode == 0 else 0), time.monotonic() - t0, int(r.returncode != 0)


# -- main ---------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="length of one measurement")
    ap.add_argument("--rounds", type=int, default=3,
                    help="measurements per server, interleaved (the table shows the median)")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--cluster", type=int, default=0, metavar="N",
                    help="start a master and N tablet servers (replication min(3, N)) instead of a standalone server")
    ap.add_argument("--master", help="HOST:PORT of the master of a running cluster")
    ap.add_argument("--serve-aiosmtpd", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--fsync-dir", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_aiosmtpd:
        serve_aiosmtpd(args.serve_aiosmtpd, args.fsync_dir)
        return 0

    from src.accounts import Accounts
    from src.kvclient import ClusterClient, ServerClient

    tmp = tempfile.mkdtemp(prefix="smtp-bench-")
    children: list[Child] = []
    rows = []
    use_source = shutil.which("smtp-source") is not None
    load = "smtp-source" if use_source else "smtplib threads"
    try:
        cfg = os.path.join(tmp, "bench.toml")
        master_addr = args.master
        with open(cfg, "w") as f:
            f.write(f'data_dir = "{tmp}/data"\n[mail]\ndomain = "penncloud.local"\nmax_message_bytes = "25MiB"\n')
            if args.cluster:
                from tests.harness import free_port
                ports = [free_port() for _ in range(args.cluster + 1)]
                f.write(f'[cluster]\ntablets = 24\nreplication = {min(3, args.cluster)}\n'
                        f'[master]\nid = "master"\nhost = "127.0.0.1"\nport = {ports[0]}\n')
                for i, p in enumerate(ports[1:], 1):
                    f.write(f'[[kvserver]]\nid = "kv{i}"\nhost = "127.0.0.1"\nport = {p}\n')
                master_addr = f"127.0.0.1:{ports[0]}"
            elif master_addr:
                host, _, port = master_addr.rpartition(":")
                f.write(f'[master]\nhost = "{host}"\nport = {port}\n')
        if args.cluster:
            children.append(Child(["-m", "master", "--config", cfg, "--id", "master", "--log-level", "WARNING"],
                                  os.path.join(tmp, "master.log")))
            for i in range(1, args.cluster + 1):
                children.append(Child(["-m", "kvserver", "--config", cfg, "--id", f"kv{i}", "--log-level", "WARNING"],
                                      os.path.join(tmp, f"kv{i}.log")))
            store_name = f"cluster: {args.cluster} tablet servers, R={min(3, args.cluster)}"
        elif master_addr:
            store_name = f"running cluster at {master_addr}"
        if master_addr:
            kv = ClusterClient(master_addr, deadline=60)
            smtp_args = ["-m", "smtp", "--config", cfg, "--id", "smtp", "--port", "0"]
        else:
            kvp = Child(["-m", "kvserver", "--standalone", "--port", "0", "--data", os.path.join(tmp, "kv"),
                         "--log-level", "WARNING"], os.path.join(tmp, "kv.log"))
            children.append(kvp)
            kv = ServerClient(f"127.0.0.1:{kvp.port}")
            smtp_args = ["-m", "smtp", "--config", cfg, "--id", "smtp", "--port", "0",
                         "--kv-server", f"127.0.0.1:{kvp.port}"]
            store_name = "standalone tablet server"
        try:
            Accounts(kv).create("bench", PASSWORD)
        except Exception:
            pass  # a previous run on the same cluster made it
        ours = Child(smtp_args + ["--log-level", "WARNING"], os.path.join(tmp, "smtp.log"))
        children.append(ours)
        systems = [(f"PennCloud SMTP ({store_name})", ours.port)]
        for fsync_dir in (False, True):
            d = os.path.join(tmp, f"aiosmtpd-{int(fsync_dir)}")
            os.makedirs(d)
            extra = ["--fsync-dir"] if fsync_dir else []
            ch = Child([os.path.abspath(__file__), "--serve-aiosmtpd", d, *extra], os.path.join(tmp, "aio.log"))
            children.append(ch)
            systems.append(("aiosmtpd, fsync(file)" + (" + fsync(dir)" if fsync_dir else ""), ch.port))
        results: dict[str, list[tuple[int, float, int]]] = {name: [] for name, _ in systems}
        for _ in range(args.rounds):  # interleaved, so a busy moment of the machine hits all alike
            for name, port in systems:
                if use_source:
                    results[name].append(drive_smtp_source(port, args.sessions, args.seconds, args.size))
                else:
                    results[name].append(drive(port, args.sessions, args.seconds, args.size, login=False))
        for name, _ in systems:
            runs = sorted(results[name], key=lambda r: r[0] / r[1])
            n, secs, errs = runs[len(runs) // 2]
            rows.append((name, n, secs, sum(r[2] for r in runs), [r[0] / r[1] for r in results[name]]))
    finally:
        for c in reversed(children):
            c.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nSMTP, {args.sessions} concurrent sessions, {args.size}-byte messages, load: {load}, "
          f"{os.cpu_count()} CPUs\n")
    print(f"{'server':<52} {'median msg/s':>12} {'errors':>7}   each round (msg/s)")
    for name, n, secs, errs, each in rows:
        print(f"{name:<52} {n / secs:>12.1f} {errs:>7}   {' '.join(f'{x:.0f}' for x in each)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
