"""Mail processes show up in the admin console through their beacons in `sys/procs`."""

import json

from httpserver.apps.admin_data import ClusterView
from src.config import load_config
from src.heartbeat import read_beacons
from src.kvclient import ServerClient
from tests.harness import free_port, wait_until


def test_smtp_pop3_and_relay_beacons(procs, tmp_path):
    kv_port = free_port()
    procs.start("kvserver", ["--standalone", "--port", str(kv_port), "--data", str(tmp_path / "kv")], name="kv")
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(f"""
[master]
port = {free_port()}
[lb]
port = {free_port()}
[mail.smtp]
port = {free_port()}
[mail.pop3]
port = {free_port()}
""")
    common = ["--config", str(cfg_path), "--data", str(tmp_path / "data"), "--kv-server", f"127.0.0.1:{kv_port}"]
    mail = {name: procs.start("smtp", ["--id", name, *common], name=name) for name in ("smtp", "pop3", "relay")}
    kv = ServerClient(f"127.0.0.1:{kv_port}")
    got = wait_until(lambda: (b := read_beacons(kv)) and len(b) == 3 and b, timeout=10, what="three beacons")
    assert {k: v["state"] for k, v in got.items()} == {"smtp": "up", "pop3": "up", "relay": "up"}
    assert got["smtp"]["addr"] == f"127.0.0.1:{mail['smtp'].port}" and got["smtp"]["role"] == "SMTP server"

    cfg = load_config(str(cfg_path), str(tmp_path / "data"))
    view = ClusterView(cfg, kv, timeout=0.5)
    try:
        rows = {p["id"]: p for p in view.snapshot()["processes"]}
    finally:
        view.close()
    assert rows["smtp"]["state"] == "up" and rows["pop3"]["state"] == "up" and rows["relay"]["state"] == "up"

    mail["pop3"].terminate()  # a clean stop is recorded as such
    wait_until(lambda: read_beacons(kv)["pop3"]["state"] == "stopped", timeout=5, what="pop3 stopped")
    mail["smtp"].kill()  # a crash is not: the beacon just ages
    cell = json.loads(kv.get(b"sys/procs", b"smtp"))
    assert cell["state"] == "up"
    kv.close()


def test_a_heartbeat_that_never_got_through_fails_quietly_then_loudly(caplog):
    """At start the LB is not up yet (run_all.sh starts it last): the first
    failed beats are INFO. Once beats got through, losing the other side is
    a WARNING."""
    import logging
    from src.heartbeat import Periodic
    results = [OSError("refused"), None, OSError("gone")]

    class Beat(Periodic):
        def beat(self):
            r = results.pop(0)
            if r is not None:
                raise r
    b = Beat(60, "test-beat")
    with caplog.at_level(logging.INFO, logger="src.heartbeat"):
        for _ in range(3):
            b._beat_once()
    levels = [(r.levelname, "gone" in r.getMessage()) for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert levels == [("INFO", False), ("WARNING", True)]
