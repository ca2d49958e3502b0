"""A data set several times the memory budget: stored, served, memory bounded."""

import random
import threading

from src.kvclient import ServerClient
from src.kvproto import Ok, Value

BUDGET = 4 * 1024 * 1024


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def dataset():
    rnd = random.Random(7)
    big = [(b"big/%05d" % i, b"v", rnd.randbytes(12000)) for i in range(1300)]        # ~15 MiB
    small = [(b"small/%06d" % i, b"c%d" % (i % 3), rnd.randbytes(200)) for i in range(32000)]  # ~6 MiB
    return big + small


def test_data_set_five_times_the_budget(procs, tmp_path):
    args = ["--standalone", "--port", "0", "--data", str(tmp_path / "data"), "--tablets", "8",
            "--memory-budget", str(BUDGET), "--checkpoint-log-bytes", "1MiB"]
    p = procs.start("kvserver", args, name="kv")
    pid = p.popen.pid
    baseline = rss_mib(pid)
    cells = dataset()
    total = sum(len(v) for _, _, v in cells)
    assert total >= 5 * BUDGET
    addr = f"127.0.0.1:{p.port}"
    peak = [baseline]
    errors = []

    def write(part):
        c = ServerClient(addr, timeout=60)
        try:
            for i in range(0, len(part), 400):
                batch = part[i:i + 400]
                replies = c.pipeline([("PUT", (r, col, v)) for r, col, v in batch])
                if not all(isinstance(x, Ok) for x in replies):
                    errors.append(replies)
                    return
                peak[0] = max(peak[0], rss_mib(pid))
        finally:
            c.close()

    threads = [threading.Thread(target=write, args=(cells[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0][:3]

    def read_all(client):
        for i in range(0, len(cells), 500):
            batch = cells[i:i + 500]
            replies = client.pipeline([("GET", (r, col)) for r, col, _ in batch])
            for (r, col, v), x in zip(batch, replies):
                assert isinstance(x, Value) and x.data == v, (r, col)
            peak[0] = max(peak[0], rss_mib(pid))

    c = ServerClient(addr, timeout=60)
    read_all(c)
    st = c.status()
    c.close()
    assert int(st["checkpoints"]) > 5
    assert int(st["memtable_bytes"]) + int(st["cache_bytes"]) + int(st["index_bytes"]) <= 2 * BUDGET
    assert int(st["disk_bytes"]) >= total
    # Generous: the interpreter, buffers and Python's per-object costs come on
    # top of the budget; holding the data set in memory would need far more.
    assert peak[0] - baseline < 6 * BUDGET / 2**20, (baseline, peak[0])

    # After a crash, every cell is still served, from checkpoint files + log.
    p.kill()
    p.start()
    pid = p.popen.pid
    baseline = rss_mib(pid)
    peak = [baseline]
    c = ServerClient(f"127.0.0.1:{p.port}", timeout=60)
    read_all(c)
    c.close()
    assert peak[0] - baseline < 6 * BUDGET / 2**20, (baseline, peak[0])
