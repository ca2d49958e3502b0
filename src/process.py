"""What every PennCloud process's `__main__` shares.

Each process is started the same way (`python -m <package> --config FILE --id
NAME [--data DIR] [--log-level L]`), reads the config once, reaches the store
through one kind of client, stops on SIGTERM, and prints `READY <port>` on
stdout when it serves (run_all.sh and the tests wait for that line). This
module is that shared shell, so each `__main__` only says what is its own.
$PENNCLOUD_DATA is read here and nowhere deeper.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading

from src.config import Config, ConfigError, load_config, parse_size


def argument_parser(prog: str, description: str, *, default_id: str | None = None,
                    config_required: bool = True) -> argparse.ArgumentParser:
    """A parser with the options every process takes; add your own to it."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=config_required, help="the cluster config file (TOML)")
    if default_id is None:
        p.add_argument("--id", required=config_required, help="this process's id in the config")
    else:
        p.add_argument("--id", default=default_id, help=f"this process's id in the config (default {default_id})")
    p.add_argument("--data", default=None, help="data directory (default: $PENNCLOUD_DATA or the config's)")
    p.add_argument("--log-level", default="INFO")
    return p


def data_dir(args: argparse.Namespace) -> str | None:
    """--data, else $PENNCLOUD_DATA, else None (the config's data_dir)."""
    return args.data or os.environ.get("PENNCLOUD_DATA") or None


def load(args: argparse.Namespace) -> Config:
    """The config named by --config, with the data dir resolved. Raises ConfigError."""
    return load_config(args.config, data_dir(args))


def fail(prog: str, problem: object, code: int = 2) -> int:
    """Say why the process cannot start (on stderr, which run_all.sh logs) and return `code`."""
    sys.stderr.write(f"{prog}: {problem}\n")
    sys.stderr.flush()
    return code


def size_arg(text: str) -> int:
    """argparse type for sizes such as 4MiB (the config's units)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def kv_client(cfg: Config, kv_server: str | None = None):
    """The store: one standalone tablet server if `kv_server` (HOST:PORT) is given, else the cluster."""
    from src.kvclient import ClusterClient, ServerClient
    if kv_server:
        return ServerClient(kv_server, secret=cfg.cluster.secret)
    return ClusterClient(cfg.master.addr, secret=cfg.cluster.secret)


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT; SIGUSR1 prints every thread's stack to stderr."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    faulthandler.register(signal.SIGUSR1)
    return stop


def wait_for(stop: threading.Event) -> None:
    """Block until `stop` is set, looking once a second.

    Not `stop.wait()` with no timeout: Linux delivers a signal to any
    thread of the process, and CPython runs the Python handler (which sets
    `stop`) only when the main thread next runs bytecode. A main thread
    blocked for good in the event's lock, while another thread took the
    SIGTERM, never got there: the process ignored the stop until the
    launcher's SIGKILL (QA saw the master do that)."""
    while not stop.wait(1.0):
        pass


def announce_ready(port: int) -> None:
    """The one line on stdout that says the process serves (0: it has no port)."""
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


__all__ = ["argument_parser", "data_dir", "load", "fail", "size_arg", "kv_client", "stop_event",
           "wait_for", "announce_ready", "ConfigError"]
