"""SMTP and POP3 servers over real sockets, driven by real clients: smtplib, poplib, curl, swaks.

The servers run in-process over MemoryKV (their construction functions take
any KV); process-level crash tests are in test_smtp_crash.py.
"""

import base64
import email
import poplib
import shutil
import smtplib
import socket
import subprocess

import pytest

from smtp.pop3_server import make_pop3_server
from smtp.smtp_server import make_smtp_server
from src.accounts import Accounts
from src.config import parse_config
from src.kv import MemoryKV
from src.mailstore import MailStore

PW = {"alice": "alice password", "bob": "bob password"}
DOMAIN = "penncloud.local"


@pytest.fixture
def mail(tmp_path):
    cfg = parse_config({"mail": {"max_message_bytes": "4MiB"}, "drive": {"chunk_bytes": "256KiB"}},
                       data_dir=str(tmp_path))
    kv = MemoryKV()
    accounts = Accounts(kv)
    for u, p in PW.items():
        accounts.create(u, p)
    smtp = make_smtp_server(cfg, kv, host="127.0.0.1", port=0).start()
    pop = make_pop3_server(cfg, kv, host="127.0.0.1", port=0).start()

    class M:
        pass
    m = M()
    m.cfg, m.kv, m.store, m.smtp_port, m.pop_port = cfg, kv, MailStore(kv), smtp.port, pop.port
    try:
        yield m
    finally:
        smtp.stop()
        pop.stop()


MESSAGE = (b"From: Carol <carol@example.org>\r\nTo: bob@penncloud.local\r\nSubject: lunch\r\n"
           b"Date: Sun, 22 Nov 2026 12:00:00 +0000\r\nMessage-ID: <lunch@example.org>\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
           b"Hi Bob,\r\n.\r\n..two dots\r\n.leading\r\ncaf\xc3\xa9 at noon?\r\n")


def strip_received(raw: bytes) -> tuple[bytes, bytes]:
    """Split off the trace fields we add on delivery: Return-Path, then
    Received (its first line plus its folded continuation lines)."""
    assert raw.startswith(b"Return-Path: <")
    lines = raw.split(b"\r\n")
    assert lines[1].startswith(b"Received: from ")
    i = 2
    while lines[i].startswith((b"\t", b" ")):
        i += 1
    return b"\r\n".join(lines[:i]) + b"\r\n", b"\r\n".join(lines[i:])


def pop_retr(port, user, n=1) -> bytes:
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        p.user(user)
        p.pass_(PW[user])
        _, lines, _ = p.retr(n)
        return b"\r\n".join(lines) + b"\r\n"
    finally:
        p.quit()


def test_smtplib_to_pop3_byte_exact(mail):
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.ehlo("client.example.org")
        assert s.has_extn("pipelining") and s.has_extn("size") and s.has_extn("8bitmime") and "PLAIN" in s.esmtp_features["auth"]
        refused = s.sendmail("carol@example.org", ["bob@penncloud.local"], MESSAGE,
                             mail_options=["BODY=8BITMIME", f"SIZE={len(MESSAGE)}"])
        assert refused == {}
    got = pop_retr(mail.pop_port, "bob")
    received, rest = strip_received(got)
    assert rest == MESSAGE
    assert b"from client.example.org ([127.0.0.1])" in received and b"for <bob@penncloud.local>" in received
    [info] = mail.store.list("bob", "Inbox")
    assert info.subject == "lunch" and info.size == len(got) and info.read  # RETR marks it read


def test_pop3_pipelined_fetch_and_delete_gets_the_whole_message(mail):
    """A client pipelines RETR 1, DELE 1, QUIT (RFC 2449 PIPELINING) for a
    message stored in chunks: it gets every byte, and only then is it deleted."""
    body = b"".join(b"line %06d of a long attachment\r\n" % i for i in range(20000))   # ~660 KB, 3 chunks
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.sendmail("carol@example.org", ["bob@penncloud.local"], b"Subject: big\r\n\r\n" + body)
    c = socket.create_connection(("127.0.0.1", mail.pop_port), timeout=10)
    c.sendall(b"USER bob\r\nPASS " + PW["bob"].encode() + b"\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
    got = b""
    while chunk := c.recv(1 << 16):
        got += chunk
    c.close()
    assert got.endswith(b"\r\n.\r\n+OK Message 1 deleted\r\n+OK Bye, 1 messages deleted\r\n")
    assert body in got
    assert mail.store.list("bob", "Inbox") == []


def test_open_relay_refused_and_unknown_user_550(mail):
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.ehlo("spammer.test")
        s.mail("spam@spammer.test")
        code, text = s.rcpt("victim@elsewhere.test")
        assert code == 554 and b"relay access denied" in text
        code, text = s.rcpt("nobody@penncloud.local")
        assert code == 550 and b"no such user" in text
        code, _ = s.rcpt("BOB@PennCloud.Local")  # case does not matter
        assert code == 250
        code, _ = s.rcpt("postmaster@penncloud.local")  # an account named admin does not exist here
        assert code == 550
    assert mail.store.queue() == []


def test_auth_then_relay_to_other_domain_is_queued(mail):
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.ehlo("thunderbird")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice", "wrong password")
        assert e.value.smtp_code == 535
        s.login("alice", PW["alice"])
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("bob@penncloud.local", ["x@remote.test"], b"Subject: forged\r\n\r\nx\r\n")
        assert e.value.smtp_code == 553
        refused = s.sendmail("alice@penncloud.local", ["x@remote.test", "bob@penncloud.local", "x@REMOTE.test",
                                                        "X@remote.test"],
                             b"Subject: out\r\n\r\nhello\r\n", mail_options=["BODY=8BITMIME", "SIZE=20"])
        assert refused == {}
    [item] = mail.store.queue()
    # (one mailbox once: a domain's case does not matter, a local part's may)
    assert item.owner == "alice" and item.rcpts == ("x@remote.test", "X@remote.test")
    assert item.mail_from == "alice@penncloud.local"
    raw = mail.store.queue_raw(item)
    assert b"with ESMTPA" in raw and raw.endswith(b"Subject: out\r\n\r\nhello\r\n")
    assert [m.subject for m in mail.store.list("bob", "Inbox")] == ["out"]


def test_nobody_sends_as_a_local_user_without_being_them(mail):
    """Mail that says it is from alice@penncloud.local really comes from alice:
    without AUTH no address of ours may be used, neither as the envelope
    sender nor in From:/Sender:; after AUTH only the user's own."""
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("alice@penncloud.local", ["bob@penncloud.local"], b"Subject: spoof 1\r\n\r\nx\r\n")
        assert e.value.smtp_code == 530
        s.rset()
        forged = (b"From: Alice <ALICE@PennCloud.local>\r\nTo: bob@penncloud.local\r\n"
                  b"Subject: spoof 2\r\n\r\nplease reset your password\r\n")
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("carol@example.org", ["bob@penncloud.local"], forged)
        assert e.value.smtp_code == 550 and b"alice@penncloud.local" in e.value.smtp_error.lower()
        s.rset()
        with pytest.raises(smtplib.SMTPDataError):
            s.sendmail("carol@example.org", ["bob@penncloud.local"],
                       b"From: carol@example.org\r\nSender: bob@penncloud.local\r\nSubject: spoof 3\r\n\r\nx\r\n")
        s.rset()
        with pytest.raises(smtplib.SMTPDataError) as e:   # a trailing dot names the same domain
            s.sendmail("carol@example.org", ["bob@penncloud.local"],
                       b'From: "Alice" <alice@penncloud.local.>\r\nSubject: spoof 5\r\n\r\nx\r\n')
        assert e.value.smtp_code == 550
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.login("alice", PW["alice"])
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("alice@penncloud.local", ["bob@penncloud.local"],
                       b"From: bob@penncloud.local\r\nSubject: spoof 4\r\n\r\nx\r\n")
        assert e.value.smtp_code == 550
        s.sendmail("alice@penncloud.local", ["bob@penncloud.local"],
                   b"From: Alice <Alice@penncloud.local>\r\nSubject: genuine\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPSenderRefused) as e:     # <> is for bounces, not for users
            s.sendmail("", ["ceo@bank.example"], b"From: ceo@bank.example\r\nSubject: wire\r\n\r\nx\r\n")
        assert e.value.smtp_code == 553
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:    # outside mail still comes in
        s.sendmail("carol@example.org", ["bob@penncloud.local"],
                   b"From: Carol <carol@example.org>\r\nSubject: from outside\r\n\r\nx\r\n")
    assert sorted(m.subject for m in mail.store.list("bob", "Inbox")) == ["from outside", "genuine"]


@pytest.mark.parametrize("sender", [
    b"=?utf-8?b?Ym9iQHBlbm5jbG91ZC5sb2NhbA==?=",            # an encoded word that decodes to bob's address
    b"bob@=?utf-8?q?penncloud.local?=",
    b"=?utf-8?q?bob=40penncloud=2Elocal?=",
    b"bob@penncloud.local\x1b",                              # a control character the page removes
    b"bob@penncloud.local\x7f",
    b"bob@penncloud.local\xc2\x85",                          # U+0085 (NEL), raw UTF-8
    b"Bob <bob@penncloud.local\xe2\x80\xae>",                # U+202E (bidi override)
    b"bob@penncloud.local\xe2\x80\x8b",                      # U+200B, invisible
    b"bob\xef\xbc\xa0penncloud.local",                        # a fullwidth at sign
])
def test_a_from_that_the_webmail_shows_as_a_local_user_is_refused_too(mail, sender):
    """Mail QA: the check read From: as written, the webmail as shown
    (encoded words decoded, control and bidi characters removed), so these
    passed, unauthenticated, and were listed as "From bob@penncloud.local"
    with Reply going to bob. After AUTH as alice they passed as well."""
    raw = b"From: " + sender + b"\r\nSubject: lunch?\r\n\r\nsee you at 12\r\n"
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("someone@ext.test", ["bob@penncloud.local"], raw)
        assert e.value.smtp_code == 550
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.login("alice", PW["alice"])
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("alice@penncloud.local", ["bob@penncloud.local"], raw)
        assert e.value.smtp_code == 550
    assert mail.store.list("bob", "Inbox") == []
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:   # outsiders' encoded names still pass
        s.sendmail("carol@example.org", ["bob@penncloud.local"],
                   b"From: =?utf-8?q?Carol_K=C3=B6nig?= <carol@example.org>\r\nSubject: hi\r\n\r\nx\r\n")
    assert [m.sender for m in mail.store.list("bob", "Inbox")] == ["Carol K\u00f6nig <carol@example.org>"]


def test_final_delivery_records_the_envelope_sender_in_return_path(mail):
    """Mail QA (RFC 5321 4.4): the envelope sender was recorded nowhere a
    client could see, and a Return-Path the sender wrote survived as if we
    had written it: a bounce from outside could not be told from mail."""
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.sendmail("envsender@ext.test", ["bob@penncloud.local"],
                   b"Return-Path: <bob@penncloud.local>\r\nFrom: x@ext.test\r\nSubject: rp\r\n\r\n"
                   b"Return-Path: in the body stays\r\n")
        s.sendmail("", ["bob@penncloud.local"], b"From: MAILER-DAEMON@ext.test\r\nSubject: bounce\r\n\r\nx\r\n")
    first, second = pop_retr(mail.pop_port, "bob", 1), pop_retr(mail.pop_port, "bob", 2)
    assert first.startswith(b"Return-Path: <envsender@ext.test>\r\nReceived: from ")
    assert first.count(b"Return-Path:") == 2 and b"Return-Path: <bob@" not in first
    assert first.endswith(b"\r\n\r\nReturn-Path: in the body stays\r\n")
    assert second.startswith(b"Return-Path: <>\r\n")


def test_a_submission_without_date_message_id_or_from_gets_them(mail):
    """Mail QA (RFC 6409 8.2, 8.3): a script's or printer's mail without
    Date:, Message-ID: or From: went out as it was, and outside servers
    refuse such mail. A message that has them is left as it is."""
    bare = b"To: bob@penncloud.local\r\nSubject: nodate\r\n\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.login("alice", PW["alice"])
        s.sendmail("alice@penncloud.local", ["bob@penncloud.local", "y@ext.test"], bare)
    _, local = strip_received(pop_retr(mail.pop_port, "bob"))
    [queued] = mail.store.queue()
    for copy in (local, mail.store.queue_raw(queued)):
        msg = email.message_from_bytes(copy)
        assert msg["From"] == "<alice@penncloud.local>" and msg["Date"]
        assert msg["Message-ID"].endswith("@penncloud.local>")
        assert copy.endswith(bare)
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.login("alice", PW["alice"])
        full = MESSAGE.replace(b"Carol <carol@example.org>", b"Alice <alice@penncloud.local>")
        s.sendmail("alice@penncloud.local", ["bob@penncloud.local"], full)
    _, rest = strip_received(pop_retr(mail.pop_port, "bob", 2))
    assert rest == full


def test_mail_clients_may_log_in_with_the_whole_address_and_bcc_is_not_passed_on(mail):
    """Mail QA: Thunderbird's wizard and phones try `alice@penncloud.local`
    as the user name first (it failed, and counted toward the throttle);
    and a Bcc: line a script left in the header reached every recipient."""
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.login("Alice@PennCloud.local", PW["alice"])
        s.sendmail("alice@penncloud.local", ["bob@penncloud.local"],
                   b"From: alice@penncloud.local\r\nTo: carol@example.org\r\nBcc: bob@penncloud.local\r\n"
                   b"Subject: bcc\r\n\r\nBcc: in the body stays\r\n")
    p = poplib.POP3("127.0.0.1", mail.pop_port, timeout=10)
    try:
        p.user("bob@penncloud.local")
        p.pass_(PW["bob"])
        raw = b"\r\n".join(p.retr(1)[1]) + b"\r\n"
    finally:
        p.quit()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Bcc:" not in head and b"Subject: bcc" in head and body == b"Bcc: in the body stays\r\n"
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice@elsewhere.example", PW["alice"])


def test_auth_login_mechanism(mail):
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.ehlo("c")
        s.user, s.password = "bob", PW["bob"]
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235


def test_big_message_is_chunked_and_streams_back(mail):
    line = b"0123456789" * 9 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 30000  # ~2.8 MB, many 256 KiB chunks
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=30) as s:
        s.sendmail("carol@example.org", ["bob@penncloud.local"], body)
    [info] = mail.store.list("bob", "Inbox")
    assert info.chunks > 10
    _, rest = strip_received(pop_retr(mail.pop_port, "bob"))
    assert rest == body


def test_too_big_message_refused(mail):
    body = b"Subject: huge\r\n\r\n" + (b"x" * 998 + b"\r\n") * 4300  # > 4 MiB
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=30) as s:
        s.ehlo("c")
        with pytest.raises(smtplib.SMTPSenderRefused) as e:  # SIZE= announced: refused at MAIL
            s.sendmail("carol@example.org", ["bob@penncloud.local"], body)
        assert e.value.smtp_code == 552
        s.rset()
        s.mail("carol@example.org")  # no SIZE: refused after reading it all
        s.rcpt("bob@penncloud.local")
        code, _ = s.data(body)
        assert code == 552
        assert s.noop()[0] == 250
    assert mail.store.list("bob", "Inbox") == []


def test_pop3_session_with_poplib(mail):
    for i in range(3):
        mail.store.deliver("bob", "Inbox", b"Subject: m%d\r\n\r\nbody %d\r\n.dot\r\n" % (i, i))
    ids = [m.id for m in reversed(mail.store.list("bob", "Inbox"))]
    p = poplib.POP3("127.0.0.1", mail.pop_port, timeout=10)
    caps = p.capa()
    assert "USER" in caps and caps["SASL"] == ["PLAIN"]
    p.user("bob")
    p.pass_(PW["bob"])
    n, size = p.stat()
    assert n == 3
    assert [ln.split()[1].decode() for ln in p.uidl()[1]] == ids
    _, lines, _ = p.top(2, 0)
    assert lines == [b"Subject: m1", b""]
    _, lines, _ = p.retr(3)
    assert lines == [b"Subject: m2", b"", b"body 2", b".dot"]
    # a second session on the same mailbox is refused while this one is open
    q = poplib.POP3("127.0.0.1", mail.pop_port, timeout=10)
    q.user("bob")
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        q.pass_(PW["bob"])
    q.quit()
    p.dele(1)
    p.dele(3)
    p.quit()
    assert [m.id for m in mail.store.list("bob", "Inbox")] == [ids[1]]
    # the lock is free again; a dropped connection deletes nothing
    p = poplib.POP3("127.0.0.1", mail.pop_port, timeout=10)
    p.user("bob")
    p.pass_(PW["bob"])
    p.dele(1)
    p.sock.close()
    p = poplib.POP3("127.0.0.1", mail.pop_port, timeout=10)
    p.user("bob")
    p.pass_(PW["bob"])  # works: the dropped session gave the lock back
    assert p.stat()[0] == 1
    p.quit()


def test_pop3_auth_plain_and_bad_password(mail):
    s = socket.create_connection(("127.0.0.1", mail.pop_port), timeout=10)
    f = s.makefile("rb")
    assert f.readline().startswith(b"+OK")
    import base64
    s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0bob\0wrong password") + b"\r\n")
    assert f.readline().startswith(b"-ERR [AUTH]")
    s.sendall(b"AUTH PLAIN\r\n")
    assert f.readline() == b"+ \r\n"
    s.sendall(base64.b64encode(b"\0bob\0" + PW["bob"].encode()) + b"\r\n")
    assert f.readline().startswith(b"+OK Logged in")
    s.sendall(b"QUIT\r\n")
    assert f.readline().startswith(b"+OK")
    s.close()


def test_idle_smtp_session_gets_421(tmp_path):
    cfg = parse_config({}, data_dir=str(tmp_path))
    srv = make_smtp_server(cfg, MemoryKV(), host="127.0.0.1", port=0, idle_timeout_s=0.3).start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        assert f.readline().startswith(b"421 4.4.2")
        assert f.readline() == b""  # closed
        s.close()
    finally:
        srv.stop()


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
def test_curl_smtp_and_pop3(mail, tmp_path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"Subject: via curl\r\nFrom: alice@penncloud.local\r\n\r\nsent by curl\r\n")
    r = subprocess.run(["curl", "-sS", "--max-time", "20", f"smtp://127.0.0.1:{mail.smtp_port}",
                        "--mail-from", "alice@penncloud.local", "--mail-rcpt", "bob@penncloud.local",
                        "--user", f"alice:{PW['alice']}", "--upload-file", str(msg)],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["curl", "-sS", "--max-time", "20", f"pop3://127.0.0.1:{mail.pop_port}/1",
                        "--user", f"bob:{PW['bob']}"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(b"Subject: via curl\r\nFrom: alice@penncloud.local\r\n\r\nsent by curl\r\n")
    r = subprocess.run(["curl", "-sS", "--max-time", "20", f"pop3://127.0.0.1:{mail.pop_port}/",
                        "--user", f"bob:{PW['bob']}"], capture_output=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith(b"1 ")


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_auth_plain_submission(mail):
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{mail.smtp_port}", "--from", "alice@penncloud.local",
                        "--to", "bob@penncloud.local", "--auth", "PLAIN", "--auth-user", "alice",
                        "--auth-password", PW["alice"], "--header", "Subject: via swaks", "--timeout", "20"],
                       capture_output=True, timeout=40)
    assert r.returncode == 0, r.stdout[-2000:]
    assert [m.subject for m in mail.store.list("bob", "Inbox")] == ["via swaks"]
    r = subprocess.run(["swaks", "--server", f"127.0.0.1:{mail.smtp_port}", "--from", "x@spam.test",
                        "--to", "victim@elsewhere.test", "--timeout", "20"], capture_output=True, timeout=40)
    assert r.returncode != 0 and b"554 5.7.1" in r.stdout


class FailingKV(MemoryKV):
    """A MemoryKV that can be switched to fail every request, as an unreachable cluster does."""

    failing = False

    def _check(self):
        if self.failing:
            from src.kv import Unavailable
            raise Unavailable("store down (test)")

    def get(self, *a):
        self._check()
        return super().get(*a)

    def put(self, *a):
        self._check()
        return super().put(*a)

    def putnx(self, *a):
        self._check()
        return super().putnx(*a)

    def cols(self, *a):
        self._check()
        return super().cols(*a)


def test_store_outage_gives_temporary_errors_not_crashes(tmp_path):
    cfg = parse_config({}, data_dir=str(tmp_path))
    kv = FailingKV()
    Accounts(kv).create("bob", PW["bob"])
    smtp = make_smtp_server(cfg, kv, host="127.0.0.1", port=0).start()
    pop = make_pop3_server(cfg, kv, host="127.0.0.1", port=0).start()
    try:
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=10) as s:
            s.ehlo("c")
            s.mail("carol@example.org")
            assert s.rcpt("bob@penncloud.local")[0] == 250
            kv.failing = True
            code, _ = s.data(b"Subject: x\r\n\r\ny\r\n")
            assert code == 451  # not stored, and the client knows to retry
            with pytest.raises(smtplib.SMTPAuthenticationError) as e:
                s.login("bob", PW["bob"])
            assert e.value.smtp_code == 454
            assert s.noop()[0] == 250  # the session is still fine
        p = poplib.POP3("127.0.0.1", pop.port, timeout=10)
        p.user("bob")
        with pytest.raises(poplib.error_proto, match="SYS/TEMP"):
            p.pass_(PW["bob"])
        kv.failing = False
        p.user("bob")
        p.pass_(PW["bob"])
        assert p.stat()[0] == 0
        p.quit()
    finally:
        smtp.stop()
        pop.stop()


def test_logs_hold_no_passwords_or_bodies(mail, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    secret_body = b"Subject: s\r\n\r\nTOP-SECRET-BODY-TEXT\r\n"
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.login("alice", PW["alice"])
        s.sendmail("alice@penncloud.local", ["bob@penncloud.local"], secret_body)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10).login("bob", "wrong-password-xyz")
    p = poplib.POP3("127.0.0.1", mail.pop_port, timeout=10)
    p.user("bob")
    p.pass_(PW["bob"])
    p.retr(1)
    p.quit()
    text = caplog.text
    assert "AUTH" in text and "accepted" in text  # it does log what happened
    for secret in (PW["alice"], PW["bob"], "wrong-password-xyz", "TOP-SECRET-BODY-TEXT"):
        assert secret not in text


def test_idle_pop3_session_is_closed_without_deleting(tmp_path):
    cfg = parse_config({}, data_dir=str(tmp_path))
    kv = MemoryKV()
    Accounts(kv).create("bob", PW["bob"])
    MailStore(kv).deliver("bob", "Inbox", b"Subject: keep me\r\n\r\nx\r\n")
    srv = make_pop3_server(cfg, kv, host="127.0.0.1", port=0, idle_timeout_s=0.3).start()
    try:
        p = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        p.user("bob")
        p.pass_(PW["bob"])
        p.dele(1)
        assert p.file.readline() == b""  # the server closed the idle session, silently
        p.close()
        assert [m.subject for m in MailStore(kv).list("bob", "Inbox")] == ["keep me"]
        p = poplib.POP3("127.0.0.1", srv.port, timeout=10)  # and gave the mailbox back
        p.user("bob")
        p.pass_(PW["bob"])
        assert p.stat()[0] == 1
        p.quit()
    finally:
        srv.stop()


def test_broken_encoded_words_in_headers_are_delivered_as_they_stand(mail):
    """Mailers that cut a subject at a fixed length leave broken RFC 2047
    words behind; such mail is accepted (it used to drop the connection
    after DATA, unanswered, and with it the rest of a pipelined session) and
    listed with the header as it stands. Raw Latin-1 in a header reads as
    Latin-1, not as replacement characters."""
    broken = (b"From: =?utf-8?B?!!!notbase64?= <x@example.org>\r\nTo: bob@penncloud.local\r\n"
              b"Subject: =?utf-8?B?SGVsbG8gV?=\r\n\r\nhi\r\n")
    latin1 = b"From: Ren\xe9 <rene@example.org>\r\nSubject: Gr\xfc\xdfe\r\n\r\nbody \xe9\r\n"
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.sendmail("x@example.org", ["bob@penncloud.local"], broken)
        s.sendmail("rene@example.org", ["bob@penncloud.local"], latin1)
    listed = sorted((m.subject, m.sender) for m in mail.store.list("bob", "Inbox"))
    assert listed == [("=?utf-8?B?SGVsbG8gV?=", "=?utf-8?B?!!!notbase64?= <x@example.org>"),
                      ("Grüße", "René <rene@example.org>")]
    assert strip_received(pop_retr(mail.pop_port, "bob", 1))[1] in (broken, latin1)


def test_password_guessing_over_smtp_and_pop3_is_throttled_like_the_web_log_in(mail):
    """Security QA: 100 guesses in 5 s over SMTP AUTH or POP3, no lock-out,
    while the web log-in locks after 5 failures. The same rule now applies."""
    from src.throttle import FREE_FAILURES
    with smtplib.SMTP("127.0.0.1", mail.smtp_port, timeout=10) as s:
        s.ehlo()
        codes = []
        def auth_plain(password):       # one attempt per guess (smtplib's login() tries two mechanisms)
            return s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0alice\0{password}".encode()).decode())
        for i in range(FREE_FAILURES + 2):
            codes.append(auth_plain(f"guess {i}")[0])
        assert codes[:FREE_FAILURES] == [535] * FREE_FAILURES and 454 in codes[FREE_FAILURES:]
        code, text = auth_plain(PW["alice"])
        assert code == 454 and b"try again in" in text               # even the right one waits now
    answers = []
    for i in range(FREE_FAILURES + 2):
        p = poplib.POP3("127.0.0.1", mail.pop_port, timeout=10)
        try:
            p.user("bob")
            p.pass_(f"guess {i}")
        except poplib.error_proto as e:
            answers.append(e.args[0])
        finally:
            p.close()
    assert all(b"[AUTH]" in a for a in answers[:FREE_FAILURES])
    assert any(b"Too many failed log-ins" in a for a in answers[FREE_FAILURES:])
