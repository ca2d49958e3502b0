"""Accounts over real sockets: the fixed routes with their exact statuses,
logout and password change ending sessions, CSRF, throttling, timing of an
unknown user vs a wrong password, the admin account, and a session made on
one frontend process being valid on another."""

import http.client
import os
import re
import statistics
import threading
import time
import urllib.parse

import pytest

from httpserver.frontend import Frontend, admin_password
from src.config import parse_config
from src.kv import MemoryKV
from tests.harness import free_port

PASSWORD = "correct horse"


class Client:
    """A tiny browser: one keep-alive connection and a cookie jar of one cookie."""

    def __init__(self, port: int):
        self.port = port
        self.sid: str | None = None
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(self, method, path, fields=None, headers=None):
        h = dict(headers or {})
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields)
            h["Content-Type"] = "application/x-www-form-urlencoded"
        if self.sid:
            h["Cookie"] = f"sid={self.sid}"
        self.conn.request(method, path, body=body, headers=h)
        r = self.conn.getresponse()
        r.body = r.read().decode("utf-8", "replace")
        cookie = r.getheader("Set-Cookie")
        if cookie and cookie.startswith("sid="):
            value = cookie.split(";", 1)[0][4:]
            self.sid = value or None
        return r

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, fields=None, **kw):
        return self.request("POST", path, fields if fields is not None else {}, **kw)

    def csrf(self, path="/home") -> str:
        r = self.get(path)
        m = re.search(r'name="csrf" value="([^"]+)"', r.body)
        assert m, f"no csrf field on {path}"
        return m.group(1)

    def close(self):
        self.conn.close()


def make_cfg(tmp_path, **http):
    http.setdefault("admin_password", "admin-secret-1")
    return parse_config({"http": http, "lb": {"port": free_port()}}, "test.toml", str(tmp_path))


@pytest.fixture
def fe(tmp_path):
    cfg = make_cfg(tmp_path)
    f = Frontend(cfg, cfg.node("fe1") if cfg.frontends else _node(), MemoryKV(), port=0).start()
    try:
        yield f
    finally:
        f.stop()


def _node():
    from src.config import Node
    return Node("fe1", "127.0.0.1", 0)


@pytest.fixture
def client(fe):
    c = Client(fe.port)
    yield c
    c.close()


def test_fixed_routes_statuses(fe, client):
    r = client.get("/")
    assert r.status == 200 and 'action="/login"' in r.body and 'action="/signup"' in r.body
    assert client.get("/home").status == 303 and client.get("/home").getheader("Location") == "/"

    r = client.post("/signup", {"username": "Alice", "password": PASSWORD})
    assert r.status == 303 and r.getheader("Location") == "/home"
    cookie = r.getheader("Set-Cookie")
    assert re.match(r"sid=[A-Za-z0-9_-]{22}; ", cookie)
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    home = client.get("/home")
    assert home.status == 200 and "Hello, alice" in home.body and 'href="/drive"' in home.body
    assert client.get("/").status == 303

    anon = Client(fe.port)
    r = anon.post("/signup", {"username": "alice", "password": "another password"})
    assert r.status == 409 and "taken" in r.body and 'action="/signup"' in r.body and anon.sid is None
    for fields in ({"username": "bad name!", "password": PASSWORD}, {"username": "bob", "password": "short"},
                   {"username": "", "password": PASSWORD}, {}):
        r = anon.post("/signup", fields)
        assert r.status == 400 and 'action="/signup"' in r.body, fields
    assert anon.post("/login", {"username": "alice", "password": "wrong password"}).status == 401
    assert anon.post("/login", {"username": "nobody", "password": PASSWORD}).status == 401
    r = anon.post("/login", {"username": "ALICE", "password": PASSWORD})
    assert r.status == 303 and r.getheader("Location") == "/home" and anon.sid
    assert anon.get("/account").status == 200
    anon.close()


def test_logout_ends_the_session_and_needs_csrf(client):
    client.post("/signup", {"username": "carol", "password": PASSWORD})
    sid = client.sid
    token = client.csrf()
    assert client.post("/logout", {"csrf": "forged"}).status == 403
    assert client.get("/home").status == 200, "a forged logout must not end the session"
    r = client.post("/logout", {"csrf": token})
    assert r.status == 303 and r.getheader("Location") == "/"
    assert client.sid is None
    client.sid = sid                                  # replaying the old cookie does not work
    r = client.get("/home")
    assert r.status == 303 and r.getheader("Location") == "/"


def test_password_change_ends_other_sessions(fe):
    a, b = Client(fe.port), Client(fe.port)
    a.post("/signup", {"username": "dave", "password": PASSWORD})
    b.post("/login", {"username": "dave", "password": PASSWORD})
    assert b.get("/home").status == 200
    token = a.csrf("/account")
    r = a.post("/account", {"csrf": token, "old": "not the password", "new": "new password 1",
                            "confirm": "new password 1"})
    assert r.status == 403 and "not right" in r.body
    r = a.post("/account", {"csrf": token, "old": PASSWORD, "new": "new password 1", "confirm": "different"})
    assert r.status == 400
    r = a.post("/account", {"csrf": token, "old": PASSWORD, "new": "new password 1",
                            "confirm": "new password 1"})
    assert r.status == 200 and "was changed" in r.body
    assert a.get("/home").status == 200, "the session that changed it stays"
    assert b.get("/home").status == 303, "every other session ends"
    c = Client(fe.port)
    assert c.post("/login", {"username": "dave", "password": PASSWORD}).status == 401
    assert c.post("/login", {"username": "dave", "password": "new password 1"}).status == 303
    for x in (a, b, c):
        x.close()


def test_the_store_never_holds_a_usable_session_id(fe):
    """What the admin's raw data browser (or a stolen checkpoint) shows of a
    session is no bearer token: row names and cells never contain the cookie
    value, and pasting a session row's name as the cookie does not log in."""
    a = Client(fe.port)
    a.post("/signup", {"username": "ivan", "password": PASSWORD})
    assert a.get("/home").status == 200
    cells = [(row, col, value) for row, cols in fe.kv._rows.items() for col, value in cols.items()]
    assert not [c for c in cells if any(a.sid.encode() in part for part in c)]
    names = [row[len(b"sess/"):].decode() for row, _, _ in cells if row.startswith(b"sess/")]
    names += [col.decode() for row, col, _ in cells if row == b"usess/ivan"]
    assert names
    thief = Client(fe.port)
    for name in names:
        for guess in (name, name[:22]):
            thief.sid = guess
            assert thief.get("/home").status == 303, guess
    a.close()
    thief.close()


def test_forged_or_missing_csrf_is_403(client):
    client.post("/signup", {"username": "erin", "password": PASSWORD})
    for fields in ({"old": PASSWORD, "new": "xxxxxxxxxx", "confirm": "xxxxxxxxxx"},
                   {"csrf": "x" * 22, "old": PASSWORD, "new": "xxxxxxxxxx", "confirm": "xxxxxxxxxx"}):
        r = client.post("/account", fields)
        assert r.status == 403 and "reload" in r.body
    r = client.post("/account", {"old": PASSWORD, "new": "xxxxxxxxxx", "confirm": "xxxxxxxxxx"},
                    headers={"X-CSRF-Token": "wrong"})
    assert r.status == 403
    # Without a session a POST to a logged-in route is 401.
    anon = Client(client.port)
    assert anon.post("/account", {"csrf": "x"}).status == 401
    anon.close()


def test_login_throttling(client):
    client.post("/signup", {"username": "frank", "password": PASSWORD})
    other = Client(client.port)
    for _ in range(6):
        assert other.post("/login", {"username": "frank", "password": "wrong guess!"}).status == 401
    r = other.post("/login", {"username": "frank", "password": PASSWORD})
    assert r.status == 429 and int(r.getheader("Retry-After")) >= 1 and "wait" in r.body
    time.sleep(1.1)  # the lock after the 6th failure is 1 s
    assert other.post("/login", {"username": "frank", "password": PASSWORD}).status == 303
    other.close()


def test_unknown_user_costs_as_much_as_a_wrong_password(client):
    client.post("/signup", {"username": "grace", "password": PASSWORD})
    anon = Client(client.port)

    def timed(username):
        t = time.perf_counter()
        r = anon.post("/login", {"username": username, "password": "wrong password"})
        assert r.status == 401
        return time.perf_counter() - t
    wrong, unknown = [], []
    for i in range(4):
        wrong.append(timed("grace"))
        unknown.append(timed(f"nobody{i}"))
    ratio = statistics.median(unknown) / statistics.median(wrong)
    assert 0.5 < ratio < 2.0, (wrong, unknown)
    anon.close()


def test_admin_account_and_admin_only_pages(fe, client):
    admin = Client(fe.port)
    assert admin.post("/login", {"username": "admin", "password": "admin-secret-1"}).status == 303
    home = admin.get("/home")
    assert 'href="/admin"' in home.body
    client.post("/signup", {"username": "heidi", "password": PASSWORD})
    assert 'href="/admin"' not in client.get("/home").body
    if "admin" in fe.apps:
        assert client.get("/admin").status == 403
        assert admin.get("/admin").status == 200
    admin.close()


def test_sliding_expiry_over_http(tmp_path):
    cfg = make_cfg(tmp_path, session_ttl_s=2.0)
    f = Frontend(cfg, _node(), MemoryKV(), port=0).start()
    try:
        c = Client(f.port)
        r = c.post("/signup", {"username": "judy", "password": PASSWORD})
        assert "Max-Age" not in r.getheader("Set-Cookie"), "the server, not the browser, decides expiry"
        start = time.monotonic()
        while time.monotonic() - start < 3.0:      # active for longer than the TTL: still logged in
            assert c.get("/home").status == 200
            time.sleep(0.25)
        time.sleep(2.2)                             # idle for longer than the TTL: gone
        r = c.get("/home")
        assert r.status == 303 and r.getheader("Location") == "/"
        c.close()
    finally:
        f.stop()


def test_admin_password_file_is_created_once(tmp_path):
    cfg = make_cfg(tmp_path, admin_password="")
    results = []
    threads = [threading.Thread(target=lambda: results.append(admin_password(cfg))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = tmp_path / "admin.password"
    assert len(set(results)) == 1 and len(results[0]) >= 8
    assert path.read_text().strip() == results[0]
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    fe = Frontend(cfg, _node(), MemoryKV(), port=0).start()
    try:
        c = Client(fe.port)
        assert c.post("/login", {"username": "admin", "password": results[0]}).status == 303
        c.close()
    finally:
        fe.stop()


def test_session_is_valid_on_a_second_frontend_process(procs, tmp_path):
    kv = procs.start("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "kv")], name="kv")
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[[frontend]]
id = "fe1"
host = "127.0.0.1"
port = 0
[[frontend]]
id = "fe2"
host = "127.0.0.1"
port = 0
[lb]
port = {free_port()}
[http]
admin_password = "admin-secret-1"
""")
    fes = [procs.start("httpserver", ["--config", str(cfg), "--id", name, "--kv-server", f"127.0.0.1:{kv.port}"],
                       name=name) for name in ("fe1", "fe2")]
    one, two = Client(fes[0].port), Client(fes[1].port)
    assert one.post("/signup", {"username": "ivan", "password": PASSWORD}).status == 303
    two.sid = one.sid
    r = two.get("/home")
    assert r.status == 200 and "Hello, ivan" in r.body
    token = two.csrf()
    assert two.post("/logout", {"csrf": token}).status == 303
    assert one.get("/home").status == 303, "logged out on fe2 means logged out on fe1"
    # the admin account was made by the processes, once
    admin = Client(fes[1].port)
    assert admin.post("/login", {"username": "admin", "password": "admin-secret-1"}).status == 303
    for c in (one, two, admin):
        c.close()
    # SIGTERM stops a frontend cleanly (exit code 0), promptly
    start = time.monotonic()
    fes[0].terminate(timeout=10)
    assert fes[0].popen.returncode == 0 and time.monotonic() - start < 8


@pytest.mark.skipif(__import__("shutil").which("curl") is None, reason="curl is not installed")
def test_fixed_routes_through_curl(fe):
    import subprocess
    base = f"http://127.0.0.1:{fe.port}"

    def curl(*args):
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                              "--max-time", "10", *args], capture_output=True, text=True, timeout=20).stdout
        return out.strip()
    jar = str(fe.cfg.data_dir) + "/cookies.txt"
    assert curl("-c", jar, "-d", "username=curly", "-d", f"password={PASSWORD}", base + "/signup") == \
        f"303 {base}/home"
    assert curl("-d", "username=curly", "-d", f"password={PASSWORD}", base + "/signup").startswith("409")
    assert curl("-d", "username=curly", "-d", "password=wrong password", base + "/login").startswith("401")
    assert curl("-b", jar, base + "/home").startswith("200")
    assert curl(base + "/home") == f"303 {base}/"
    assert curl("-b", jar, "-d", "csrf=forged", base + "/logout").startswith("403")
    assert curl("-b", jar, base + "/home").startswith("200")


def test_frontend_over_the_cluster_survives_sigkill(procs, tmp_path):
    """The default KV client (the cluster: master + tablet servers): sessions
    live in the store, so a SIGKILLed and restarted frontend still knows them."""
    p = {n: free_port() for n in ("master", "kv1", "kv2", "fe1", "lb")}
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[cluster]
tablets = 4
replication = 2
[http]
admin_password = "admin-secret-1"
[master]
port = {p['master']}
[[kvserver]]
id = "kv1"
port = {p['kv1']}
[[kvserver]]
id = "kv2"
port = {p['kv2']}
[[frontend]]
id = "fe1"
port = {p['fe1']}
[lb]
port = {p['lb']}
""")
    procs.start("master", ["--config", str(cfg), "--id", "master"], name="master")
    for k in ("kv1", "kv2"):
        procs.start("kvserver", ["--config", str(cfg), "--id", k], name=k)
    fe = procs.start("httpserver", ["--config", str(cfg), "--id", "fe1"], name="fe1")
    c = Client(fe.port)
    assert c.post("/signup", {"username": "zed", "password": PASSWORD}).status == 303
    assert c.get("/home").status == 200
    c.close()
    fe.kill()
    fe.start()
    assert fe.port == p["fe1"]
    c2 = Client(fe.port)
    c2.sid = c.sid
    r = c2.get("/home")
    assert r.status == 200 and "Hello, zed" in r.body
    assert Client(fe.port).post("/login", {"username": "admin", "password": "admin-secret-1"}).status == 303
    c2.close()


def test_login_and_signup_from_another_site_are_refused(fe, client):
    """Log-in CSRF: a page on another site posting our log-in form would log
    the visitor in to the attacker's account. Browsers say where a POST
    comes from (Origin); only our own pages may post these forms."""
    here = f"http://127.0.0.1:{fe.port}"
    r = client.post("/signup", {"username": "mallory", "password": PASSWORD},
                    headers={"Origin": "http://evil.example"})
    assert r.status == 403 and client.sid is None
    r = client.post("/signup", {"username": "mallory", "password": PASSWORD}, headers={"Origin": here})
    assert r.status == 303 and client.sid
    client.sid = None                    # another browser
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{fe.port + 1}"):
        r = client.post("/login", {"username": "mallory", "password": PASSWORD}, headers={"Origin": origin})
        assert r.status == 403 and client.sid is None, origin
    r = client.post("/login", {"username": "mallory", "password": PASSWORD})       # no Origin: curl
    assert r.status == 303 and client.sid


@pytest.mark.parametrize("name", ["bob", "b", "a.b", "a_", "a-", "x" * 32, "bob.", ".bob", "-x", "a b", "x" * 33])
def test_the_sign_up_forms_pattern_says_what_the_server_says(client, name):
    """UX QA: the form took "bob." and the server refused it after the round
    trip (the password field cleared). The browser's pattern now follows the
    server's rule."""
    import html as htmlmod
    import re
    from src.accounts import InvalidUsername, normalize_username
    page = client.get("/").body
    pattern = htmlmod.unescape(re.search(r'name="username"[^>]*pattern="([^"]+)"', page, re.S).group(1))
    try:
        server_ok = normalize_username(name) == name
    except InvalidUsername:
        server_ok = False
    assert (re.fullmatch(pattern, name) is not None) == server_ok


def test_log_in_returns_to_the_page_that_asked_for_it_and_never_off_site(fe):
    """UX QA: a logged-out visit to /drive landed on the start page with no
    word, and the log-in then went to /home. The start page now says why,
    and the log-in goes back; a `next` that leaves the site is ignored."""
    from src.accounts import Accounts
    Accounts(fe.kv).create("alice", "correct horse")
    c = Client(fe.port)
    r = c.get("/drive")
    assert r.status == 303 and r.getheader("Location") == "/?next=%2Fdrive"
    page = c.get("/?next=%2Fdrive")
    assert "Please log in to see that page." in page.body and 'name="next" value="/drive"' in page.body
    r = c.post("/login", {"username": "alice", "password": "correct horse", "next": "/drive"})
    assert r.status == 303 and r.getheader("Location") == "/drive"
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:alert(1)"):
        r = Client(fe.port).post("/login", {"username": "alice", "password": "correct horse", "next": evil})
        assert r.status == 303 and r.getheader("Location") == "/home"
