"""The admin console's data side: byte previews, beacons, and a snapshot of a cluster that is down."""

import json
import time

from httpserver.apps.admin_data import ClusterView, hexdump, preview, show_name
from src.config import parse_config
from src.heartbeat import BEACON_ROW, ProcessBeacon, read_beacons
from src.kv import MemoryKV
from tests.harness import free_port, wait_until


def test_show_name_keeps_names_distinct_and_readable():
    assert show_name(b"acct/alice") == "acct/alice"
    assert show_name("drive/été".encode()) == "drive/été"
    assert show_name(b"a\x00b\xff") == "a\\x00b\\xff"
    assert show_name(b"a\nb\tc d") == "a\\x0ab\\x09c d"
    assert show_name(b"x\\x00") == "x\\\\x00"  # a literal backslash is not mistaken for an escape
    assert show_name(b"<script>") == "<script>"  # escaping for HTML is the template's job
    names = [b"\x00", b"\\x00", b"\xc3", b"\\xc3"]
    assert len({show_name(n) for n in names}) == len(names)


def test_preview_text_or_hex():
    assert preview(b"hello\nworld") == ("text", "hello\nworld")
    kind, text = preview(b"\x00\x01binary\xff")
    assert kind == "hex"
    assert text.startswith("00000000  00 01 62 69 6e 61 72 79 ff")
    assert text.endswith("..binary.")
    # only the first 4 KB, and a multi-byte character cut at the limit is still text
    kind, text = preview(("é" * 3000).encode())
    assert kind == "text" and len(text.encode()) <= 4096 and len(text) == 2048
    kind, text = preview(b"\xff" * 10000)
    assert kind == "hex" and text.count("\n") == 4096 // 16 - 1


def test_hexdump_lines():
    assert hexdump(b"") == ""
    lines = hexdump(bytes(range(40))).split("\n")
    assert len(lines) == 3
    assert lines[2].startswith("00000020  20 21 22 23 24 25 26 27")


def test_beacons_written_read_and_marked_stale():
    kv = MemoryKV()
    b = ProcessBeacon(kv, "smtp", "SMTP server", "127.0.0.1:2500", load_fn=lambda: 3, interval=0.05).start()
    wait_until(lambda: "smtp" in read_beacons(kv), timeout=5)
    got = read_beacons(kv)["smtp"]
    assert got["state"] == "up" and got["load"] == 3 and got["role"] == "SMTP server" and not got["stale"]
    b.stop()
    assert read_beacons(kv)["smtp"]["state"] == "stopped"
    # a beacon from a process that died (no clean stop) turns "down" once stale
    kv.put(BEACON_ROW, b"pop3", json.dumps({"state": "up", "time": time.time() - 60}).encode())
    kv.put(BEACON_ROW, b"junk", b"not json")
    got = read_beacons(kv)
    assert got["pop3"]["state"] == "down" and got["pop3"]["stale"]
    assert "junk" not in got


def test_snapshot_of_a_cluster_that_is_down_is_quick_and_complete(tmp_path):
    ports = [free_port() for _ in range(8)]
    raw = {
        "master": {"port": ports[0]},
        "kvserver": [{"id": f"kv{i}", "port": ports[i]} for i in (1, 2, 3)],
        "frontend": [{"id": "fe1", "port": ports[4]}],
        "lb": {"port": ports[5]},
        "mail": {"smtp": {"port": ports[6]}, "pop3": {"port": ports[7]}},
    }
    cfg = parse_config(raw, str(tmp_path / "c.toml"), str(tmp_path))
    kv = MemoryKV()
    kv.put(BEACON_ROW, b"relay", json.dumps({"state": "up", "role": "relay", "load": 2,
                                             "time": time.time()}).encode())
    view = ClusterView(cfg, kv, timeout=0.5)
    try:
        t0 = time.monotonic()
        snap = view.snapshot()
        assert time.monotonic() - t0 < 3
    finally:
        view.close()
    states = {p["id"]: p["state"] for p in snap["processes"]}
    assert list(states) == ["master", "kv1", "kv2", "kv3", "fe1", "lb", "smtp", "pop3", "relay"]
    assert states["master"] == "down" and states["kv1"] == "down" and states["lb"] == "down"
    assert states["smtp"] == "down" and states["relay"] == "up"
    kv1 = snap["processes"][1]
    assert kv1["actions"] == [] and "not running" in kv1["detail"]  # no Kill/Wake for a dead process
    assert snap["map"]["servers"] == ["kv1", "kv2", "kv3"] and snap["map"]["down"] == ["kv1", "kv2", "kv3"]
    json.dumps(snap)  # the JSON endpoint serves it as is


def test_a_killed_server_is_explained_not_shown_as_a_protocol_reply():
    """UX QA: the data browser said "kv3 does not answer: RETRY killed"."""
    from httpserver.apps.admin import _why
    from src.kv import error_from_reply
    assert _why(error_from_reply("RETRY", "killed")) == "it was killed from the console (Wake it in the process table)"
    assert _why(ConnectionRefusedError(111, "Connection refused")) == "[Errno 111] Connection refused"


def test_the_process_table_of_a_killed_server_says_only_what_it_reports(procs, tmp_path):
    """UX QA: a KILLed server's row read "? log records, ? syncs": its STATUS
    after KILL has no counters. The row says killed, offers Wake, and shows
    no made-up numbers; a serving server shows its counters."""
    from src.kvclient import ServerClient
    p = procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "kv"),
                                 "--tablets", "4"], name="kv1")
    cfg = parse_config({"cluster": {"replication": 1},
                        "kvserver": [{"id": "kv1", "host": "127.0.0.1", "port": p.port}]},
                       data_dir=str(tmp_path))
    view = ClusterView(cfg, MemoryKV())
    c = ServerClient(f"127.0.0.1:{p.port}")
    try:
        c.put("r", "c", b"v")
        row = view._server_row(cfg.node("kv1"), {"ok": True, "status": c.status()}, None)
        assert row["state"] == "serving" and row["actions"] == ["kill"]
        assert "log records" in row["detail"] and "syncs" in row["detail"], row
        c.kill()
        row = view._server_row(cfg.node("kv1"), {"ok": True, "status": c.status()}, None)
        assert row["state"] == "killed" and row["actions"] == ["wake"]
        assert "?" not in row["detail"] + row["load"] and row["detail"] == "0 log records", row
    finally:
        c.close()
