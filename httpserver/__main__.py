"""python -m httpserver --config FILE --id fe1 [--data DIR] [--kv-server HOST:PORT] [--port P]

Runs one web frontend. It talks to the KV cluster through
`src.kvclient.ClusterClient` (the master's address and the cluster secret
come from the config), or with `--kv-server` to one standalone tablet server
(`python -m kvserver --standalone`) through `src.kvclient.ServerClient`.
Prints `READY <port>` once it serves; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import logging
import sys

from src import logsetup, process

log = logging.getLogger("httpserver")


def main(argv: list[str] | None = None) -> int:
    ap = process.argument_parser("python -m httpserver", __doc__.split("\n")[0])
    ap.add_argument("--kv-server", default=None, metavar="HOST:PORT",
                    help="use one standalone tablet server instead of the cluster")
    ap.add_argument("--port", type=int, default=None, help="listen on this port instead of the config's")
    args = ap.parse_args(argv)

    logsetup.configure(args.id, args.log_level)
    try:
        cfg = process.load(args)
        node = cfg.node(args.id)
    except process.ConfigError as e:
        return process.fail("httpserver", e)
    kv = process.kv_client(cfg, args.kv_server)

    from httpserver.frontend import Frontend
    fe = Frontend(cfg, node, kv, port=args.port)
    stop = process.stop_event()
    try:
        fe.start()
    except OSError as e:
        log.error("cannot listen on %s:%s: %s", node.host, args.port if args.port is not None else node.port, e)
        return 1
    # Heartbeats: to the LB (so it sends users here) and a beacon in the store (admin console).
    from src.heartbeat import LBControlClient, LBHeartbeat, ProcessBeacon, lb_beat_interval
    load = lambda: fe.http.active_requests + fe.http.tcp.connection_count / 10  # noqa: E731
    lb = cfg.lb.node
    beats = [LBHeartbeat(LBControlClient(lb.host, lb.port, cfg.cluster.secret), node.id, lambda: fe.port,
                         load, lb_beat_interval(cfg.lb.heartbeat_timeout_s)).start(),
             ProcessBeacon(kv, node.id, "web frontend", f"{node.host}:{fe.port}", load_fn=load).start()]
    process.announce_ready(fe.port)
    process.wait_for(stop)
    log.info("stopping")
    for b in beats:
        b.stop()
    fe.stop()
    kv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
