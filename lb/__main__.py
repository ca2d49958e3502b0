"""`python -m lb --config FILE --id lb [--data DIR] [--port P] [--log-level L]`

Starts the load balancer named by --id (the config's [lb] section), prints
`READY <port>` once it accepts connections, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from src.config import ConfigError, load_config
from src.logsetup import configure

log = logging.getLogger("lb")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lb", description="PennCloud load balancer")
    p.add_argument("--config", required=True)
    p.add_argument("--id", default="lb")
    p.add_argument("--data", default=None, help="data directory (default: $PENNCLOUD_DATA or the config's)")
    p.add_argument("--port", type=int, default=None, help="listen on this port instead of the config's (0 = any)")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    configure(args.id, args.log_level)
    try:
        cfg = load_config(args.config, args.data or os.environ.get("PENNCLOUD_DATA") or None)
        node = cfg.node(args.id)
    except ConfigError as e:
        sys.stderr.write(f"lb: {e}\n")
        return 2
    if node != cfg.lb.node:
        sys.stderr.write(f"lb: {args.id!r} is not the load balancer of {args.config} ({cfg.lb.node.id!r} is)\n")
        return 2

    from lb.server import LoadBalancer  # after logging is set up

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        lb = LoadBalancer(cfg, node, port=args.port).start()
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", node.host, node.port if args.port is None else args.port, e)
        return 1
    sys.stdout.write(f"READY {lb.port}\n")
    sys.stdout.flush()
    stop.wait()
    log.info("stopping")
    lb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
