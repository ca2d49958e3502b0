"""`python -m master --config FILE --id NAME [--data DIR] [--port P] [--log-level L]`.

Prints `READY <port>` once it serves; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import logging
import sys

from master.server import Master
from master.state import StateError
from src import process
from src.logsetup import configure

log = logging.getLogger("master")


def main(argv: list[str] | None = None) -> int:
    ap = process.argument_parser("python -m master", "PennCloud master", default_id="master")
    ap.add_argument("--port", type=int, default=None, help="listen here instead of the config's port (0: any)")
    a = ap.parse_args(argv)
    configure(a.id, a.log_level)
    try:
        cfg = process.load(a)
        master = Master(cfg, a.id, a.port).start()
    except (process.ConfigError, StateError, ValueError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    stop = process.stop_event()
    process.announce_ready(master.port)
    process.wait_for(stop)
    master.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
