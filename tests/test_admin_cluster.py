"""The admin console on a real replicated cluster (master + three tablet servers),
with a cluster secret, so every admin command and LB call must carry it.

KILL then WAKE of a tablet server from the console, while a writer keeps
writing through the cluster client: every acknowledged write is there
afterwards, and the console shows the kill (state, tablet map) as it happens.
Then the same console in headless Chromium: the confirmation dialog, the
result banner, the page refreshing by itself, and docs/screenshots/admin.png.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from src.config import load_config
from src.kv import KVError, tablet_of
from src.kvclient import ClusterClient, ServerClient
from tests.browser import SHOTS, launch_browser
from tests.harness import free_port, wait_until
from tests.test_admin import Client

ADMIN_PW = "admin password 1"


def write_config(tmp_path) -> str:
    path = tmp_path / "cluster.toml"
    kvs = "\n".join(f'[[kvserver]]\nid = "kv{i}"\nport = {free_port()}\n' for i in (1, 2, 3))
    path.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[cluster]
tablets = 6
replication = 3
secret = "cluster secret"
heartbeat_interval_s = 0.1
failure_timeout_s = 1.0
[storage]
memory_budget = "32MiB"
[master]
port = {free_port()}
{kvs}
[[frontend]]
id = "fe1"
port = 0
[lb]
port = {free_port()}
[mail.smtp]
port = {free_port()}
[mail.pop3]
port = {free_port()}
[http]
admin_password = "{ADMIN_PW}"
""")
    return str(path)


@pytest.fixture
def cluster(procs, tmp_path):
    from httpserver.frontend import Frontend

    path = write_config(tmp_path)
    cfg = load_config(path)
    procs.start("master", ["--config", path, "--id", "master"], name="master")
    for n in cfg.kvservers:
        procs.start("kvserver", ["--config", path, "--id", n.id], name=n.id)
    kv = ClusterClient(cfg.master.addr, secret=cfg.cluster.secret, deadline=20.0, timeout=3.0)
    wait_until(lambda: kv.put(b"probe", b"c", b"1") is None, timeout=30, what="the cluster serving")
    fe = Frontend(cfg, cfg.node("fe1"), kv, port=0).start()
    try:
        yield cfg, kv, fe
    finally:
        fe.stop()
        kv.close()


class Writer(threading.Thread):
    """Writes w/0, w/1, ... and records each write the store acknowledged."""

    def __init__(self, kv):
        super().__init__(daemon=True)
        self.kv = kv
        self.acked: dict[bytes, bytes] = {}
        self.stop = threading.Event()

    def run(self):
        i = 0
        while not self.stop.is_set() and i < 100_000:
            row, value = f"w/{i}".encode(), f"value {i}".encode()
            try:
                self.kv.put(row, b"v", value)
                self.acked[row] = value
            except KVError:
                pass  # not acknowledged: nothing to check
            i += 1


def nodes(cfg) -> dict:
    m = ServerClient(cfg.master.addr, timeout=2, secret=cfg.cluster.secret)
    try:
        return {d["id"]: d for d in m.nodes()}
    finally:
        m.close()


@pytest.mark.slow
def test_kill_and_wake_from_the_console_in_a_replicated_cluster(cluster):
    cfg, kv, fe = cluster
    admin = Client(fe.port).login("admin", ADMIN_PW)
    writer = Writer(kv)
    writer.start()
    try:
        wait_until(lambda: len(writer.acked) >= 30, timeout=20, what="writes before the kill")
        r = admin.post("/admin/servers/kv1/kill", {"confirm": "yes"})
        assert r.status == 303 and "ok=1" in r.getheader("Location")
        wait_until(lambda: nodes(cfg)["kv1"]["state"] in ("killed", "dead"), timeout=10, what="master sees kill")

        # The console shows it: kv1 killed, primary of nothing; the other tablets still have primaries.
        def console_shows_failover():
            snap = json.loads(admin.get("/admin/status.json").text)["snapshot"]
            procs = {p["id"]: p for p in snap["processes"]}
            cells = snap["map"]["cells"]
            prim = {int(t) for c in cells.values() for t, r in c.items() if r == "P"}
            return (procs["kv1"]["state"].startswith("killed") and "P" not in cells["kv1"].values()
                    and prim == set(range(6)))
        wait_until(console_shows_failover, timeout=15, what="the console showing the fail-over")
        live = {p["id"]: p for p in json.loads(admin.get("/admin/status.json").text)["snapshot"]["processes"]}
        syncs = int(live["kv2"]["detail"].split(", ")[1].split()[0])
        assert syncs > 0 and live["kv2"]["detail"].endswith(" syncs")   # the writes' shared syncs
        before = len(writer.acked)
        wait_until(lambda: len(writer.acked) >= before + 30, timeout=20, what="writes while kv1 is killed")

        r = admin.post("/admin/servers/kv1/wake", {"confirm": "yes"})
        assert r.status == 303 and "ok=1" in r.getheader("Location")
        wait_until(lambda: nodes(cfg)["kv1"]["state"] == "alive", timeout=30, what="kv1 alive again")
        before = len(writer.acked)
        wait_until(lambda: len(writer.acked) >= before + 30, timeout=20, what="writes after the wake")
    finally:
        writer.stop.set()
        writer.join(30)
    assert len(writer.acked) >= 90
    for row, value in writer.acked.items():
        assert kv.get(row, b"v") == value, row


@pytest.fixture
def whole_system(cluster, procs):
    """The cluster plus the LB (in-process, fe1 beating to it) and the three mail processes."""
    from lb.server import LoadBalancer
    from src.heartbeat import LBControlClient, LBHeartbeat

    cfg, kv, fe = cluster
    lb = LoadBalancer(cfg, cfg.lb.node).start()
    beat = LBHeartbeat(LBControlClient(cfg.lb.node.host, lb.port, cfg.cluster.secret), "fe1", lambda: fe.port,
                       lambda: fe.stats()["active_requests"], 0.5).start()
    for name in ("smtp", "pop3", "relay"):
        procs.start("smtp", ["--config", cfg.path, "--id", name], name=name)
    try:
        yield cfg, kv, fe, lb
    finally:
        beat.stop()
        lb.stop()


@pytest.mark.browser
@pytest.mark.slow
def test_console_in_a_browser(whole_system, tmp_path):
    cfg, kv, fe, lb = whole_system
    base = f"http://127.0.0.1:{lb.port}"  # through the load balancer, as a user would
    with launch_browser() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(base + "/")
        page.fill("form[action='/login'] input[name=username]", "admin")
        page.fill("form[action='/login'] input[name=password]", ADMIN_PW)
        page.click("form[action='/login'] button[type=submit]")
        page.goto(base + "/admin")
        assert page.locator("#adm-procs").inner_text().count("serving") == 3
        # every process of the system is up (the mail beacons may take a moment)
        page.wait_for_function(
            "() => document.querySelectorAll('#adm-procs .adm-state.ok').length === 9", timeout=15_000)

        # The page refreshes itself: the time stamp changes without a reload.
        first = page.inner_text("#adm-updated")
        page.wait_for_function("t => document.getElementById('adm-updated').textContent !== t", arg=first,
                               timeout=10_000)

        # Kill asks first; dismissing the dialog does nothing.
        questions = []
        page.once("dialog", lambda d: (questions.append(d.message), d.dismiss()))
        page.click("form[action='/admin/servers/kv3/kill'] button")
        assert questions == ["Kill kv3?"] and page.url == base + "/admin"
        page.once("dialog", lambda d: d.accept())
        page.click("form[action='/admin/servers/kv3/kill'] button")
        page.wait_for_url("**/admin?*did=kill*")
        assert "kv3 was killed" in page.inner_text(".adm-flash")
        page.wait_for_function(
            "() => document.querySelector('#adm-procs').textContent.includes('killed')", timeout=10_000)
        page.once("dialog", lambda d: d.accept())
        page.click("form[action='/admin/servers/kv3/wake'] button")
        page.wait_for_url("**/admin?*did=wake*")
        page.wait_for_function(
            "() => (document.querySelector('#adm-procs').textContent.match(/serving/g) || []).length === 3",
            timeout=30_000)

        wait_until(lambda: all(d["state"] == "alive" for d in nodes(cfg).values()), timeout=30,
                   what="the master seeing every server alive")
        page.goto(base + "/admin")
        shot = tmp_path / "admin.png"
        page.screenshot(path=str(shot), full_page=True)
        out = SHOTS
        os.makedirs(out, exist_ok=True)
        shutil.copy(shot, os.path.join(out, "admin.png"))

        # The raw data browser, down to one value.
        kv.put(b"demo/notes", b"readme", "Hello from the raw data browser.\nRows, columns and values "
               "are bytes; this one is UTF-8 text.\n".encode())
        t = tablet_of(b"demo/notes", cfg.cluster.tablets)
        page.goto(base + "/admin/data/kv2")
        page.click(f"a[href='/admin/data/kv2/{t}']")
        assert f"Tablet {t} on kv2" in page.inner_text("h1")
        page.click("text=demo/notes")
        page.click("text=readme")
        assert "shown as text" in page.inner_text("main")
        page.screenshot(path=str(tmp_path / "admin-data.png"), full_page=True)
        shutil.copy(tmp_path / "admin-data.png", os.path.join(out, "admin-data.png"))
