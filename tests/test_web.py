"""The framework without sockets: router, templates, ranges, conditional GET,
sessions, throttling, CSRF rules."""

import hashlib

import pytest

from httpserver import templates
from httpserver.http11 import Headers
from httpserver.sessions import REFRESH_AFTER_S, Sessions
from httpserver.templates import Markup, escape, render
from src.throttle import FREE_FAILURES, LoginThrottle
from httpserver.web import (App, HTTPError, Request, Router, content_disposition, not_modified, parse_range,
                            range_applies, text)
from src.kv import MemoryKV


class Body:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, n=-1):
        if n < 0:
            n = len(self.data)
        out, self.data = self.data[:n], self.data[n:]
        return out


def req(method="GET", target="/", headers=(), body=b""):
    return Request(method, target, Headers([(k.lower(), v) for k, v in headers]), Body(body), "10.0.0.1")


def test_router_patterns_and_statuses():
    r = Router()
    r.route("GET", "/drive/folder/<folder_id>", login=False)(lambda q, folder_id: text(f"folder {folder_id}"))
    r.route("GET", "/files/<rest:path>", login=False)(lambda q, rest: text(rest))
    r.route("POST", "/drive/folder/<folder_id>", login=False, csrf=False)(lambda q, folder_id: text("post"))
    r.route("GET", "/", login=False)(lambda q: text("root"))
    route, params = r.match("GET", "/drive/folder/a%20b%2Fc")
    assert params == {"folder_id": "a b/c"}
    assert r.match("GET", "/files/x/y%3F.txt")[1] == {"rest": "x/y?.txt"}
    assert r.match("HEAD", "/")[0].method == "GET"
    with pytest.raises(HTTPError) as ei:
        r.match("GET", "/drive/folder/a/b")
    assert ei.value.status == 404
    with pytest.raises(HTTPError) as ei:
        r.match("DELETE", "/drive/folder/x")
    assert ei.value.status == 405 and ("Allow", "GET, HEAD, POST") in ei.value.headers
    for unknown in ("BREW", "get"):          # methods are case-sensitive: "get" is not GET
        with pytest.raises(HTTPError) as ei:
            r.match(unknown, "/drive/folder/x")
        assert ei.value.status == 501
    with pytest.raises(ValueError):
        r.route("GET", "/", login=False)(lambda q: text("twice"))


def test_templates_escape_everything_but_markup():
    evil = '<script>alert("x")</script>&'
    out = render("<p title='{t}'>{v}</p>{m}", t="'quoted'", v=evil, m=Markup("<b>ok</b>"))
    assert out == ("<p title='&#x27;quoted&#x27;'>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;</p>"
                   "<b>ok</b>")
    assert isinstance(out, Markup)
    assert escape(out) is out
    assert Markup("<br>").join(["<a>", Markup("<b>")]) == "&lt;a&gt;<br><b>"
    with pytest.raises(KeyError):
        render("{missing}")


def test_page_layout_shows_user_admin_nav_and_csrf():
    class S:
        csrf, admin, sid, user = "tok<en>", True, "s", "bob"
    q = req()
    q.user, q.session = "bob<i>", S()
    html = templates.page_html(q, "T<1>", Markup("<p>body</p>"), active="drive", css=["drive.css"])
    assert "T&lt;1&gt; · PennCloud" in html and "bob&lt;i&gt;" in html and "bob<i>" not in html
    assert 'name="csrf" value="tok&lt;en&gt;"' in html
    assert 'href="/admin"' in html and 'href="/static/drive.css"' in html
    assert '<a href="/drive" class="active"' in html
    assert 'name="viewport"' in html
    anon = templates.page_html(req(), "Welcome", Markup("x"))
    assert "/logout" not in anon and 'href="/admin"' not in anon


@pytest.mark.parametrize("header,size,want", [
    ("bytes=0-99", 1000, (0, 99)), ("bytes=900-", 1000, (900, 999)), ("bytes=-100", 1000, (900, 999)),
    ("bytes=990-2000", 1000, (990, 999)), ("bytes=-5000", 1000, (0, 999)), (None, 1000, None),
    ("items=0-1", 1000, None), ("bytes=0-1,5-6", 1000, None), ("bytes=5-1", 1000, None), ("bytes=x-", 10, None),
    # positions of thousands of digits (int() of 4300+ digits raises: that was a 500)
    ("bytes=0-" + "9" * 5000, 1000, (0, 999)), ("bytes=-" + "9" * 5000, 1000, (0, 999)),
    ("bytes=5-" + "0" * 5000 + "7", 1000, (5, 7)), ("bytes=" + "9" * 5000 + "-1", 1000, None),
])
def test_parse_range(header, size, want):
    assert parse_range(header, size) == want


@pytest.mark.parametrize("header,size", [("bytes=1000-", 1000), ("bytes=-0", 1000), ("bytes=0-", 0),
                                         ("bytes=" + "1" * 5000 + "-", 1000)])
def test_unsatisfiable_range_is_416(header, size):
    with pytest.raises(HTTPError) as ei:
        parse_range(header, size)
    assert ei.value.status == 416 and ("Content-Range", f"bytes */{size}") in ei.value.headers


def test_conditional_get_and_if_range():
    etag, mtime = '"abc"', 1_700_000_000.5
    assert not_modified(req(headers=[("If-None-Match", '"x", W/"abc"')]), etag, mtime)
    assert not not_modified(req(headers=[("If-None-Match", '"x"')]), etag, mtime)
    assert not_modified(req(headers=[("If-None-Match", "*")]), etag, mtime)
    assert not_modified(req(headers=[("If-Modified-Since", "Tue, 14 Nov 2023 22:13:20 GMT")]), etag, mtime)
    assert not not_modified(req(headers=[("If-Modified-Since", "Tue, 14 Nov 2023 22:13:19 GMT")]), etag, mtime)
    assert not not_modified(req("POST", headers=[("If-None-Match", "*")]), etag, mtime)
    assert range_applies(req(headers=[("If-Range", '"abc"')]), etag, mtime)
    assert not range_applies(req(headers=[("If-Range", '"old"')]), etag, mtime)
    assert range_applies(req(), etag, mtime)


def test_content_disposition_is_safe():
    v = content_disposition('a";\r\nb é.txt')
    assert "\r" not in v and "\n" not in v
    assert v.startswith('attachment; filename="a___') and "filename*=UTF-8''a%22%3B%0D%0Ab%20%C3%A9.txt" in v


def test_form_cap_and_query():
    q = req("POST", "/x?a=1&a=2&b=", [("Content-Type", "application/x-www-form-urlencoded")],
            b"name=%C3%A9+x&empty=")
    assert q.query == {"a": ["1", "2"], "b": [""]} and q.arg("a") == "1" and q.arg("zz", "d") == "d"
    assert q.form() == {"name": ["é x"], "empty": [""]}
    big = req("POST", "/", [("Content-Type", "application/x-www-form-urlencoded")], b"a=" + b"x" * (1 << 20))
    with pytest.raises(HTTPError) as ei:
        big.form()
    assert ei.value.status == 413


def test_cookies_parse():
    q = req(headers=[("Cookie", 'sid=abc; theme="dark"; =bad; x'), ("Cookie", "sid=second")])
    assert q.cookies == {"sid": "abc", "theme": "dark"}


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_sessions_sliding_expiry_and_refresh_writes():
    kv, clock = MemoryKV(), Clock()
    s = Sessions(kv, ttl_s=300, clock=clock)
    a = s.create("alice")
    row = "sess/" + hashlib.sha256(a.sid.encode()).hexdigest()
    raw = kv.get(row, "s")
    clock.t += REFRESH_AFTER_S / 2
    assert s.get(a.sid).user == "alice"
    assert kv.get(row, "s") == raw, "no write for a fresh session"
    for _ in range(10):                       # used every 4 minutes: stays alive past the TTL
        clock.t += 240
        assert s.get(a.sid) is not None
    clock.t += 301                            # idle longer than the TTL: gone
    assert s.get(a.sid) is None
    assert kv.cols("usess/alice") == []
    assert s.get("not-a-valid-id") is None and s.get(None) is None


def test_sessions_are_stored_under_a_hash_of_the_id():
    kv = MemoryKV()
    s = Sessions(kv)
    a = s.create("alice")
    key = hashlib.sha256(a.sid.encode()).hexdigest()
    assert kv.get(f"sess/{key}", "s").startswith(b"alice ")
    assert kv.cols("usess/alice") == [key.encode()]
    everything = [(r, c, v) for r, cols in kv._rows.items() for c, v in cols.items()]
    assert not [cell for cell in everything if any(a.sid.encode() in part for part in cell)]
    assert s.get(key[:22]) is None and s.get(a.sid).user == "alice"
    # A session stored the old way, under its raw id, is dropped at the next log-in.
    kv.put("usess/alice", "73z3yG0trW3km9RWbfnLGA", b"")
    kv.put("sess/73z3yG0trW3km9RWbfnLGA", "s", b"alice csrf 0 1 %.3f" % s.clock())
    b = s.create("alice")
    assert kv.cols("usess/alice") == sorted([key.encode(), b.key.encode()])
    assert kv.cols("sess/73z3yG0trW3km9RWbfnLGA") == []


def test_sessions_destroy_user_keeps_one():
    kv = MemoryKV()
    s = Sessions(kv)
    keep, other1, other2 = s.create("bob"), s.create("bob"), s.create("bob")
    carol = s.create("carol")
    assert s.destroy_user("bob", keep=keep.sid) == 2
    assert s.get(keep.sid) and not s.get(other1.sid) and not s.get(other2.sid) and s.get(carol.sid)
    s.destroy(keep.sid)
    assert s.get(keep.sid) is None


def test_refresh_cannot_revive_a_logged_out_session():
    kv, clock = MemoryKV(), Clock()
    s = Sessions(kv, ttl_s=300, clock=clock)
    a = s.create("alice")
    clock.t += REFRESH_AFTER_S + 1
    real_get = kv.get

    def get_then_logout(row, col):  # a logout on another frontend lands between read and refresh
        v = real_get(row, col)
        s.destroy(a.sid, "alice")
        return v
    kv.get = get_then_logout
    assert s.get(a.sid) is None
    kv.get = real_get
    assert s.get(a.sid) is None


def test_throttle_rule():
    """The rule of src/throttle.py, through attempt(), the servers' one entry."""
    from src.throttle import Throttled
    clock = Clock()
    t = LoginThrottle(clock)
    wrong, right = (lambda: None), (lambda: "eve")

    def guess(user, addr):
        """0 if the guess was checked (and was wrong), else how long it was refused for."""
        try:
            assert t.attempt(user, addr, wrong) is None
            return 0.0
        except Throttled as e:
            return e.wait_s
    for i in range(FREE_FAILURES):
        assert guess("Eve" if i % 2 else "eve", "1.2.3.4") == 0
    assert guess("eve", "1.2.3.4") == 0          # 5 failures are free; the 6th is checked, and locks
    assert guess(" EVE", "9.9.9.9") == pytest.approx(1.0)  # the account, from any address, however typed
    assert str(Throttled(1.0)).endswith("try again in 1 second") and str(Throttled(1.5)).endswith("2 seconds")
    clock.t += 1.01
    assert guess("eve", "9.9.9.9") == 0
    assert guess("eve", "5.5.5.5") == pytest.approx(2.0)   # doubling
    clock.t += 2.01
    assert t.attempt("eve", "5.5.5.5", right) == "eve"     # a success clears the account
    assert guess("eve", "5.5.5.5") == 0
    t = LoginThrottle(clock)
    for i in range(25):                           # one address guessing many accounts
        guess(f"user{i}", "6.6.6.6")
    with pytest.raises(Throttled):
        t.attempt("someone-new", "6.6.6.6", right)
    clock.t += 16 * 60                            # forgotten after the window
    assert t.attempt("someone-new", "6.6.6.6", right) == "eve"


def _csrf_app():
    sessions = Sessions(MemoryKV())
    r = Router()
    seen = []

    @r.route("POST", "/do")
    def do(q):
        seen.append([(p.name, p.read()) for p in q.multipart()] if q.content_type == "multipart/form-data"
                    else q.form())
        return text("done")
    return App(r, sessions), sessions, seen


def test_csrf_rules_in_the_dispatcher():
    app, sessions, seen = _csrf_app()
    s = sessions.create("u")
    cookie = ("Cookie", f"sid={s.sid}")
    form = ("Content-Type", "application/x-www-form-urlencoded")
    assert app(req("POST", "/do", [cookie, form], f"csrf={s.csrf}&a=1".encode())).status == 200
    assert app(req("POST", "/do", [cookie, form], b"csrf=forged&a=1")).status == 403
    assert app(req("POST", "/do", [cookie, form], b"a=1")).status == 403
    assert app(req("POST", "/do", [cookie, ("X-CSRF-Token", s.csrf)])).status == 200
    assert app(req("POST", "/do", [form], f"csrf={s.csrf}".encode())).status == 401   # no session
    mp = ("Content-Type", "multipart/form-data; boundary=XX")

    def multipart(*fields):
        return b"".join(b'--XX\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % f for f in fields) \
            + b"--XX--\r\n"
    ok = app(req("POST", "/do", [cookie, mp], multipart((b"csrf", s.csrf.encode()), (b"f", b"data"))))
    assert ok.status == 200 and seen[-1] == [("f", b"data")]
    n = len(seen)
    late = app(req("POST", "/do", [cookie, mp], multipart((b"f", b"data"), (b"csrf", s.csrf.encode()))))
    assert late.status == 403 and len(seen) == n, "the token must be the first part"


def test_a_log_in_reads_a_bounded_number_of_old_sessions_and_expired_ones_still_go():
    """A user who never logs out (a script, a grader with curl) piles up
    sessions for the TTL; each log-in used to read every one of them."""
    from httpserver.sessions import PRUNE_PER_LOGIN

    class CountingKV(MemoryKV):
        gets = 0

        def get(self, row, col):
            CountingKV.gets += 1
            return super().get(row, col)
    kv, clock = CountingKV(), Clock()
    s = Sessions(kv, ttl_s=300, clock=clock)
    for _ in range(200):
        s.create("grader")
    CountingKV.gets = 0
    s.create("grader")
    assert CountingKV.gets <= PRUNE_PER_LOGIN
    clock.t += 301                      # all 201 expire; the next log-ins clear them
    for _ in range(200):
        s.create("grader")
    assert len(kv.cols("usess/grader")) < 260     # 200 live ones and few, if any, of the 201 expired


def test_the_session_sweep_ends_expired_sessions_nobody_presents_again():
    """Sessions of people who closed the browser and never came back stayed
    in the store for ever: nothing but their own user's next log-in looked
    at them. The sweep walks every tablet's sess/ rows."""
    from tests.test_mailsweep import memory_lister
    kv, clock = MemoryKV(), Clock()
    s = Sessions(kv, ttl_s=300, clock=clock)
    gone = [s.create(f"user{i}") for i in range(6)]
    clock.t += 200
    alive = s.create("alice")
    kv.put("drive/u/alice", "root", b"x")                  # other rows are none of its business
    clock.t += 150                                          # the six expired, alice's has 150 s left
    assert s.sweep(memory_lister(kv)) == 6
    assert [r for r in kv._rows if r.startswith(b"sess/")] == [f"sess/{alive.key}".encode()]
    assert all(kv.cols(f"usess/user{i}") == [] for i in range(6))
    assert s.get(alive.sid).user == "alice" and kv.cols("drive/u/alice") == [b"root"]
    assert all(s.get(g.sid) is None for g in gone)


def test_guesses_sent_at_the_same_moment_are_counted_before_they_are_checked():
    """Review: the throttle checked the lock, then the password, and counted
    the failure after: 200 guesses sent at once were all checked. And a class
    behind one address logs in all day (a success takes its count back)."""
    import threading
    import time
    from src.throttle import FREE_FAILURES, FREE_FAILURES_ADDR, Throttled
    t = LoginThrottle()
    checked = []

    def verify():
        checked.append(1)
        time.sleep(0.05)              # a password check takes a while
        return None

    def guess():
        try:
            t.attempt("alice", "10.0.0.9", verify)
        except Throttled:
            pass
    threads = [threading.Thread(target=guess) for _ in range(50)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert len(checked) <= FREE_FAILURES + 1
    for i in range(3 * FREE_FAILURES_ADDR):          # many students, one address, right passwords
        assert t.attempt(f"student{i}", "10.0.0.1", lambda: "ok") == "ok"
