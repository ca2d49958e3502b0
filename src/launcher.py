"""Start, stop and report a whole PennCloud cluster on this machine.

`./run_all.sh` sets up `.venv` and then runs `python -m src.launcher`:

    start   start every process of the config that is not running, wait until
            each one prints READY, print the URLs (idempotent: after a crash it
            starts only what is missing)
    stop    SIGTERM in waves: the LB, frontends and mail servers, then the
            tablet servers, then the master (each wave SIGKILLed after
            STOP_GRACE_S)
    status  one line per process: <name> <pid|-> <host:port> <up|down>

Files (under the data dir: ./data, or $PENNCLOUD_DATA, or --data):
    run/<name>.pid    the pid of a running process
    log/<name>.log    its stdout and stderr (READY lines included)
    <name>/           its own data

A process counts as running when its pid file names a live process whose
command line carries `--id <name>` (so a recycled pid is not mistaken for it).

Spread over several hosts, every host runs `./run_all.sh` with the same config:
each starts only the processes whose `host` is one of its own addresses, and
`status` reports the others by whether their port answers (pid `-`).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from src.config import Config, ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 8.0
LOG_KEEP_BYTES = 16 * 1024 * 1024   # a log this big is set aside as <name>.log.1 at the next start


@contextmanager
def one_at_a_time(data_dir: str):
    """Hold `<data_dir>/run/launcher.lock` while starting or stopping: two
    starts at once (two terminals) each launched a frontend, one of them
    with no pid file, which then kept its port from every later start."""
    run = os.path.join(data_dir, "run")
    os.makedirs(run, exist_ok=True)
    with open(os.path.join(run, "launcher.lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.stderr.write("run_all.sh: another run_all.sh is starting or stopping this cluster; waiting\n")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _arg_after(argv: list[bytes], flag: bytes) -> bytes | None:
    """The argument that follows `flag` in a command line, if any."""
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def rotate_log(path: str, keep_bytes: int = LOG_KEEP_BYTES) -> None:
    """Before a process starts: a log over `keep_bytes` becomes `<path>.1`
    (replacing the one before), so the logs of a cluster that is restarted
    now and then stay within twice that each. A process writes its log
    through the stdout and stderr the launcher opened for it, so it cannot
    be rotated while the process runs."""
    try:
        if os.path.getsize(path) > keep_bytes:
            os.replace(path, path + ".1")
    except FileNotFoundError:
        pass


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    module: str
    host: str
    port: int  # 0: the process has no listening port (the relay worker)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}" if self.port else "-"


def process_specs(cfg: Config) -> list[ProcessSpec]:
    """Every process of the cluster, in start order (storage first, LB last)."""
    specs = [ProcessSpec(cfg.master.id, "master", cfg.master.host, cfg.master.port)]
    specs += [ProcessSpec(n.id, "kvserver", n.host, n.port) for n in cfg.kvservers]
    specs += [ProcessSpec(n.id, "httpserver", n.host, n.port) for n in cfg.frontends]
    specs.append(ProcessSpec(cfg.mail.smtp.id, "smtp", cfg.mail.smtp.host, cfg.mail.smtp.port))
    specs.append(ProcessSpec(cfg.mail.pop3.id, "smtp", cfg.mail.pop3.host, cfg.mail.pop3.port))
    specs.append(ProcessSpec(cfg.mail.relay_id, "smtp", cfg.mail.smtp.host, 0))
    specs.append(ProcessSpec(cfg.lb.node.id, "lb", cfg.lb.node.host, cfg.lb.node.port))
    return specs


def is_local(host: str) -> bool:
    """Whether `host` is an address of this machine (so we can bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def module_exists(module: str) -> bool:
    return os.path.exists(os.path.join(REPO, module, "__main__.py"))


class Launcher:
    def __init__(self, cfg: Config, config_path: str, out=sys.stdout, flags: str = ""):
        self.cfg = cfg
        self.config_path = os.path.abspath(config_path)
        self.out = out
        self.flags = flags          # the --config/--data this was run with, for the hints it prints
        self.run_dir = os.path.join(cfg.data_dir, "run")
        self.log_dir = os.path.join(cfg.data_dir, "log")

    def say(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except BrokenPipeError:
            # Nobody reads any more (`./run_all.sh status | head -3`): carry on
            # quietly, with what is left to say (and Python's final flush) going
            # to /dev/null instead of a traceback.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)

    # -- pid files --------------------------------------------------------------

    def pid_path(self, spec: ProcessSpec) -> str:
        return os.path.join(self.run_dir, f"{spec.name}.pid")

    def log_path(self, spec: ProcessSpec) -> str:
        return os.path.join(self.log_dir, f"{spec.name}.log")

    def running_pid(self, spec: ProcessSpec) -> int | None:
        try:
            with open(self.pid_path(spec)) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return None
        # Ours only if it is that process of THIS cluster: the same id and the
        # same data directory (a pid file copied with a backup, or a pid now
        # held by another cluster's kv1 after a reboot, must not be stopped).
        ours = _arg_after(argv, b"--data") == self.cfg.data_dir.encode()
        if b"--id" in argv and spec.name.encode() in argv and ours:
            return pid
        return None

    def answers(self, spec: ProcessSpec) -> bool:
        if not spec.port:
            return self.running_pid(spec) is not None  # no port to ask (the relay)
        if spec.module in ("master", "kvserver"):
            # Not just a connection, which the kernel accepts for a stopped
            # (frozen) process too: an answer within a second, and a tablet
            # server KILLed from the admin console is not up either.
            from src.kvclient import ServerClient
            try:
                c = ServerClient(spec.addr, timeout=1.0, secret=self.cfg.cluster.secret)
                try:
                    return c.ping() and (spec.module == "master" or c.status().get("state") != "killed")
                finally:
                    c.close()
            except Exception:       # no answer, a refusal, a broken reply: not up
                return False
        try:
            with socket.create_connection((spec.host, spec.port), timeout=1.0):
                return True
        except OSError:
            return False

    # -- commands ----------------------------------------------------------------

    def start(self) -> int:
        os.makedirs(self.run_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        zero = [s.name for s in process_specs(self.cfg) if s.port == 0 and s.name != self.cfg.mail.relay_id]
        if zero:
            self.say(f"run_all.sh: {self.config_path}: {', '.join(zero)} need a port (0 is for tests that "
                     "start a process themselves: the others must know where to find it)")
            return 2
        failures = 0
        for spec in process_specs(self.cfg):
            if not is_local(spec.host):
                self.say(f"  {spec.name:<8} runs on {spec.host}, not here: start it there")
                continue
            if not module_exists(spec.module):
                self.say(f"  {spec.name:<8} not built yet ({spec.module}/ has no __main__.py), skipped")
                continue
            pid = self.running_pid(spec)
            if pid is not None:
                self.say(f"  {spec.name:<8} already running (pid {pid}) on {spec.addr}")
                continue
            if not self.launch(spec):
                failures += 1
                if spec.module == "master":
                    self.say("  the master did not start: not starting the rest (they would only wait for it)")
                    return 1
        self.report()
        if failures:
            self.say(f"\n  {failures} process(es) did not start: see above (and their logs); "
                     "the addresses above may not all answer")
        return 1 if failures else 0

    def launch(self, spec: ProcessSpec) -> bool:
        log_path = self.log_path(spec)
        rotate_log(log_path)
        with open(log_path, "ab") as log:
            offset = log.tell()
            env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=REPO)
            proc = subprocess.Popen(
                [sys.executable, "-m", spec.module, "--config", self.config_path, "--id", spec.name,
                 "--data", self.cfg.data_dir],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
        with open(self.pid_path(spec), "w") as f:
            f.write(f"{proc.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.say(f"  {spec.name:<8} FAILED to start (exit {proc.returncode}); last lines of {log_path}:")
                self.say(self.tail(log_path, offset))
                return False
            if self.printed_ready(log_path, offset):
                self.say(f"  {spec.name:<8} started (pid {proc.pid}) on {spec.addr}")
                return True
            time.sleep(0.05)
        self.say(f"  {spec.name:<8} did not become ready within {START_TIMEOUT_S:.0f}s; see {log_path}")
        return False

    @staticmethod
    def printed_ready(log_path: str, offset: int) -> bool:
        with open(log_path, "rb") as f:
            f.seek(offset)
            return any(line.startswith(b"READY") for line in f.read().splitlines())

    @staticmethod
    def tail(log_path: str, offset: int, lines: int = 15) -> str:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join("      " + line for line in text[-lines:])

    def stop(self) -> int:
        """Stop the store's clients first (LB, frontends, mail), then the
        tablet servers, then the master, each wave given STOP_GRACE_S. All at
        once, a frontend in the middle of an upload met a store that was
        going away and spent its grace retrying, and was killed."""
        specs = list(reversed(process_specs(self.cfg)))
        waves = [[s for s in specs if s.module not in ("kvserver", "master")],
                 [s for s in specs if s.module == "kvserver"], [s for s in specs if s.module == "master"]]
        stopped = 0
        for wave in waves:
            stopped += self._stop_wave(wave)
        if not stopped:
            self.say("  nothing of this cluster was running")
        for spec in process_specs(self.cfg):
            try:
                os.unlink(self.pid_path(spec))
            except FileNotFoundError:
                pass
        return 0

    def _stop_wave(self, specs: list[ProcessSpec]) -> int:
        """SIGTERM these, SIGKILL what is left after the grace; how many ran."""
        pids = {}
        for spec in specs:
            pid = self.running_pid(spec)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                pids[spec] = pid
        ran = len(pids)
        deadline = time.monotonic() + STOP_GRACE_S
        while pids and time.monotonic() < deadline:
            for spec in [s for s in pids if self.running_pid(s) is None]:
                self.say(f"  {spec.name:<8} stopped")
                del pids[spec]
            time.sleep(0.05)
        for spec, pid in pids.items():
            try:
                os.kill(pid, signal.SIGKILL)
                self.say(f"  {spec.name:<8} killed (did not stop within {STOP_GRACE_S:.0f}s)")
            except ProcessLookupError:
                self.say(f"  {spec.name:<8} stopped")
        return ran

    def status(self) -> int:
        """One line per process; exit status 0 if every one is up, else 3
        (LSB's "not running"), so scripts can use it as a health check."""
        all_up = True
        for spec in process_specs(self.cfg):
            pid = self.running_pid(spec)
            up = self.answers(spec) if pid is not None or not is_local(spec.host) else False
            all_up = all_up and up
            self.say(f"{spec.name} {pid if pid is not None else '-'} {spec.addr} {'up' if up else 'down'}")
        return 0 if all_up else 3

    def report(self) -> None:
        cfg = self.cfg
        self.say("")
        self.say(f"PennCloud ({self.config_path})")
        self.say(f"  web:        http://{cfg.lb.node.host}:{cfg.lb.node.port}/   "
                 f"(frontends: {', '.join(f'http://{n.addr}/' for n in cfg.frontends)})")
        self.say(f"  KV store:   nc {cfg.master.host} {cfg.master.port}  (master: MAP, NODES); "
                 f"tablet servers on {', '.join(n.addr for n in cfg.kvservers)}")
        if cfg.http.admin_password:
            self.say("  admin:      user 'admin', password as set in the config (http.admin_password)")
        else:
            pw_file = os.path.join(cfg.data_dir, "admin.password")
            try:
                with open(pw_file) as f:
                    self.say(f"  admin:      user 'admin', password {f.read().strip()}   (in {pw_file})")
            except OSError:
                self.say(f"  admin:      user 'admin', password in {pw_file} once a frontend has started")
        self.say(f"  mail:       addresses are <user>@{cfg.mail.domain}")
        self.say(f"  Thunderbird: incoming POP3 {cfg.mail.pop3.host} port {cfg.mail.pop3.port}, "
                 f"outgoing SMTP {cfg.mail.smtp.host} port {cfg.mail.smtp.port}, no SSL, normal password,")
        self.say("              username = your PennCloud username")
        self.say(f"  logs:       {self.log_dir}/<name>.log     status: ./run_all.sh status{self.flags}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="run_all.sh", description=__doc__.split("\n")[0])
    p.add_argument("command", nargs="?", default="start", choices=("start", "stop", "status", "restart"))
    p.add_argument("--config", default=os.path.join(REPO, "configs", "local.toml"))
    p.add_argument("--data", default=None, help="data directory (default: the config's, or $PENNCLOUD_DATA)")
    args = p.parse_args(argv)
    # run_all.sh changes into the checkout first; a relative --config or
    # --data means relative to where the user typed it.
    here = os.environ.get("PENNCLOUD_CWD") or os.getcwd()
    args.config = os.path.join(here, args.config)
    data = args.data or os.environ.get("PENNCLOUD_DATA") or None
    if data is not None:
        data = os.path.join(here, data)
    try:
        cfg = load_config(args.config, data)
    except ConfigError as e:
        sys.stderr.write(f"run_all.sh: {e}\n")
        return 2
    flags = ""
    if os.path.abspath(args.config) != os.path.join(REPO, "configs", "local.toml"):
        flags += f" --config {shlex.quote(args.config)}"
    if args.data:
        flags += f" --data {shlex.quote(args.data)}"
    launcher = Launcher(cfg, args.config, flags=flags)
    try:
        if args.command == "status":
            return launcher.status()
        with one_at_a_time(cfg.data_dir):
            if args.command == "start":
                return launcher.start()
            if args.command == "stop":
                return launcher.stop()
            launcher.stop()
            return launcher.start()
    except OSError as e:        # a data directory that is a file, read-only, full...
        sys.stderr.write(f"run_all.sh: {e.filename or cfg.data_dir}: {e.strerror or e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\nrun_all.sh: interrupted; what started is running "
                         f"(./run_all.sh status{flags}, ./run_all.sh stop{flags})\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
