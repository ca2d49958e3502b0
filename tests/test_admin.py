"""The admin console over HTTP: an in-process Frontend in front of a real standalone
tablet server (a process), so KILL, WAKE and ROWS are the real thing.

Non-admins get 403 everywhere; KILL then WAKE from the console loses no
acknowledged write; the raw browser pages through a tablet with more rows
than a page, and shows hostile names escaped.
"""

from __future__ import annotations

import html
import json
import re
import urllib.parse

import pytest

from src.config import parse_config
from src.kv import Retry, tablet_of
from src.kvclient import ServerClient
from tests import webclient
from tests.harness import free_port, wait_until

ADMIN_PW = "admin password 1"
TABLETS = 8


Client = webclient.Client


@pytest.fixture
def cluster(procs, tmp_path, request):
    """Two standalone tablet servers and an in-process frontend.

    The frontend keeps its data (sessions included) on kv1; kv2 is the one the
    tests kill and wake, so the console stays usable meanwhile, as it does in
    a replicated cluster. kv2 holds TABLETS tablets, or as many as an
    indirect parameter says (fewer: tablets of the cluster it does not hold).
    """
    from httpserver.frontend import Frontend

    kv_port, kv2_port = free_port(), free_port()
    kv2_tablets = getattr(request, "param", TABLETS)
    for name, port, tablets in (("kv1", kv_port, TABLETS), ("kv2", kv2_port, kv2_tablets)):
        procs.start("kvserver", ["--standalone", "--port", str(port), "--data", str(tmp_path / name),
                                 "--tablets", str(tablets)], name=name)
    raw = {
        "cluster": {"tablets": TABLETS, "replication": 1},
        "master": {"port": free_port()},  # no master runs: the console must cope
        "kvserver": [{"id": "kv1", "port": kv_port}, {"id": "kv2", "port": kv2_port}],
        "frontend": [{"id": "fe1", "port": 0}],
        "lb": {"port": free_port()},
        "mail": {"smtp": {"port": free_port()}, "pop3": {"port": free_port()}},
        "http": {"admin_password": ADMIN_PW},
    }
    cfg = parse_config(raw, str(tmp_path / "test.toml"), str(tmp_path / "data"))
    kv = ServerClient(f"127.0.0.1:{kv_port}", timeout=5)
    fe = Frontend(cfg, cfg.node("fe1"), kv, port=0)
    fe.start()
    try:
        yield cfg, kv, fe
    finally:
        fe.stop()
        kv.close()


def admin_client(fe):
    return Client(fe.port).login("admin", ADMIN_PW)


ADMIN_GETS = ["/admin", "/admin/status.json", "/admin/data", "/admin/data/kv1", "/admin/data/kv1/0",
              "/admin/data/kv1/0/row?r=6162", "/admin/data/kv1/0/value?r=6162&c=6364"]
ADMIN_POSTS = ["/admin/servers/kv2/kill", "/admin/servers/kv2/wake", "/admin/frontends/fe1/disable",
               "/admin/frontends/fe1/enable"]


def test_non_admins_get_403_on_every_admin_route(cluster):
    cfg, kv, fe = cluster
    user = Client(fe.port)
    r = user.post("/signup", {"username": "mallory", "password": "not an admin 1"}, csrf=False)
    assert r.status == 303
    assert user.get("/home").status == 200 and user.csrf
    assert "/admin" not in re.findall(r'href="(/admin[^"]*)"', user.get("/home").text)
    for path in ADMIN_GETS:
        r = user.get(path)
        assert r.status == 403, path
        assert "tablet" not in r.text.lower() or "administrators" in r.text.lower()
    for path in ADMIN_POSTS:
        r = user.post(path, {"confirm": "yes"})  # a valid CSRF token: refused for being no admin
        assert r.status == 403, path
    assert ServerClient(cfg.kvservers[1].addr).status()["state"] == "serving"  # the kill did not happen
    anon = Client(fe.port)
    assert all(anon.get(p).status == 303 for p in ADMIN_GETS)
    assert all(anon.post(p, {"confirm": "yes"}, csrf=False).status in (401, 403) for p in ADMIN_POSTS)


def test_console_shows_processes_and_tablet_map(cluster):
    cfg, kv, fe = cluster
    admin = admin_client(fe)
    r = admin.get("/admin")
    assert r.status == 200
    for name in ("master", "kv1", "fe1", "lb", "smtp", "pop3", "relay"):
        assert f"<strong>{name}</strong>" in r.text
    assert "serving" in r.text
    assert r.text.count('<td class="adm-cell P"') == 2 * TABLETS  # each standalone server is primary of all
    assert "/static/admin.js" in r.text
    st = admin.get("/admin/status.json")
    assert st.status == 200 and st.getheader("Content-Type").startswith("application/json")
    data = json.loads(st.text)
    procs = {p["id"]: p for p in data["snapshot"]["processes"]}
    assert procs["kv1"]["state"] == "serving" and procs["master"]["state"] == "down"
    assert procs["kv1"]["actions"] == ["kill"] and procs["kv2"]["actions"] == ["kill"]
    assert "adm-table" in data["html"]["processes"] and "adm-map" in data["html"]["map"]


def test_kill_asks_first_without_javascript(cluster):
    cfg, kv, fe = cluster
    admin = admin_client(fe)
    r = admin.post("/admin/servers/kv2/kill")
    assert r.status == 200 and "Kill kv2?" in r.text and 'name="confirm" value="yes"' in r.text
    assert ServerClient(cfg.kvservers[1].addr).status()["state"] == "serving"


def test_kill_then_wake_from_the_console_loses_no_acknowledged_write(cluster):
    cfg, kv, fe = cluster
    admin = admin_client(fe)
    kv2 = ServerClient(cfg.kvservers[1].addr, timeout=5)
    acked = {}
    for i in range(200):
        row, value = f"user{i}/file", f"value {i}".encode() * (1 + i % 7)
        kv2.put(row, "data", value)
        acked[row] = value
    r = admin.post("/admin/servers/kv2/kill", {"confirm": "yes"})
    assert r.status == 303 and "ok=1" in r.getheader("Location")
    page = admin.get(r.getheader("Location"))
    assert "kv2 was killed" in page.text
    assert kv2.status()["state"] == "killed"
    with pytest.raises(Retry):
        kv2.get("user1/file", "data")
    procs = {p["id"]: p for p in json.loads(admin.get("/admin/status.json").text)["snapshot"]["processes"]}
    assert procs["kv2"]["state"] == "killed" and procs["kv2"]["actions"] == ["wake"]
    r = admin.post("/admin/servers/kv2/wake", {"confirm": "yes"})
    assert r.status == 303 and "ok=1" in r.getheader("Location")
    assert "waking up" in admin.get(r.getheader("Location")).text
    wait_until(lambda: kv2.status()["state"] == "serving", timeout=20, what="kv2 serving again")
    for row, value in acked.items():
        assert kv2.get(row, "data") == value
    kv2.close()


def rows_in_tablet(t: int, n: int) -> list[bytes]:
    out, i = [], 0
    while len(out) < n:
        name = f"page/{i:05d}".encode()
        if tablet_of(name, TABLETS) == t:
            out.append(name)
        i += 1
    return out


def test_raw_browser_pages_through_a_tablet(cluster):
    cfg, kv, fe = cluster
    admin = admin_client(fe)
    hostile = b"<script>alert(1)</script>"
    t = tablet_of(hostile, TABLETS)
    binary = b"\x00\xffbin"
    names = rows_in_tablet(t, 57)
    extra = [n for n in (hostile, binary, hostile + b"x", binary + b"\x01") if tablet_of(n, TABLETS) == t]
    for name in names + extra:
        kv.put(name, "c", b"v")
    want = sorted(names + extra)

    r = admin.get("/admin/data/kv1")
    assert r.status == 200 and f'href="/admin/data/kv1/{t}"' in r.text

    seen, url, pages, texts = [], f"/admin/data/kv1/{t}?limit=20", 0, ""
    while url:
        r = admin.get(url)
        assert r.status == 200
        texts += r.text
        hexes = re.findall(rf'href="/admin/data/kv1/{t}/row\?r=([0-9a-f]+)"', r.text)
        assert len(hexes) <= 20
        seen += [bytes.fromhex(h) for h in hexes]
        nxt = re.search(r'<a rel="next" href="([^"]+)"', r.text)
        url = html.unescape(nxt.group(1)) if nxt else None
        pages += 1
    assert pages >= 3
    assert seen == sorted(set(seen))  # in order, none twice
    # the tablet may also hold the app's own rows (sessions, accounts): ours are all there
    assert [r for r in seen if r in set(want)] == want
    assert "<script>alert" not in texts
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in texts


def test_raw_browser_rows_columns_values_escaped(cluster):
    cfg, kv, fe = cluster
    admin = admin_client(fe)
    row = b"<b>row</b>\x00\xfe"
    kv.put(row, b"<i>text</i>", "héllo <world> & more\n".encode())
    kv.put(row, b"bin\x01", bytes(range(256)) * 40)
    t = tablet_of(row, TABLETS)

    r = admin.get(f"/admin/data/kv1/{t}")
    assert row.hex() in r.text and "<b>row</b>" not in r.text and "&lt;b&gt;row&lt;/b&gt;\\x00\\xfe" in r.text

    r = admin.get(f"/admin/data/kv1/{t}/row?r={row.hex()}")
    assert r.status == 200
    assert "2 columns" in r.text and "&lt;i&gt;text&lt;/i&gt;" in r.text and "bin\\x01" in r.text
    assert "<i>text</i>" not in r.text

    r = admin.get(f"/admin/data/kv1/{t}/value?r={row.hex()}&c={b'<i>text</i>'.hex()}")
    assert r.status == 200 and "shown as text" in r.text
    assert "héllo &lt;world&gt; &amp; more" in r.text

    binc = b"bin\x01".hex()
    r = admin.get(f"/admin/data/kv1/{t}/value?r={row.hex()}&c={binc}")
    assert r.status == 200 and "<strong>10240</strong> bytes (the first 4096 shown)" in r.text
    assert "shown as hex" in r.text and "00000000  00 01 02 03" in r.text
    assert "00000ff0" in r.text and "00001000" not in r.text

    assert admin.get(f"/admin/data/kv1/{t}/value?r={row.hex()}&c=6e6f").status == 404
    assert admin.get(f"/admin/data/kv1/{t}/row?r=zz").status == 400
    assert admin.get("/admin/data/kv9").status == 404


@pytest.mark.parametrize("cluster", [TABLETS // 2], indirect=True)
def test_raw_browser_unknown_or_unheld_tablet_is_404_and_row_counts_say_about(cluster):
    cfg, kv, fe = cluster
    admin = admin_client(fe)
    held, unheld = TABLETS // 2 - 1, TABLETS // 2     # kv2 holds tablets 0 .. TABLETS/2 - 1
    assert admin.get(f"/admin/data/kv2/{held}").status == 200
    r = admin.get(f"/admin/data/kv2/{unheld}")
    assert r.status == 404 and "kv2 does not hold tablet" in r.text and "does not answer" not in r.text
    for path in (f"/admin/data/kv1/{TABLETS}", "/admin/data/kv1/99", f"/admin/data/kv1/{TABLETS}/row?r=6162",
                 f"/admin/data/kv1/{TABLETS}/value?r=6162&c=6364"):
        assert admin.get(path).status == 404, path
    # TABLETS counts rows until the next checkpoint (deleted ones too): the page says "about"
    for i in range(3):
        kv.put(rows_in_tablet(0, 3)[i], "c", b"v")
    kv.delete(rows_in_tablet(0, 3)[0], "c")
    r = admin.get("/admin/data/kv1")
    assert re.search(r'href="/admin/data/kv1/0">tablet 0</a>.*?about \d+</td>', r.text)
    assert "estimate" in r.text
    listed = admin.get("/admin/data/kv1/0?limit=500").text
    assert re.search(r"\d+ rows from the start", listed)


def test_a_link_cannot_put_its_own_words_on_the_console(cluster):
    """The result banner shows only what this console's own redirect signed:
    a link from elsewhere (or a tampered one) shows no banner at all."""
    cfg, kv, fe = cluster
    admin = admin_client(fe)
    lure = "the cluster secret expired. Log in again at http://evil.example/login"
    for query in ({"did": "kill", "id": "kv1", "ok": "0", "why": lure},
                  {"did": "kill", "id": lure, "ok": "1"},
                  {"did": "disable", "id": lure, "ok": "0"}):
        page = admin.get("/admin?" + urllib.parse.urlencode(query))
        assert page.status == 200 and "evil.example" not in page.text and "adm-flash" not in page.text, query
    # a real failure's banner shows, but not once its reason is swapped
    r = admin.post("/admin/frontends/fe1/disable", {"confirm": "yes"})
    real = r.getheader("Location")
    assert "Could not disable fe1" in admin.get(real).text
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(real).query)
    q["why"] = [lure]
    assert "evil.example" not in admin.get("/admin?" + urllib.parse.urlencode(q, doseq=True)).text
    # nor in another administrator's session
    other = admin_client(fe)
    assert "adm-flash" not in other.get(real).text


def test_disable_and_enable_a_frontend_from_the_console(cluster):
    from lb.server import LoadBalancer
    from src.heartbeat import LBControlClient

    cfg, kv, fe = cluster
    admin = admin_client(fe)
    # without a load balancer the console says what went wrong
    r = admin.post("/admin/frontends/fe1/disable", {"confirm": "yes"})
    assert r.status == 303 and "ok=0" in r.getheader("Location")
    assert "Could not disable fe1" in admin.get(r.getheader("Location")).text

    lb = LoadBalancer(cfg, cfg.lb.node).start()
    try:
        ctl = LBControlClient(cfg.lb.node.host, lb.port)
        ctl.heartbeat("fe1", fe.port, 0)
        assert "Disable" in admin.get("/admin").text
        r = admin.post("/admin/frontends/fe1/disable")  # asks first
        assert r.status == 200 and "Disable fe1?" in r.text
        assert ctl.status()["frontends"][0]["enabled"] is True
        r = admin.post("/admin/frontends/fe1/disable", {"confirm": "yes"})
        assert r.status == 303 and "ok=1" in r.getheader("Location")
        assert "fe1 is disabled" in admin.get(r.getheader("Location")).text
        assert ctl.status()["frontends"][0]["enabled"] is False
        procs = {p["id"]: p for p in json.loads(admin.get("/admin/status.json").text)["snapshot"]["processes"]}
        assert procs["fe1"]["state"] == "disabled" and procs["fe1"]["actions"] == ["enable"]
        r = admin.post("/admin/frontends/fe1/enable", {"confirm": "yes"})
        assert r.status == 303 and "ok=1" in r.getheader("Location")
        assert ctl.status()["frontends"][0]["enabled"] is True
        assert admin.post("/admin/frontends/fe9/disable", {"confirm": "yes"}).status == 404
        assert admin.post("/admin/frontends/fe1/restart", {"confirm": "yes"}).status == 404
    finally:
        lb.stop()
