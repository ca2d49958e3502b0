"""`python -m lb --config FILE --id lb [--data DIR] [--port P] [--log-level L]`

Starts the load balancer named by --id (the config's [lb] section), prints
`READY <port>` once it accepts connections, and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import logging
import sys

from src import process
from src.logsetup import configure

log = logging.getLogger("lb")


def main(argv: list[str] | None = None) -> int:
    p = process.argument_parser("python -m lb", "PennCloud load balancer", default_id="lb")
    p.add_argument("--port", type=int, default=None, help="listen on this port instead of the config's (0 = any)")
    args = p.parse_args(argv)
    configure(args.id, args.log_level)
    try:
        cfg = process.load(args)
        node = cfg.node(args.id)
    except process.ConfigError as e:
        return process.fail("lb", e)
    if node != cfg.lb.node:
        return process.fail("lb", f"{args.id!r} is not the load balancer of {args.config} ({cfg.lb.node.id!r} is)")

    from lb.server import LoadBalancer  # after logging is set up

    stop = process.stop_event()
    try:
        lb = LoadBalancer(cfg, node, port=args.port).start()
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", node.host, node.port if args.port is None else args.port, e)
        return 1
    process.announce_ready(lb.port)
    process.wait_for(stop)
    log.info("stopping")
    lb.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
