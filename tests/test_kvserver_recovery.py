"""Recovery of a real server process: torn log tails, time-triggered
checkpoints, a corrupt checkpoint, 64 MiB values, the group-commit switch."""

import glob
import os

import pytest

from src.kv import TooBig
from src.kvclient import ServerClient
from tests.harness import Proc, wait_until


def start(procs, data, *extra, name="kv"):
    return procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(data),
                                    "--tablets", "2", *extra], name=name)


def client(p):
    return ServerClient(f"127.0.0.1:{p.port}", timeout=60)


def test_torn_tail_is_dropped_and_reported(procs, tmp_path):
    data = tmp_path / "data"
    p = start(procs, data)
    c = client(p)
    for i in range(50):
        c.put(b"row%d" % i, b"c", b"value %d" % i)
    c.close()
    p.kill()
    seg = max(glob.glob(str(data / "tablet-*" / "log-*.wal")), key=os.path.getsize)
    with open(seg, "ab") as f:
        f.write(b"\x12\x34\x56\x78\x40\x00\x00\x00half a record")   # a write cut short by the crash
    p.start()
    c = client(p)
    for i in range(50):
        assert c.get(b"row%d" % i, b"c") == b"value %d" % i
    c.put(b"after", b"c", b"tail")                 # appends after the cut are valid
    c.close()
    p.kill()
    p.start()
    c = client(p)
    assert c.get(b"after", b"c") == b"tail"
    c.close()
    log_text = (tmp_path / "kv.log").read_text()
    assert "torn tail: dropping 21 bytes" in log_text


def test_checkpoint_by_time(procs, tmp_path):
    data = tmp_path / "data"
    p = start(procs, data, "--checkpoint-interval", "0.3")
    c = client(p)
    for i in range(20):
        c.put(b"t%d" % i, b"c", b"v%d" % i)
    wait_until(lambda: int(c.status()["log_records"]) == 0, timeout=10, what="a timed checkpoint")
    assert int(c.status()["checkpoints"]) >= 1
    assert glob.glob(str(data / "tablet-*" / "checkpoint"))
    c.close()
    p.kill()
    p.start()
    c = client(p)
    assert [c.get(b"t%d" % i, b"c") for i in range(20)] == [b"v%d" % i for i in range(20)]
    assert c.status()["log_records"] == "0"        # served from checkpoints, nothing replayed
    c.close()


def test_corrupt_checkpoint_stops_the_server_with_a_clear_error(procs, tmp_path):
    data = tmp_path / "data"
    p = start(procs, data, "--checkpoint-interval", "0.2")
    c = client(p)
    c.put(b"x", b"y", b"z")
    wait_until(lambda: glob.glob(str(data / "tablet-*" / "checkpoint")), timeout=10, what="a checkpoint")
    c.close()
    p.kill()
    ck = glob.glob(str(data / "tablet-*" / "checkpoint"))[0]
    raw = bytearray(open(ck, "rb").read())
    raw[-30] ^= 0xFF
    open(ck, "wb").write(bytes(raw))
    q = Proc("kvserver", ["--standalone", "--port", "0", "--data", str(data), "--tablets", "2"],
             log_path=str(tmp_path / "bad.log"))
    with pytest.raises(AssertionError, match="did not print READY"):
        q.start(timeout=10)
    assert q.popen.returncode == 1
    text = (tmp_path / "bad.log").read_text()
    assert "footer CRC mismatch" in text and ck in text


def test_64_mib_values(procs, tmp_path):
    p = start(procs, tmp_path / "data")
    c = client(p)
    big = os.urandom(64 * 1024 * 1024)
    c.put(b"huge", b"v", big)
    assert c.get(b"huge", b"v") == big
    with pytest.raises(TooBig):
        c.put(b"huge", b"w", big + b"!")
    assert c.cols(b"huge") == [b"v"]
    c.close()
    p.kill()
    p.start()                                       # the 64 MiB record is replayed from the log
    c = client(p)
    assert c.get(b"huge", b"v") == big
    c.close()


def test_group_commit_can_be_switched_off(procs, tmp_path):
    p = start(procs, tmp_path / "data", "--no-group-commit")
    c = client(p)
    assert c.status()["group_commit"] == "0"
    c.put(b"a", b"b", b"c")
    c.close()
    p.kill()
    p.start()
    c = client(p)
    assert c.get(b"a", b"b") == b"c"
    c.close()
    q = start(procs, tmp_path / "other", name="kv2")
    c = client(q)
    assert c.status()["group_commit"] == "1"
    c.close()


def test_sigterm_stops_cleanly(procs, tmp_path):
    p = start(procs, tmp_path / "data")
    c = client(p)
    for i in range(30):
        c.put(b"term%d" % i, b"c", b"v%d" % i)
    c.close()
    p.terminate()
    assert p.popen.returncode == 0
    assert "stopping" in (tmp_path / "kv.log").read_text()
    p.start()
    c = client(p)
    assert [c.get(b"term%d" % i, b"c") for i in range(30)] == [b"v%d" % i for i in range(30)]
    c.close()
