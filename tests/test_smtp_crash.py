"""Mail processes under SIGKILL, over a real standalone tablet server.

- SMTP: a message acknowledged with 250 is in the store after the SMTP server
  and the tablet server are both SIGKILLed and restarted (read back via a POP3
  process).
- Relay: the worker SIGKILLed mid-queue and restarted delivers every queued
  message, at least once (only a message in flight may arrive twice).
"""

import poplib
import smtplib

import pytest

from src.accounts import Accounts
from src.kvclient import ServerClient
from src.mailstore import MailStore
from tests.harness import free_port, wait_until
from tests.mailpeers import DNSStub, PeerHandler, SMTPPeer

PW = "a good password"


def write_config(tmp_path, dns_addr="", relay_port=25):
    cfg = tmp_path / "mail.toml"
    cfg.write_text(f"""
data_dir = "{tmp_path / 'data'}"
[mail]
domain = "penncloud.local"
resolver = "{dns_addr}"
relay_port = {relay_port}
retry_initial_s = 0.2
retry_for_s = 60
""")
    return str(cfg)


def start_kv(procs, tmp_path, port):
    return procs.start("kvserver", ["--standalone", "--port", str(port), "--data", str(tmp_path / "kv")],
                       name="kvserver")


def mail_proc(procs, cfg, role, kv_port):
    return procs.start("smtp", ["--config", cfg, "--id", role, "--port", "0", "--kv-server", f"127.0.0.1:{kv_port}"],
                       name=role)


@pytest.mark.slow
def test_sigkill_right_after_250_loses_nothing(procs, tmp_path):
    kv_port = free_port()
    kvp = start_kv(procs, tmp_path, kv_port)
    Accounts(ServerClient(f"127.0.0.1:{kv_port}")).create("bob", PW)
    cfg = write_config(tmp_path)
    smtp = mail_proc(procs, cfg, "smtp", kv_port)
    bodies = []
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=20) as s:
        for i in range(5):
            body = b"Subject: crash %d\r\n\r\n" % i + b"line\r\n" * (i * 5000)
            assert s.sendmail("carol@example.org", ["bob@penncloud.local"], body) == {}
            bodies.append(body)
        smtp.kill()  # right after the last 250
        kvp.kill()
    kvp.start()
    smtp.start()
    pop = mail_proc(procs, cfg, "pop3", kv_port)
    p = poplib.POP3("127.0.0.1", pop.port, timeout=20)
    p.user("bob")
    p.pass_(PW)
    assert p.stat()[0] == 5
    got = []
    for n in range(1, 6):
        lines = p.retr(n)[1]
        raw = b"\r\n".join(lines) + b"\r\n"
        got.append(raw[raw.index(b"Subject: "):])
    p.quit()
    assert got == bodies


@pytest.mark.slow
def test_relay_sigkill_mid_queue_delivers_everything(procs, tmp_path):
    kv_port = free_port()
    start_kv(procs, tmp_path, kv_port)
    kv = ServerClient(f"127.0.0.1:{kv_port}")
    Accounts(kv).create("alice", PW)
    n = 12
    with DNSStub({"remote.test": {"MX": ["10 mx.remote.test."]}, "mx.remote.test": {"A": ["127.0.0.1"]}}) as d, \
            SMTPPeer(PeerHandler(delay_s=0.15)) as peer:
        cfg = write_config(tmp_path, d.addr, peer.port)
        smtp = mail_proc(procs, cfg, "smtp", kv_port)
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=20) as s:
            s.login("alice", PW)
            for i in range(n):
                s.sendmail("alice@penncloud.local", ["x@remote.test"], b"Subject: q%d\r\n\r\nbody\r\n" % i)
        store = MailStore(kv)
        assert len(store.queue()) == n
        relay = mail_proc(procs, cfg, "relay", kv_port)
        wait_until(lambda: len(peer.handler.received) >= 3, timeout=30, what="some deliveries")
        relay.kill()
        assert store.queue()  # it died mid-queue
        relay.start()
        wait_until(lambda: not store.queue(), timeout=60, what="the queue to drain")
        subjects = [raw.split(b"\r\n")[[ln.startswith(b"Subject") for ln in raw.split(b"\r\n")].index(True)]
                    for _, _, raw in peer.handler.received]
        assert set(subjects) == {b"Subject: q%d" % i for i in range(n)}
        from smtp.relay import WORKERS
        assert len(subjects) <= n + WORKERS  # at most each worker's one item in flight twice
    assert store.list("alice", "Inbox") == []  # no bounces
