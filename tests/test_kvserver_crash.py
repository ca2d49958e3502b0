"""Crash safety of a real tablet server process.

Several writer threads run a PUT/PUTNX/CPUT/DELETE/DELROW mix, each on rows it
owns (so it knows the exact expected state) plus a few cells every writer
PUTs to. Each writer records every acknowledged write and the one write in
flight when its connection broke. The server is SIGKILLed (or KILLed through
the protocol) at random moments, several times, and restarted (or woken) on
the same data directory; then every acknowledged write must be there with
its exact value. Checkpoints are made small and frequent, so crashes also hit
checkpoints half-written and logs half-truncated.
"""

import random
import threading
import time

from src import kv as kverr
from src.kvclient import ServerClient
from tests.harness import wait_until

N_WRITERS = 6
ROWS_PER_WRITER = 6
COLS = [b"a", b"b", b"c", b"d"]
SHARED = [b"shared/%d" % i for i in range(3)]
NEG_INF = float("-inf")
POS_INF = float("inf")


class History:
    """Writes to the shared cells: (start, end, value, acked), thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.writes = {c: [] for c in SHARED}

    def add(self, cell, start, end, value, acked):
        with self.lock:
            self.writes[cell].append((start, end, value, acked))

    def check(self, cell, final):
        """`final` must be the value of a write that no acknowledged write
        started after (in real time) the end of; then it becomes the base."""
        ws = self.writes[cell]
        if final is None:
            assert not any(acked for *_, acked in ws), f"{cell!r}: acknowledged writes lost"
        else:
            ok = [w for w in ws if w[2] == final
                  and not any(y[3] and y[0] > (w[1] if w[3] else POS_INF) for y in ws)]
            assert ok, f"{cell!r}: final value {final[:40]!r} is not a possible last write"
        self.writes[cell] = [(NEG_INF, NEG_INF, final, True)] if final is not None else []


class Writer(threading.Thread):
    def __init__(self, wid, addr, model, history, stop, seed):
        super().__init__(daemon=True)
        self.wid = wid
        self.addr = addr
        self.model = model              # row -> {col: value}: the acknowledged state
        self.history = history
        self.stop = stop
        self.rnd = random.Random(seed)
        self.inflight = None            # (row, col|None, value|None): the write with unknown outcome
        self.unexpected = []
        self.acked = 0
        self.rows = [b"w%d/r%d" % (wid, i) for i in range(ROWS_PER_WRITER)]

    def value(self, n):
        size = self.rnd.choice([0, 8, 100, 3000, 9000])
        tag = b"w%d-%d-" % (self.wid, n)
        return (tag * (size // len(tag) + 1))[:max(size, len(tag))]

    def run(self):
        client = ServerClient(self.addr, timeout=10, pool_size=1)
        n = 0
        try:
            while not self.stop.is_set() and n < 100000:
                n += 1
                if not self.step(client, n):
                    return
        finally:
            client.close()

    def step(self, client, n):
        rnd = self.rnd
        row = rnd.choice(self.rows)
        col = rnd.choice(COLS)
        cells = self.model.get(row, {})
        p = rnd.random()
        if p < 0.12:
            cell = rnd.choice(SHARED)
            v = b"shared-w%d-%d" % (self.wid, n)
            t0 = time.monotonic()
            try:
                client.put(cell, b"x", v)
            except (kverr.Unavailable, kverr.Retry, OSError):
                self.history.add(cell, t0, POS_INF, v, False)
                return False
            self.history.add(cell, t0, time.monotonic(), v, True)
            return True
        if p < 0.55 or (p < 0.75 and col not in cells and p >= 0.65):
            op, new = ("PUT", self.value(n))
        elif p < 0.75:
            op, new = ("CPUT", self.value(n)) if col in cells else ("PUTNX", self.value(n))
        elif p < 0.92:
            op, new = ("DELETE", None) if col in cells else ("PUT", self.value(n))
        else:
            op, new = ("DELROW", None) if cells else ("PUTNX", self.value(n))
        try:
            if op == "PUT":
                client.put(row, col, new)
            elif op == "PUTNX":
                client.putnx(row, col, new)
            elif op == "CPUT":
                client.cput(row, col, cells[col], new)
            elif op == "DELETE":
                client.delete(row, col)
            else:
                client.delrow(row)
        except kverr.Retry:
            return False                            # refused: not applied
        except (kverr.Unavailable, OSError):
            self.inflight = (row, None if op == "DELROW" else col, new)
            return False
        except kverr.KVError as e:
            self.unexpected.append(f"{op} {row!r} {col!r}: {e!r}")
            return False
        apply(self.model, (row, None if op == "DELROW" else col, new))
        self.acked += 1
        return True


def apply(model, write):
    row, col, new = write
    cells = dict(model.get(row, {}))
    if col is None:
        cells = {}
    elif new is None:
        cells.pop(col, None)
    else:
        cells[col] = new
    if cells:
        model[row] = cells
    else:
        model.pop(row, None)


def verify(addr, writers, history):
    c = ServerClient(addr, timeout=20)
    try:
        for w in writers:
            assert not w.unexpected, w.unexpected
            for row in w.rows:
                got = {col: c.get(row, col) for col in c.cols(row)}
                want = w.model.get(row, {})
                if got != want:
                    assert w.inflight and w.inflight[0] == row, \
                        f"{row!r}: acknowledged state lost: got {sorted(got)} want {sorted(want)}"
                    alt = dict(w.model)
                    apply(alt, w.inflight)
                    assert got == alt.get(row, {}), f"{row!r}: neither acknowledged nor in-flight state"
                    w.model.clear()
                    w.model.update(alt)
            w.inflight = None
        for cell in SHARED:
            try:
                final = c.get(cell, b"x")
            except kverr.NotFound:
                final = None
            history.check(cell, final)
    finally:
        c.close()


def run_round(addr, models, history, seed, crash):
    stop = threading.Event()
    writers = [Writer(i, addr, models[i], history, stop, seed * 100 + i) for i in range(N_WRITERS)]
    for w in writers:
        w.start()
    # let the writers work for a random while, then crash
    wait_until(lambda: sum(w.acked for w in writers) >= 50, timeout=20, what="writers making progress")
    threading.Event().wait(random.Random(seed).uniform(0.1, 1.2))
    crash()
    stop.set()
    for w in writers:
        w.join(20)
        assert not w.is_alive()
    return writers


def test_sigkill_at_random_moments_loses_no_acknowledged_write(procs, tmp_path):
    args = ["--standalone", "--port", "0", "--data", str(tmp_path / "data"), "--tablets", "4",
            "--checkpoint-log-bytes", "65536", "--memory-budget", "1MiB"]
    p = procs.start("kvserver", args, name="kv")
    models = [dict() for _ in range(N_WRITERS)]
    history = History()
    total = 0
    for rnd in range(6):
        addr = f"127.0.0.1:{p.port}"
        writers = run_round(addr, models, history, rnd + 1, p.kill)
        total += sum(w.acked for w in writers)
        p.start()
        verify(f"127.0.0.1:{p.port}", writers, history)
    assert total > 400
    log_text = (tmp_path / "kv.log").read_text()
    assert "checkpoint at seq" in log_text                      # crashes did meet checkpoints
    assert "corrupt record" not in log_text and "missing" not in log_text


def test_kill_and_wake_through_the_protocol(procs, tmp_path):
    args = ["--standalone", "--port", "0", "--data", str(tmp_path / "data"), "--tablets", "4",
            "--checkpoint-log-bytes", "65536", "--memory-budget", "1MiB"]
    p = procs.start("kvserver", args, name="kv")
    addr = f"127.0.0.1:{p.port}"
    admin = ServerClient(addr, timeout=20)
    models = [dict() for _ in range(N_WRITERS)]
    history = History()
    for rnd in range(4):
        writers = run_round(addr, models, history, 10 + rnd, admin.kill)
        st = admin.status()
        assert st["state"] == "killed"
        try:
            ServerClient(addr).get(b"w0/r0", b"a")
            raise AssertionError("a killed server served a read")
        except kverr.Retry as e:
            assert "killed" in str(e)
        admin.wake()
        assert admin.status()["state"] == "serving"
        verify(addr, writers, history)
    assert p.alive
    admin.close()
