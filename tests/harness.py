"""Helpers for tests that start real PennCloud processes.

A child process binds its port (port 0 allowed) and prints one line
`READY <port>` on stdout when it can serve; `Proc.start()` waits for that line
within a deadline. `Proc.kill()` is a real SIGKILL; `Proc.start()` again
restarts it on the same arguments (so the same data directory). Every Proc a
test makes through the `procs` fixture (conftest.py) is killed when the test
ends, pass or fail.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def send_in_background(sock: socket.socket, mib: int, byte: bytes = b"x") -> threading.Thread:
    """Send `mib` MiB on `sock` from a thread of its own (an uploader that
    goes on sending while the test reads the answer); a closed or reset
    connection just ends it."""
    def send():
        try:
            for _ in range(mib):
                sock.sendall(byte * (1 << 20))
        except OSError:
            pass
    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            v = predicate()
            if v:
                return v
        except Exception as e:  # the predicate may fail while a server starts
            last_exc = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


class Proc:
    """One child process: `python -m <module> <args...>`."""

    def __init__(self, module: str, args: list[str], name: str | None = None,
                 log_path: str | None = None, env: dict | None = None):
        self.module = module
        self.args = list(args)
        self.name = name or module
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 20.0) -> "Proc":
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        if self.env:
            env.update(self.env)
        stderr = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.popen = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
        finally:
            if self.log_path:
                stderr.close()
        self.port = self._read_ready(timeout)
        return self

    def _read_ready(self, timeout: float) -> int:
        assert self.popen and self.popen.stdout
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.popen.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.split(b"\n")[:-1]:
                    if line.startswith(b"READY"):
                        parts = line.split()
                        return int(parts[1]) if len(parts) > 1 else 0
            elif self.popen.poll() is not None:
                break
        code = self.popen.poll()
        self.kill()
        hint = f" (see {self.log_path})" if self.log_path else ""
        raise AssertionError(f"{self.name} did not print READY within {timeout}s; exit code {code}{hint}; "
                             f"stdout: {buf[-500:]!r}")

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash: no clean-up runs in the child."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)
        if self.popen is not None and self.popen.stdout:
            self.popen.stdout.close()

    def terminate(self, timeout: float = 10.0) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.popen is not None and self.popen.stdout:
            self.popen.stdout.close()


class ProcSet:
    """Every Proc a test started; `cleanup()` kills them all."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def start(self, module: str, args: list[str], name: str | None = None, timeout: float = 20.0,
              env: dict | None = None) -> Proc:
        name = name or module
        p = Proc(module, args, name=name, log_path=str(self.tmp_path / f"{name}.log"), env=env)
        self.procs.append(p)
        return p.start(timeout)

    def cleanup(self) -> None:
        for p in self.procs:
            p.kill()
