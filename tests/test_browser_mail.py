"""Webmail in a real browser (headless Chromium through Playwright): compose
with an attachment, send to another user, read it there, reply, forward,
delete. Screenshots go to docs/screenshots/mail-*.png."""

from __future__ import annotations

import re

import pytest

from src.config import parse_config
from src.kv import MemoryKV
from tests.browser import launch_browser, screenshot

pytestmark = pytest.mark.browser


@pytest.fixture
def site(tmp_path):
    from httpserver.frontend import Frontend
    cfg = parse_config({"frontend": [{"id": "fe1", "host": "127.0.0.1", "port": 0}]}, data_dir=str(tmp_path))
    kv = MemoryKV()
    fe = Frontend(cfg, cfg.node("fe1"), kv, port=0)
    fe.start()
    try:
        yield f"http://127.0.0.1:{fe.port}", kv
    finally:
        fe.stop()


def login_as(browser, base, name):
    """A fresh browser context signed up (through the fixed /signup route) as `name`."""
    ctx = browser.new_context(base_url=base, viewport={"width": 1200, "height": 800})
    r = ctx.request.post("/signup", form={"username": name, "password": "correct horse"}, max_redirects=0)
    assert r.status == 303, r.text()
    page = ctx.new_page()
    page.set_default_timeout(10_000)
    return page


def shot(page, name):
    screenshot(page, name.removesuffix(".png"))


def test_compose_send_read_reply_forward_delete(site, tmp_path):
    site, _ = site
    attachment = tmp_path / "notes.txt"
    attachment.write_bytes(b"Meeting notes\nline two\n")
    with launch_browser() as browser:
        alice = login_as(browser, site, "alice")
        bob = login_as(browser, site, "bob")
        carol = login_as(browser, site, "carol")

        # Alice writes to Bob, with a file from her computer.
        alice.goto("/mail")
        alice.get_by_role("link", name=re.compile("Compose")).click()
        alice.wait_for_url(re.compile(r"/mail/compose"))
        # A wrong address first: the form comes back with the error and what was typed.
        alice.fill("input[name=to]", "bob@@nowhere")
        alice.fill("input[name=subject]", "Lunch on Friday? — café")
        alice.set_input_files("input[name=attachment]", str(attachment))
        # With files attached, mail.js posts the form by XMLHttpRequest (for its progress bar).
        with alice.expect_request(lambda r: r.url.endswith("/mail/send") and r.resource_type == "xhr"):
            alice.get_by_role("button", name="Send").click()
        alice.get_by_text("is not a valid e-mail address").wait_for()
        assert alice.input_value("input[name=subject]") == "Lunch on Friday? — café"
        alice.fill("input[name=to]", "bob")
        alice.fill("textarea[name=body]", "Hi Bob,\n\nlunch at noon on Friday?\nNotes attached.\n\nAlice")
        alice.set_input_files("input[name=attachment]", str(attachment))
        shot(alice, "mail-compose.png")
        alice.get_by_role("button", name="Send").click()
        alice.wait_for_url(re.compile(r"/mail/sent"))
        assert "Your message was sent" in alice.content()
        assert alice.get_by_text("Lunch on Friday? — café").count() == 1

        # Bob sees it unread in his inbox and reads it.
        bob.goto("/mail")
        row = bob.locator("tr.unread")
        assert row.count() == 1 and "Lunch on Friday" in row.inner_text()
        shot(bob, "mail-inbox.png")
        bob.set_viewport_size({"width": 420, "height": 800})
        shot(bob, "mail-phone.png")
        bob.set_viewport_size({"width": 1200, "height": 800})
        bob.get_by_role("link", name=re.compile("Lunch on Friday")).first.click()
        bob.wait_for_url(re.compile(r"/mail/inbox/[0-9a-f]+$"))
        assert "lunch at noon on Friday?" in bob.locator(".mail-body").inner_text()
        assert bob.get_by_role("link", name="notes.txt").count() == 1
        shot(bob, "mail-view.png")
        with bob.expect_download() as dl:
            bob.get_by_role("link", name="notes.txt").click()
        assert open(dl.value.path(), "rb").read() == attachment.read_bytes()
        assert dl.value.suggested_filename == "notes.txt"

        # He replies; the form is pre-filled with the quoted original.
        bob.get_by_role("link", name=re.compile("^↩ Reply$")).click()
        bob.wait_for_url(re.compile(r"/mail/compose\?reply="))
        assert bob.input_value("input[name=to]") == "alice@penncloud.local"
        assert bob.input_value("input[name=subject]") == "Re: Lunch on Friday? — café"
        quoted = bob.input_value("textarea[name=body]")
        assert "> lunch at noon on Friday?" in quoted
        bob.fill("textarea[name=body]", "Sounds good!\n" + quoted)
        bob.get_by_role("button", name="Send").click()
        bob.wait_for_url(re.compile(r"/mail/sent"))

        # Alice reads the reply and forwards it to Carol.
        alice.goto("/mail")
        alice.get_by_role("link", name=re.compile("Re: Lunch on Friday")).first.click()
        assert "Sounds good!" in alice.locator(".mail-body").inner_text()
        alice.get_by_role("link", name=re.compile("Forward")).click()
        alice.wait_for_url(re.compile(r"/mail/compose\?forward="))
        assert alice.input_value("input[name=subject]") == "Fwd: Re: Lunch on Friday? — café"
        alice.fill("input[name=to]", "carol@penncloud.local")
        alice.get_by_role("button", name="Send").click()
        alice.wait_for_url(re.compile(r"/mail/sent"))
        shot(alice, "mail-sent.png")

        # Carol gets the forward, with the forwarded text, and deletes it.
        carol.goto("/mail")
        carol.get_by_role("link", name=re.compile("Fwd: Re: Lunch")).first.click()
        body = carol.locator(".mail-body").inner_text()
        assert "Forwarded message" in body and "Sounds good!" in body
        carol.once("dialog", lambda d: d.accept())          # "Delete this message?"
        carol.get_by_role("button", name="Delete").click()
        carol.wait_for_url(re.compile(r"/mail\?deleted=1$"))
        assert "Your inbox is empty" in carol.content()


HOSTILE = (b"From: Newsletter <news@example.com>\r\nTo: bob@penncloud.local\r\n"
           b"Subject: Your weekly digest\r\nDate: Sun, 22 Nov 2026 09:00:00 +0000\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<h2>This week</h2><p>Three <b>new</b> things, and a <a href='https://example.com/read'>link</a>."
           b"</p><ul><li>One</li><li>Two</li></ul><blockquote>A quoted line</blockquote>"
           b"<img src='http://127.0.0.2:9/pixel.gif' onerror='alert(1)'>"
           b"<script>alert(2)</script><svg onload='alert(3)'></svg>"
           b"<a href='javascript:alert(4)'>bad link</a>"
           b"<div style='background:url(http://127.0.0.2:9/bg.png)'>styled</div>"
           b"<iframe src='http://127.0.0.2:9/frame'></iframe><link rel=stylesheet href='http://127.0.0.2:9/x.css'>"
           b"</div></main><p>after the breakout attempt</p>\r\n")


def test_hostile_html_mail_runs_nothing_and_loads_nothing(site):
    from src.mailstore import MailStore
    base, kv = site
    with launch_browser() as browser:
        bob = login_as(browser, base, "bob")
        mid = MailStore(kv).deliver("bob", "Inbox", HOSTILE)
        dialogs, foreign = [], []
        bob.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        bob.on("request", lambda r: None if r.url.startswith(base) else foreign.append(r.url))
        bob.goto(f"/mail/inbox/{mid}")
        bob.wait_for_load_state("networkidle")
        body = bob.locator(".mail-body")
        assert "Three new things" in body.inner_text()
        assert "after the breakout attempt" in body.inner_text()  # still inside the message box
        assert bob.locator(".mail-body script, .mail-body img, .mail-body iframe, .mail-body svg").count() == 0
        assert bob.locator(".mail-body a[href^=javascript]").count() == 0
        shot(bob, "mail-html.png")
        bob.get_by_text("bad link").click()  # an <a> with its href removed: goes nowhere
        bob.wait_for_timeout(200)
        assert dialogs == [] and foreign == []


@pytest.mark.parametrize("javascript", [True, False])
def test_a_file_too_large_for_mail_keeps_the_draft(tmp_path, javascript):
    """With the page's script a file over the mail limit is refused as soon as
    it is chosen, before any upload; without it the server answers with the
    form again. Either way what was typed stays."""
    from httpserver.frontend import Frontend
    cfg = parse_config({"mail": {"max_message_bytes": "64KiB"},
                        "frontend": [{"id": "fe1", "host": "127.0.0.1", "port": 0}]}, data_dir=str(tmp_path))
    fe = Frontend(cfg, cfg.node("fe1"), MemoryKV(), port=0)
    fe.start()
    try:
        with launch_browser() as browser:
            login_as(browser, f"http://127.0.0.1:{fe.port}", "bob").close()
            ctx = browser.new_context(base_url=f"http://127.0.0.1:{fe.port}", java_script_enabled=javascript)
            assert ctx.request.post("/signup", form={"username": "alice", "password": "correct horse"},
                                    max_redirects=0).status == 303
            page = ctx.new_page()
            page.set_default_timeout(10_000)
            posts = []
            page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
            page.goto("/mail/compose")
            page.fill("input[name=to]", "bob")
            page.fill("input[name=subject]", "keep me")
            page.fill("textarea[name=body]", "a long text\nI do not want to type again")
            big = {"name": "b30.bin", "mimeType": "application/octet-stream", "buffer": b"x" * 100_000}
            page.set_input_files("input[name=attachment]", big)
            if javascript:
                alert = page.locator(".mail-too-large")
                alert.wait_for()
                assert "97.7 KiB, over the 64 KiB mail limit" in alert.inner_text()
                page.get_by_role("button", name="Send").click()
                assert posts == [] and page.url.endswith("/mail/compose")
                # Under the limit as it is, over it once encoded for mail.
                page.set_input_files("input[name=attachment]", {**big, "buffer": b"x" * 50_000})
                assert "once attached" in alert.inner_text()
                page.set_input_files("input[name=attachment]", {**big, "buffer": b"x" * 1000})
                alert.wait_for(state="hidden")
                # A ticked drive file counts too (UX QA: it was refused only after Send).
                fe.ctx.drive.upload("alice", fe.ctx.drive.root("alice"), "notes.bin", b"y" * 40_000)
                page.goto("/mail/compose")
                page.fill("input[name=to]", "bob")
                page.set_input_files("input[name=attachment]", {**big, "buffer": b"x" * 20_000})
                page.locator("details.mail-attach summary").click()
                page.locator("input[name=drive_file]").check()
                alert.wait_for()
                assert "once attached" in alert.inner_text()
                page.locator("input[name=drive_file]").uncheck()
                alert.wait_for(state="hidden")
                page.get_by_role("button", name="Send").click()
                page.wait_for_url("**/mail/sent**")
            else:
                page.get_by_role("button", name="Send").click()
                page.get_by_text("is larger than the 64 KiB mail limit").wait_for()
                assert page.input_value("input[name=to]") == "bob"
                assert page.input_value("input[name=subject]") == "keep me"
                assert page.input_value("textarea[name=body]") == "a long text\nI do not want to type again"
    finally:
        fe.stop()


def test_a_send_whose_answer_was_lost_is_sent_again_and_stored_once(site):
    """The frontend stores the message and dies before it answers: the load
    balancer says 502. The page's script sends the same form again (its
    send_key unchanged) and the server stores no second copy."""
    from src.mailstore import MailStore
    base, kv = site
    with launch_browser() as browser:
        login_as(browser, base, "bob").close()
        alice = login_as(browser, base, "alice")
        posts = []

        def lose_the_first_answer(route):
            posts.append(route.request.url)
            if len(posts) == 1:
                route.fetch()                      # the server did the work ...
                route.fulfill(status=502, body="Bad Gateway")   # ... its answer never came
            else:
                route.continue_()
        alice.route("**/mail/send", lose_the_first_answer)
        alice.goto("/mail/compose")
        alice.fill("input[name=to]", "bob")
        alice.fill("input[name=subject]", "only once")
        alice.fill("textarea[name=body]", "hello")
        alice.get_by_role("button", name="Send").click()
        alice.wait_for_url("**/mail/sent**")
        assert len(posts) == 2
    store = MailStore(kv)
    assert [m.subject for m in store.list("bob", "Inbox")] == ["only once"]
    assert [m.subject for m in store.list("alice", "Sent")] == ["only once"]


def test_the_date_column_shows_whole_dates_of_earlier_years(site):
    """QA4 F11: "17 Dec 2025" did not fit the column and read "17 Dec 2…"
    (the year, the only thing that format adds, was the part cut off)."""
    from src.mailstore import MailStore
    base, kv = site
    with launch_browser() as browser:
        bob = login_as(browser, base, "bob")
        for date in ("Thu, 17 Dec 2020 10:00:00 +0000", "Sat, 05 Sep 2020 10:00:00 +0000",
                     "Wed, 28 Apr 2021 23:59:00 +0000"):
            MailStore(kv).deliver("bob", "Inbox", f"From: Wide Sender <w@example.org>\r\nTo: bob@penncloud.local\r\n"
                                  f"Date: {date}\r\nSubject: old mail\r\n\r\nold\r\n".encode())
        MailStore(kv).mark_read("bob", "Inbox", MailStore(kv).list("bob", "Inbox")[0].id)  # bold and not
        bob.goto("/mail")
        cells = bob.locator("tbody td.mail-col-date")
        assert cells.count() == 3
        for i in range(3):
            text, fits = cells.nth(i).evaluate("td => [td.textContent, td.scrollWidth <= td.clientWidth]")
            assert re.fullmatch(r"\d{1,2} \w{3} 20\d\d", text) and fits, text


def test_log_out_works_from_a_message_page_and_back_shows_nothing_cached(site):
    """Security QA: the message page kept referrers from leaving the site
    with `no-referrer`, so the browser sent `Origin: null` with the Log out
    form and the log-out was refused (403): the user stayed logged in. And
    after logging out, Back showed the inbox from the browser's cache."""
    from src.mailstore import MailStore
    base, kv = site
    with launch_browser() as browser:
        bob = login_as(browser, base, "bob")
        mid = MailStore(kv).deliver("bob", "Inbox", b"From: a@example.org\r\nSubject: private\r\n\r\nsecret text\r\n")
        bob.goto(f"/mail/inbox/{mid}")
        assert "secret text" in bob.locator(".mail-body").inner_text()
        bob.get_by_role("button", name="Log out").click()
        bob.wait_for_load_state()
        assert bob.url.rstrip("/") == base and bob.locator("input[name=password]").count() > 0
        assert bob.context.request.get("/mail", max_redirects=0).status == 303      # the session is gone
        bob.go_back()
        bob.wait_for_load_state()
        assert "secret text" not in bob.content()


def test_a_send_refused_by_the_server_shows_its_message_at_the_top(site):
    """UX QA: with the page's script, the server's answer (the form with its
    error) was written in at the old scroll position, near the Send button;
    the red message at the top was out of view and Send looked dead."""
    base, kv = site
    with launch_browser() as browser:
        alice = login_as(browser, base, "alice")
        alice.set_viewport_size({"width": 1200, "height": 500})
        alice.goto("/mail/compose")
        alice.fill("input[name=to]", "nobody-here")
        alice.fill("textarea[name=body]", "line\n" * 80)
        alice.get_by_role("button", name="Send").scroll_into_view_if_needed()
        alice.get_by_role("button", name="Send").click()
        message = alice.get_by_text("There is no user")
        message.wait_for()
        assert alice.evaluate("window.scrollY") == 0 and message.is_visible()
        box = message.bounding_box()
        assert box is not None and box["y"] < 500


def test_the_inbox_unread_count_is_shown_on_message_pages_too(site):
    """UX QA: the sidebar's unread badge vanished on every message page."""
    from src.mailstore import MailStore
    base, kv = site
    store = MailStore(kv)
    ids = [store.deliver("bob", "Inbox", b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3)]
    with launch_browser() as browser:
        bob = login_as(browser, base, "bob")
        bob.goto(f"/mail/inbox/{ids[0]}")
        assert bob.locator(".mail-count").inner_text() == "2"


def test_deleting_a_message_asks_first(site):
    """UX QA: Delete on a message page was immediate and final (mail has no
    Trash); the drive asks first. With the page's script it asks too."""
    from src.mailstore import MailStore
    base, kv = site
    store = MailStore(kv)
    mid = store.deliver("bob", "Inbox", b"Subject: keep\r\n\r\nx\r\n")
    with launch_browser() as browser:
        bob = login_as(browser, base, "bob")
        bob.goto(f"/mail/inbox/{mid}")
        asked = []
        bob.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))
        bob.get_by_role("button", name="Delete").click()
        bob.wait_for_timeout(300)
        assert asked and "cannot be undone" in asked[0]
        assert store.has_message("bob", "Inbox", mid)         # dismissed: still there
        bob.once("dialog", lambda d: d.accept())
        bob.get_by_role("button", name="Delete").click()
        bob.wait_for_url("**/mail?deleted=1")
        assert not store.has_message("bob", "Inbox", mid)
