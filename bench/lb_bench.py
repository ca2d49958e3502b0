"""What the load balancer costs: requests/s to a frontend directly and through the LB.

    .venv/bin/python bench/lb_bench.py [--seconds 5] [--procs 4] [--conns 32] [--frontends 2]

Starts, each in its own process, `--frontends` PennCloud frontends (over an
in-memory KV, as bench/http_bench.py does) and one load balancer in proxy mode
in front of them (heartbeats sent from the LB's process on the frontends'
behalf, so the frontends need no config). Then drives, with keep-alive
connections from separate load processes (bench/http_bench.py's generator):

  * one frontend directly, a static file;
  * the LB, the same static file (round robin over the frontends, since the
    load generator sends no cookie: every request is a new visitor).

Prints one table. On a 2-core machine the LB, the frontends and the load
generator share the cores, so the proxied rate is bounded by that sharing,
not only by the LB's own cost: compare on a quiet machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)

import http_bench  # noqa: E402  (the frontend server and the load generator)


def serve_lb(conn, fe_ports: list[int]) -> None:
    import logging
    import tempfile
    logging.disable(logging.WARNING)
    from lb.server import LoadBalancer
    from src.config import parse_config
    from src.heartbeat import LBControlClient, LBHeartbeat

    raw = {"frontend": [{"id": f"fe{i + 1}", "port": p} for i, p in enumerate(fe_ports)],
           "lb": {"port": 0, "mode": "proxy", "policy": "round_robin"}}
    cfg = parse_config(raw, "bench", tempfile.mkdtemp())
    lb = LoadBalancer(cfg, cfg.lb.node).start()
    beats = [LBHeartbeat(LBControlClient("127.0.0.1", lb.port), f"fe{i + 1}", (lambda p=p: p), lambda: 0, 0.5).start()
             for i, p in enumerate(fe_ports)]
    conn.send(lb.port)
    conn.recv()
    for b in beats:
        b.stop()
    lb.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--procs", type=int, default=4, help="load-generating processes")
    ap.add_argument("--conns", type=int, default=32, help="keep-alive connections in total")
    ap.add_argument("--frontends", type=int, default=2)
    args = ap.parse_args()

    servers = [http_bench.start_server(http_bench.serve_penncloud) for _ in range(args.frontends)]
    fe_ports = [port for _, _, port in servers]
    parent, child = mp.Pipe()
    lbp = mp.Process(target=serve_lb, args=(child, fe_ports), daemon=True)
    lbp.start()
    lb_port = parent.recv()
    servers.append((lbp, parent, lb_port))
    try:
        import time
        time.sleep(1.0)  # the first heartbeats
        static = f"/static/{http_bench.STATIC_FILE}"
        rows = []
        for name, port in (("frontend fe1, directly", fe_ports[0]),
                           (f"through the LB ({args.frontends} frontends)", lb_port)):
            http_bench.measure(port, static, args.procs, args.conns, 1.0)  # warm-up
            rate, errors = http_bench.measure(port, static, args.procs, args.conns, args.seconds)
            rows.append((name, static, rate, errors))
    finally:
        for proc, pipe, _ in servers:
            pipe.send("stop")
            proc.join(5)
            if proc.is_alive():
                proc.kill()

    size = os.path.getsize(os.path.join(http_bench.STATIC_DIR, http_bench.STATIC_FILE))
    print(f"HTTP keep-alive, {args.conns} connections from {args.procs} load processes, {args.seconds:g} s per row, "
          f"static file of {size} bytes, {os.cpu_count()} CPUs")
    print(f"{'path':44} {'url':22} {'requests/s':>11} {'errors':>7}")
    for name, p, rate, errors in rows:
        print(f"{name:44} {p:22} {rate:11.0f} {errors:7d}")
    print(f"through the LB / directly: {rows[1][2] / (rows[0][2] or 1):.2f}x")


if __name__ == "__main__":
    main()
