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

import logging
import os
import sys

from src import logsetup, process

log = logging.getLogger("smtp")


def main(argv=None) -> int:
    p = process.argument_parser("python -m smtp", "PennCloud mail: SMTP, POP3, relay")
    p.add_argument("--kv-server", help="HOST:PORT of a standalone tablet server instead of the cluster")
    p.add_argument("--host", help="listen on this address instead of the config's")
    p.add_argument("--port", type=int, help="listen on this port instead of the config's (0: any)")
    args = p.parse_args(argv)
    try:
        cfg = process.load(args)
    except process.ConfigError as e:
        return process.fail("smtp", e)
    roles = {cfg.mail.smtp.id: "smtp", cfg.mail.pop3.id: "pop3", cfg.mail.relay_id: "relay"}
    role = roles.get(args.id)
    if role is None:
        return process.fail("smtp", f"--id must be one of {', '.join(sorted(roles))}, not {args.id!r}")
    logsetup.configure(args.id, args.log_level)
    os.makedirs(cfg.process_dir(args.id), exist_ok=True)

    kv = process.kv_client(cfg, args.kv_server)
    stop = process.stop_event()

    # The admin console sees this process through its beacon in the KV store.
    from src.heartbeat import ProcessBeacon

    if role == "relay":
        from smtp.relay import make_relay_workers, run_workers
        workers = make_relay_workers(cfg, kv)
        log.info("relay workers %s started (resolver %s, remote port %d)", ", ".join(w.owner for w in workers),
                 cfg.mail.resolver or "system", cfg.mail.relay_port)
        beacon = ProcessBeacon(kv, args.id, "mail relay", "-").start()
        process.announce_ready(0)
        run_workers(workers, stop)
        beacon.stop()
        return 0

    if role == "smtp":
        from smtp.smtp_server import make_smtp_server
        server = make_smtp_server(cfg, kv, host=args.host, port=args.port)
    else:
        from smtp.pop3_server import make_pop3_server
        server = make_pop3_server(cfg, kv, host=args.host, port=args.port, process_id=args.id)
    try:
        server.start()
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    beacon = ProcessBeacon(kv, args.id, "SMTP server" if role == "smtp" else "POP3 server",
                           f"{args.host or server.tcp.host}:{server.port}",
                           load_fn=lambda: server.tcp.connection_count).start()
    process.announce_ready(server.port)
    process.wait_for(stop)
    log.info("stopping")
    beacon.stop()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
