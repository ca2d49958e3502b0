"""`python -m master --config FILE --id NAME [--data DIR] [--port P] [--log-level L]`.

Prints `READY <port>` once it serves; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
import threading

from master.server import Master
from master.state import StateError
from src.config import ConfigError, load_config
from src.logsetup import configure

log = logging.getLogger("master")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m master", description="PennCloud master")
    ap.add_argument("--config", required=True)
    ap.add_argument("--id", default="master")
    ap.add_argument("--data", default=None, help="data directory (default: $PENNCLOUD_DATA or the config's)")
    ap.add_argument("--port", type=int, default=None, help="listen here instead of the config's port (0: any)")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    configure(a.id, a.log_level)
    try:
        cfg = load_config(a.config, a.data or os.environ.get("PENNCLOUD_DATA") or None)
        master = Master(cfg, a.id, a.port).start()
    except (ConfigError, StateError, ValueError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    stop = threading.Event()
    faulthandler.register(signal.SIGUSR1)      # `kill -USR1 <pid>`: every thread's stack to stderr
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.stdout.write(f"READY {master.port}\n")
    sys.stdout.flush()
    stop.wait()
    master.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
