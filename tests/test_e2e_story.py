"""The whole story a user lives, end to end, in headless Chromium through the
load balancer, on a real cluster started by `./run_all.sh` from a temp config:

1. alice and bob sign up on the real pages;
2. alice uploads a file of random bytes (several drive chunks) on the drive page;
3. alice mails bob from webmail, bob reads it and replies, alice reads the reply;
4. alice fills in one more message; meanwhile SIGKILL the frontend that served
   that form (the LB names it in the `pcfe` cookie and the
   X-PennCloud-Frontend header) and the primary tablet servers of the tablets
   holding her session row and her account row (the master's LOOKUP);
5. without logging in again, in the same browser: Send works (another frontend
   takes the form), /home still knows alice, the file downloads
   byte-identical, all messages are there; bob logs in on a fresh browser and
   reads; POP3 hands bob the very bytes webmail stored; the admin console
   shows the dead processes.

Screenshots: docs/screenshots/story-*.png.
"""

from __future__ import annotations

import os
import poplib
import re
import signal
import time
from dataclasses import dataclass

import pytest

from httpserver.sessions import session_key
from src.config import Config, load_config
from src.kvclient import ServerClient
from tests.browser import launch_browser, screenshot
from tests.harness import free_port
from tests.test_run_all import run_all, status

pytestmark = [pytest.mark.browser, pytest.mark.slow]

KV_SERVERS = 5
FRONTENDS = 3
TABLETS = 8
CHUNK = 64 * 1024
SUBJECT = "Plans for the weekend"
BODY = "Hi Bob,\n\nshall we climb on Saturday? I put the route map in my drive.\n\nAlice"
REPLY = "Saturday works. I bring the rope.\n\nBob"
ADMIN_PASSWORD = "story admin password"
PASSWORD = {"alice": "alice's long password", "bob": "bob's long password", "admin": ADMIN_PASSWORD}
FOLLOW_UP = "Snacks for Saturday"
TIMEOUT_MS = 20_000  # one page, on a loaded 2-core machine, possibly across a failover


def write_config(tmp_path) -> str:
    kvs = "".join(f'[[kvserver]]\nid = "kv{i}"\nport = {free_port()}\n' for i in range(1, KV_SERVERS + 1))
    fes = "".join(f'[[frontend]]\nid = "fe{i}"\nport = {free_port()}\n' for i in range(1, FRONTENDS + 1))
    path = tmp_path / "story.toml"
    path.write_text(f"""data_dir = "{tmp_path / 'data'}"
[cluster]
tablets = {TABLETS}
replication = 3
[storage]
memory_budget = "32MiB"
[master]
port = {free_port()}
{kvs}{fes}
[lb]
port = {free_port()}
[mail.smtp]
port = {free_port()}
[mail.pop3]
port = {free_port()}
[http]
admin_password = "{ADMIN_PASSWORD}"
[drive]
chunk_bytes = "{CHUNK}"
""")
    return str(path)


def new_page(browser, base):
    ctx = browser.new_context(base_url=base, viewport={"width": 1200, "height": 800}, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return page


def sign_up(page, base, user):
    page.goto("/")
    form = page.locator("#signup")
    form.get_by_label("Username").fill(user)
    form.get_by_label("Password").fill(PASSWORD[user])
    form.get_by_role("button", name="Sign up").click()
    page.wait_for_url(base + "/home")
    assert page.locator("h1").inner_text() == f"Hello, {user}"


def log_in(page, base, user):
    page.goto("/")
    form = page.locator("#login")
    form.get_by_label("Username").fill(user)
    form.get_by_label("Password").fill(PASSWORD[user])
    form.get_by_role("button", name="Log in").click()
    page.wait_for_url(base + "/home")


def drive_row(page, name):
    return page.locator("table.items tr", has=page.locator("a.item span", has_text=name))


def download(page, name) -> bytes:
    with page.expect_download() as dl:
        drive_row(page, name).locator("a.item").click()
    with open(dl.value.path(), "rb") as f:
        return f.read()


def open_message(page, subject) -> str:
    """Open the first message whose link matches `subject`; return its id."""
    page.get_by_role("link", name=re.compile(re.escape(subject))).first.click()
    page.wait_for_url(re.compile(r"/mail/(inbox|sent)/[0-9a-f]+$"))
    return page.url.rsplit("/", 1)[1]


def frontend_of(response) -> str:
    return response.headers["x-penncloud-frontend"]


def cookie(page, name) -> str:
    return next(c["value"] for c in page.context.cookies() if c["name"] == name)


@dataclass
class RunningCluster:
    config: str
    cfg: Config
    pids: dict[str, int]  # process name -> pid, from `run_all.sh status`
    start_s: float        # how long `run_all.sh start` took

    @property
    def url(self) -> str:
        return f"http://{self.cfg.lb.node.addr}"

    def lookup(self, row: bytes):
        master = ServerClient(self.cfg.master.addr, timeout=5.0)
        try:
            return master.lookup(row)
        finally:
            master.close()


@pytest.fixture
def browser():
    with launch_browser() as b:  # skips before any cluster starts if Chromium is missing
        yield b


@pytest.fixture
def cluster(tmp_path):
    """The whole of PennCloud started as a user would, stopped at the end, pass or fail."""
    config = write_config(tmp_path)
    t0 = time.monotonic()
    try:
        r = run_all("start", "--config", config)
        assert r.returncode == 0, r.stdout + r.stderr
        pids = {name: int(f[1]) for name, f in status(config).items() if f[3] == "up"}
        assert len(pids) == 1 + KV_SERVERS + FRONTENDS + 4, pids  # + lb, smtp, pop3, relay
        yield RunningCluster(config, load_config(config), pids, time.monotonic() - t0)
    finally:
        run_all("stop", "--config", config)


def test_the_whole_story_survives_a_frontend_and_a_primary_dying(browser, cluster, tmp_path):
    t0 = time.monotonic()
    cfg, base = cluster.cfg, cluster.url
    kv_by_addr = {n.addr: n.id for n in cfg.kvservers}
    upload = tmp_path / "route-map.bin"
    data = os.urandom(5 * CHUNK + 4321)  # six chunks
    upload.write_bytes(data)
    alice, bob = new_page(browser, base), new_page(browser, base)

    # 1. Two people sign up on the real pages.
    sign_up(alice, base, "alice")
    screenshot(alice, "story-1-alice-home")
    sign_up(bob, base, "bob")

    # 2. Alice uploads a file through the drive page (XHR with a progress bar).
    alice.goto("/drive")
    alice.set_input_files("#file-input", str(upload))
    alice.wait_for_function("document.body.dataset.uploadsDone !== undefined")
    assert alice.evaluate("document.body.dataset.uploadsDone") == "1 file uploaded"
    alice.wait_for_selector("table.items a.item span:text-is('route-map.bin')")
    screenshot(alice, "story-2-alice-drive")

    # 3. Alice writes to bob; he reads it and replies; she reads the reply.
    alice.goto("/mail/compose")
    alice.fill("input[name=to]", "bob")
    alice.fill("input[name=subject]", SUBJECT)
    alice.fill("textarea[name=body]", BODY)
    alice.get_by_role("button", name="Send").click()
    alice.wait_for_url(re.compile(r"/mail/sent"))

    bob.goto("/mail")
    assert bob.locator("tr.unread").count() == 1
    bob_msg = open_message(bob, SUBJECT)
    assert "shall we climb on Saturday?" in bob.locator(".mail-body").inner_text()
    screenshot(bob, "story-3-bob-reads")
    bob.get_by_role("link", name=re.compile("^↩ Reply$")).click()
    bob.wait_for_url(re.compile(r"/mail/compose\?reply="))
    assert bob.input_value("input[name=to]") == "alice@penncloud.local"
    bob.fill("textarea[name=body]", REPLY + "\n\n" + bob.input_value("textarea[name=body]"))
    bob.get_by_role("button", name="Send").click()
    bob.wait_for_url(re.compile(r"/mail/sent"))

    alice.goto("/mail")
    open_message(alice, "Re: " + SUBJECT)
    assert "I bring the rope." in alice.locator(".mail-body").inner_text()
    screenshot(alice, "story-4-alice-reads-reply")

    # 4. Alice writes one more message. While the form is open, the frontend that
    #    served it dies, and so do the primaries of her session and account tablets.
    resp = alice.goto("/mail/compose")
    fe = frontend_of(resp)
    assert fe == cookie(alice, "pcfe")
    alice.fill("input[name=to]", "bob@penncloud.local")
    alice.fill("input[name=subject]", FOLLOW_UP)
    alice.fill("textarea[name=body]", "I'll bring the snacks.")
    rows = {"session": b"sess/" + session_key(cookie(alice, "sid")).encode(), "account": b"acct/alice"}
    before = {what: cluster.lookup(row) for what, row in rows.items()}
    victims = {kv_by_addr[e.primary] for e in before.values()}  # one or two tablet servers
    for name in [fe, *sorted(victims)]:
        os.kill(cluster.pids[name], signal.SIGKILL)
    killed_at = time.monotonic()

    # 5. Same browser, no new log-in. She presses Send on the page the dead frontend
    #    served: another frontend takes the POST, her session and its CSRF token.
    alice.get_by_role("button", name="Send").click()
    alice.wait_for_url(re.compile(r"/mail/sent"))
    assert "Your message was sent" in alice.content()
    send_s = time.monotonic() - killed_at
    resp = alice.goto("/home")
    assert resp.status == 200 and alice.url == base + "/home", "the session survived"
    assert alice.locator("h1").inner_text() == "Hello, alice"
    assert frontend_of(resp) != fe

    alice.goto("/drive")
    assert download(alice, "route-map.bin") == data, "the file changed"

    alice.goto("/mail")
    screenshot(alice, "story-5-alice-inbox-after-kills")
    open_message(alice, "Re: " + SUBJECT)
    assert "I bring the rope." in alice.locator(".mail-body").inner_text()
    alice.goto("/mail/sent")
    open_message(alice, SUBJECT)
    assert "shall we climb on Saturday?" in alice.locator(".mail-body").inner_text()

    # Bob logs in again, on another device, and reads alice's message.
    bob2 = new_page(browser, base)
    log_in(bob2, base, "bob")
    bob2.goto("/mail")
    assert bob2.get_by_role("link", name=re.compile(FOLLOW_UP)).count() == 1
    screenshot(bob2, "story-6-bob-inbox-after-kills")
    assert open_message(bob2, SUBJECT) == bob_msg
    assert "shall we climb on Saturday?" in bob2.locator(".mail-body").inner_text()
    source = bob2.context.request.get(f"/mail/inbox/{bob_msg}/source")
    assert source.status == 200
    stored = source.body()

    # The admin console shows what died (it polls every 2 s).
    admin = new_page(browser, base)
    log_in(admin, base, "admin")
    admin.goto("/admin")
    for name in [fe, *sorted(victims)]:
        process = admin.locator("table.adm-table tr", has=admin.locator("strong", has_text=name))
        process.locator(".adm-state.bad").wait_for()
    screenshot(admin, "story-7-admin-after-kills")

    # The same message over POP3: the very bytes webmail shows as the original.
    pop = poplib.POP3(cfg.mail.pop3.host, cfg.mail.pop3.port, timeout=20)
    try:
        pop.user("bob")
        pop.pass_(PASSWORD["bob"])
        uids = {uid: int(n) for n, uid in (line.decode().split() for line in pop.uidl()[1])}
        assert len(uids) == 2 and list(uids)[0] == bob_msg, uids
        lines = pop.retr(uids[bob_msg])[1]
        pop.quit()
    finally:
        pop.close()
    got = b"\r\n".join(lines) + b"\r\n"
    assert got == stored
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"Subject: " + SUBJECT.encode() in head
    assert body.decode() == BODY.replace("\n", "\r\n") + "\r\n"

    # The kills did matter: the master moved those tablets to new primaries.
    for what, row in rows.items():
        after = cluster.lookup(row)
        assert after.primary not in (None, before[what].primary), (what, before[what], after)
    print(f"cluster up in {cluster.start_s:.1f}s; Send answered {send_s:.1f}s after the kills; "
          f"killed {fe} and {sorted(victims)}; total {time.monotonic() - t0:.1f}s")
