"""bench/kv_bench.py runs end to end (a tiny run: it must not rot) and cleans up after itself."""

import os
import shutil
import subprocess
import sys

from tests.harness import REPO


def test_kv_bench_smoke(tmp_path):
    systems = "gc,redis" if shutil.which("redis-server") else "gc"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, "bench/kv_bench.py", "--seconds", "0.3", "--clients", "2",
                          "--procs", "1", "--keys", "20", "--systems", systems],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = out.stdout.split("\n\n")[0]            # the table, before the ratios
    rows = [line.split() for line in table.splitlines() if line.startswith(("penncloud", "redis"))]
    # system label (2 words), op, clients, ops/s, p50, p99, errors
    ops = {(r[0], r[2]): r for r in rows}
    for op in ("GET", "PUT", "CPUT"):
        r = ops[("penncloud", op)]
        assert float(r[4]) > 0 and r[7] == "0", r
        if "redis" in systems:
            r = ops[("redis", op)]
            assert float(r[4]) > 0 and r[7] == "0", r
    assert not [p for p in os.listdir(tmp_path) if p.startswith("kvbench-")]   # servers' dirs removed
