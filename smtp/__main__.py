"""Run a mail process: the SMTP server, the POP3 server or the relay worker.

    python -m smtp --config FILE --id NAME [--data DIR] [--log-level L]
                   [--kv-server HOST:PORT] [--host H] [--port P]

NAME picks the role: the config's `mail.smtp.id` (SMTP on mail.smtp),
`mail.pop3.id` (POP3 on mail.pop3) or `mail.relay_id` (the relay worker,
which listens nowhere and prints `READY 0`). The store is the cluster (the
master in the config) unless `--kv-server` names one standalone tablet
server. `--host`/`--port` override the config's address (tests use port 0).
Prints `READY <port>` once serving; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from src import logsetup
from src.config import ConfigError, load_config

log = logging.getLogger("smtp")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m smtp", description="PennCloud mail: SMTP, POP3, relay")
    p.add_argument("--config", required=True)
    p.add_argument("--id", required=True, help="smtp, pop3 or relay id from the config")
    p.add_argument("--data", help="data directory (default: $PENNCLOUD_DATA or the config's)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--kv-server", help="HOST:PORT of a standalone tablet server instead of the cluster")
    p.add_argument("--host", help="listen on this address instead of the config's")
    p.add_argument("--port", type=int, help="listen on this port instead of the config's (0: any)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.data or os.environ.get("PENNCLOUD_DATA"))
    except ConfigError as e:
        print(f"smtp: {e}", file=sys.stderr)
        return 2
    roles = {cfg.mail.smtp.id: "smtp", cfg.mail.pop3.id: "pop3", cfg.mail.relay_id: "relay"}
    role = roles.get(args.id)
    if role is None:
        print(f"smtp: --id must be one of {', '.join(sorted(roles))}, not {args.id!r}", file=sys.stderr)
        return 2
    logsetup.configure(args.id, args.log_level)
    os.makedirs(cfg.process_dir(args.id), exist_ok=True)

    from src.kvclient import ClusterClient, ServerClient
    if args.kv_server:
        kv = ServerClient(args.kv_server, secret=cfg.cluster.secret)
    else:
        kv = ClusterClient(cfg.master.addr, secret=cfg.cluster.secret)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    # The admin console sees this process through its beacon in the KV store.
    from src.heartbeat import ProcessBeacon

    if role == "relay":
        from smtp.relay import make_relay_worker
        worker = make_relay_worker(cfg, kv)
        log.info("relay worker %s started (resolver %s, remote port %d)", worker.owner,
                 cfg.mail.resolver or "system", cfg.mail.relay_port)
        beacon = ProcessBeacon(kv, args.id, "mail relay", "-").start()
        print("READY 0", flush=True)
        worker.run(stop)
        beacon.stop()
        return 0

    if role == "smtp":
        from smtp.smtp_server import make_smtp_server
        server = make_smtp_server(cfg, kv, host=args.host, port=args.port)
    else:
        from smtp.pop3_server import make_pop3_server
        server = make_pop3_server(cfg, kv, host=args.host, port=args.port)
    try:
        server.start()
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    beacon = ProcessBeacon(kv, args.id, "SMTP server" if role == "smtp" else "POP3 server",
                           f"{args.host or server.tcp.host}:{server.port}",
                           load_fn=lambda: server.tcp.connection_count).start()
    print(f"READY {server.port}", flush=True)
    while not stop.wait(0.5):
        pass
    log.info("stopping")
    beacon.stop()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
