"""Mail over the replicated store: the SMTP server and the primary of the mailbox's tablet
are SIGKILLed right after `250`; every acknowledged message is read back over POP3."""

import poplib
import smtplib

import pytest

from src.accounts import Accounts
from src.kv import tablet_of
from src.kvclient import ClusterClient
from tests.clusterkit import Cluster
from tests.harness import wait_until

PW = "a good password"


@pytest.mark.slow
def test_mail_survives_smtp_and_primary_sigkill(procs, tmp_path):
    cl = Cluster(procs, tmp_path, servers=3, tablets=6, replication=3).start_all()
    with open(cl.config, "a") as f:
        f.write('[mail]\ndomain = "penncloud.local"\n')
    kv = ClusterClient(cl.master_addr, deadline=20)
    Accounts(kv).create("bob", PW)

    def start(role):
        return procs.start("smtp", ["--config", cl.config, "--id", role, "--port", "0"], name=role)

    smtp = start("smtp")
    sent = []
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=30) as s:
        for i in range(5):
            body = b"Subject: replicated %d\r\n\r\n" % i + b"text line\r\n" * (i * 3000)
            assert s.sendmail("carol@example.org", ["bob@penncloud.local"], body) == {}
            sent.append(body)
        victim = cl.primary(tablet_of(b"mbox/bob/Inbox", cl.tablets))
        smtp.kill()
        cl.kill(victim)
    smtp.start()
    # the store fails over; the restarted SMTP server takes mail again
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=30) as s:
        body = b"Subject: after failover\r\n\r\nhello\r\n"
        assert s.sendmail("carol@example.org", ["bob@penncloud.local"], body) == {}
        sent.append(body)
    pop = start("pop3")

    def read_all():
        p = poplib.POP3("127.0.0.1", pop.port, timeout=30)
        try:
            p.user("bob")
            p.pass_(PW)
            out = []
            for n in range(1, p.stat()[0] + 1):
                raw = b"\r\n".join(p.retr(n)[1]) + b"\r\n"
                out.append(raw[raw.index(b"Subject: "):])
            return out
        finally:
            p.quit()

    assert wait_until(lambda: read_all() == sent, timeout=30, what="every acknowledged message")
