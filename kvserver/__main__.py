"""Run a tablet server.

    python -m kvserver --standalone --port P --data DIR [--tablets T]
        [--memory-budget SIZE] [--checkpoint-log-bytes SIZE]
        [--checkpoint-interval S] [--max-cell-bytes SIZE] [--no-group-commit]
        [--host H] [--secret S] [--log-level L]
    python -m kvserver --config FILE --id NAME [--data DIR]     (cluster mode)

Cluster mode: the server listens on the config's address for NAME, keeps its
tablets under <data>/<NAME>/, and joins the master (kvserver/cluster.py).

Standalone: no master, primary of every tablet, data in DIR. Prints
`READY <port>` once it serves; SIGTERM stops it cleanly (logs flushed).
"""

from __future__ import annotations

import logging
import sys

from src import logsetup, process
from src.config import StorageConfig

from kvserver.checkpoint import CorruptCheckpoint
from kvserver.server import KVServer, standalone_server

log = logging.getLogger("kvserver")

def parse_args(argv):
    p = process.argument_parser("python -m kvserver", "PennCloud tablet server", config_required=False)
    p.add_argument("--standalone", action="store_true", help="no master: primary of every tablet")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--tablets", type=int, default=24)
    p.add_argument("--memory-budget", type=process.size_arg)
    p.add_argument("--checkpoint-log-bytes", type=process.size_arg)
    p.add_argument("--checkpoint-interval", type=float)
    p.add_argument("--max-cell-bytes", type=process.size_arg)
    p.add_argument("--no-group-commit", action="store_true")
    p.add_argument("--secret", default="", help="require AUTH <secret> for admin commands")
    return p.parse_args(argv)


def storage_config(args, base: StorageConfig = StorageConfig()) -> StorageConfig:
    """`base` with the command line's overrides."""
    return StorageConfig(
        memory_budget_bytes=args.memory_budget or base.memory_budget_bytes,
        checkpoint_log_bytes=args.checkpoint_log_bytes or base.checkpoint_log_bytes,
        checkpoint_interval_s=args.checkpoint_interval or base.checkpoint_interval_s,
        max_cell_bytes=args.max_cell_bytes or base.max_cell_bytes,
        group_commit=base.group_commit and not args.no_group_commit,
    )


def build_server(args) -> KVServer:
    if args.standalone:
        data = process.data_dir(args)
        if not data:
            raise SystemExit("kvserver: --standalone needs --data DIR (or $PENNCLOUD_DATA)")
        if not 1 <= args.tablets <= 4096:
            raise SystemExit("kvserver: --tablets must be 1 to 4096")
        return standalone_server(args.port, data, storage_config(args), args.tablets,
                                 host=args.host, secret=args.secret)
    if not args.config or not args.id:
        raise SystemExit("kvserver: give --standalone --port P --data DIR, or --config FILE --id NAME")
    cfg = process.load(args)
    from kvserver.cluster import cluster_server      # cluster mode: kvserver/cluster.py
    return cluster_server(cfg, args.id)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logsetup.configure(args.id or "kvserver", args.log_level)
    try:
        server = build_server(args)
        server.start()
    except process.ConfigError as e:
        return process.fail("kvserver", e)
    except CorruptCheckpoint as e:
        log.error("cannot start: %s", e)
        return 1
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    stop = process.stop_event()
    process.announce_ready(server.port)
    process.wait_for(stop)
    log.info("stopping")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
