"""The relay worker in-process over MemoryKV, against a loopback DNS server and a loopback SMTP peer."""

import email
import shutil
import subprocess
from email import policy

import pytest

from smtp.mx import DNSError, mail_hosts, make_resolver
from smtp.relay import RelayWorker
from src.kv import MemoryKV
from src.mailstore import MailStore
from tests.harness import free_port, wait_until
from tests.mailpeers import DNSStub, PeerHandler, SMTPPeer

RECORDS = {
    "remote.test": {"MX": ["10 mx.remote.test.", "20 backup.remote.test."]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
    "backup.remote.test": {"A": ["127.0.0.2"]},
    "plain.test": {"A": ["127.0.0.1"]},  # no MX: the A record is the mail host
    "nomail.test": {"MX": ["0 ."]},  # null MX
}
MSG = b"From: alice@penncloud.local\r\nTo: x@remote.test\r\nSubject: out\r\n\r\nhello\r\n.dot line\r\n"


@pytest.fixture
def dns_server():
    with DNSStub(RECORDS) as d:
        yield d


def worker(store, dns_server, port, **kw):
    args = dict(domain="penncloud.local", worker_id="relay", resolver=dns_server.addr, relay_port=port,
                retry_initial_s=0.2, retry_for_s=30, poll_s=0.05, smtp_timeout_s=5)
    args.update(kw)
    return RelayWorker(store, **args)


def test_mx_lookup_order_fallback_and_failures(dns_server):
    r = make_resolver(dns_server.addr)
    assert mail_hosts("remote.test", r) == ["127.0.0.1", "127.0.0.2"]
    assert mail_hosts("plain.test", r) == ["127.0.0.1"]
    assert mail_hosts("[127.0.0.9]", r) == ["127.0.0.9"]
    for name, status in (("nomail.test", "5.1.10"), ("nowhere.test", "5.1.2"),
                         ("a..b", "5.1.2"), ("a" * 70 + ".test", "5.1.2")):   # not names: bounced at once
        with pytest.raises(DNSError) as e:
            mail_hosts(name, r)
        assert e.value.permanent and e.value.status == status


def test_dns_timeout_is_temporary():
    r = make_resolver(f"127.0.0.1:{free_port()}")  # nobody answers
    r.lifetime = 0.3
    with pytest.raises(DNSError) as e:
        mail_hosts("remote.test", r)
    assert not e.value.permanent


def test_delivers_via_mx_and_empties_queue(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test", "y@remote.test"], MSG)
    with SMTPPeer(PeerHandler()) as peer:
        assert worker(store, dns_server, peer.port).run_once() == 1
        assert peer.handler.received == [("alice@penncloud.local", ["x@remote.test", "y@remote.test"], MSG)]
    assert store.queue() == [] and store.list("alice", "Inbox") == []


def test_implicit_mx_a_record(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["z@plain.test"], MSG)
    with SMTPPeer(PeerHandler()) as peer:
        worker(store, dns_server, peer.port).run_once()
        assert [r[1] for r in peer.handler.received] == [["z@plain.test"]]


def test_4xx_then_250_is_delivered_after_a_retry(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    with SMTPPeer(PeerHandler(["451 4.3.0 try again later"])) as peer:
        w = worker(store, dns_server, peer.port, retry_initial_s=0.3)
        w.run_once()
        [item] = store.queue()
        assert item.attempts == 1 and item.rcpts == ("x@remote.test",) and "451" in item.last_error
        assert item.lease_owner == ""
        assert w.run_once() == 0  # not due yet: back-off
        wait_until(lambda: w.run_once() and not store.queue(), timeout=10, what="the retry")
        assert peer.handler.attempts == 2 and [r[2] for r in peer.handler.received] == [MSG]
    assert store.list("alice", "Inbox") == []  # no bounce


def test_5xx_bounces_to_the_sender_and_other_recipients_still_get_it(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["reject-me@remote.test", "ok@remote.test"], MSG)
    with SMTPPeer(PeerHandler()) as peer:
        worker(store, dns_server, peer.port).run_once()
        assert [r[1] for r in peer.handler.received] == [["ok@remote.test"]]
    assert store.queue() == []
    [b] = store.list("alice", "Inbox")
    assert b.subject == "Undelivered Mail Returned to Sender"
    raw = store.get_raw("alice", "Inbox", b.id)
    m = email.message_from_bytes(raw, policy=policy.default)
    assert m.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; reject-me@remote.test" in raw and b"Status: 5.1.1" in raw
    assert b"ok@remote.test" not in raw.split(b"text/rfc822-headers")[0]


def test_permanent_dns_failure_bounces(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["a@nowhere.test"], MSG)
    worker(store, dns_server, free_port()).run_once()
    assert store.queue() == []
    [b] = store.list("alice", "Inbox")
    assert b"Status: 5.1.2" in store.get_raw("alice", "Inbox", b.id)


def test_null_sender_is_never_bounced(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "", ["a@nowhere.test"], MSG)
    worker(store, dns_server, free_port()).run_once()
    assert store.queue() == [] and store.list("alice", "Inbox") == []


def test_unreachable_host_retries_then_gives_up_with_a_bounce(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    w = worker(store, dns_server, free_port(), retry_initial_s=0.05, retry_for_s=0.6)
    w.run_once()
    [item] = store.queue()
    assert item.attempts == 1 and item.rcpts
    wait_until(lambda: w.run_once() is not None and not store.queue(), timeout=10, what="giving up")
    [b] = store.list("alice", "Inbox")
    raw = store.get_raw("alice", "Inbox", b.id)
    assert b"Status: 4.4.7" in raw and b"Action: failed" in raw


def test_leases_other_workers_and_dead_predecessors(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    [item] = store.queue()
    with SMTPPeer(PeerHandler()) as peer:
        # another worker holds a live lease: hands off
        store.claim(item, "relay2:abcd", lease_s=60)
        assert worker(store, dns_server, peer.port).run_once() == 0
        # a dead incarnation of this worker's id held it: taken at once
        [item] = store.queue()
        store.update(item, lease_owner="relay:dead", lease_until=item.lease_until)
        assert worker(store, dns_server, peer.port).run_once() == 1
        assert len(peer.handler.received) == 1 and store.queue() == []


def test_expired_lease_is_taken_over(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    [item] = store.queue()
    store.claim(item, "relay2:abcd", lease_s=-1)  # already run out
    with SMTPPeer(PeerHandler()) as peer:
        assert worker(store, dns_server, peer.port).run_once() == 1
        assert len(peer.handler.received) == 1


def test_pending_bounce_is_delivered_once_after_a_crash(dns_server):
    """A worker died after recording the bounce id, before (or after) delivering it."""
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    [item] = store.queue()
    bid = store.new_id()
    store.update(item, rcpts=(), failed=(("x@remote.test", "5.1.1", "550 no"),), bounce_id=bid,
                 lease_owner="relay:dead", lease_until=1e12)
    # the dead worker had delivered the bounce already
    w = worker(store, dns_server, free_port())
    from src import mailfmt
    store.deliver("alice", "Inbox", mailfmt.bounce(domain="penncloud.local", to="alice@penncloud.local", original=MSG,
                  failed=[mailfmt.FailedRecipient("x@remote.test", "5.1.1", "550 no")], now=0, reason="r"), msg_id=bid)
    w.run_once()
    assert store.queue() == [] and [m.id for m in store.list("alice", "Inbox")] == [bid]


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
def test_relay_with_dnsmasq(tmp_path):
    port = free_port()
    p = subprocess.Popen(["dnsmasq", "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1",
                          "--bind-interfaces", "--no-resolv", "--no-hosts", "--pid-file=" + str(tmp_path / "pid"),
                          "--mx-host=example.test,mx.example.test,10", "--address=/mx.example.test/127.0.0.1",
                          ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        r = make_resolver(f"127.0.0.1:{port}")
        r.lifetime = 1
        wait_until(lambda: mail_hosts("example.test", r) == ["127.0.0.1"], timeout=10, what="dnsmasq")
        store = MailStore(MemoryKV())
        store.enqueue_outgoing("alice", "alice@penncloud.local", ["q@example.test"], MSG)
        with SMTPPeer(PeerHandler()) as peer:
            w = RelayWorker(store, domain="penncloud.local", worker_id="relay", resolver=f"127.0.0.1:{port}",
                            relay_port=peer.port, retry_initial_s=0.1, smtp_timeout_s=5)
            assert w.run_once() == 1
            assert [r[1] for r in peer.handler.received] == [["q@example.test"]]
    finally:
        p.kill()
        p.wait(5)


def test_5xx_after_data_bounces_every_recipient(dns_server):
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["a@remote.test", "b@remote.test"], MSG)
    with SMTPPeer(PeerHandler(["554 5.6.0 content rejected"])) as peer:
        worker(store, dns_server, peer.port).run_once()
        assert peer.handler.received == [] and peer.handler.attempts == 1
    assert store.queue() == []
    [b] = store.list("alice", "Inbox")
    raw = store.get_raw("alice", "Inbox", b.id)
    assert raw.count(b"Action: failed") == 2 and b"Status: 5.6.0" in raw and b"554 5.6.0 content rejected" in raw


class SevenBitPeer:
    """A minimal SMTP server whose EHLO lists no 8BITMIME (aiosmtpd always does),
    answering QUIT with `quit_reply`."""

    def __init__(self, quit_reply=b"221 bye"):
        self.quit_reply = quit_reply
        import socket
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                conn.sendall(b"220 old.remote.test\r\n")
                for line in f:
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-old.remote.test\r\n250 SIZE 1000000\r\n")
                    elif verb == b"DATA":
                        conn.sendall(b"354 go on\r\n")
                        body = b""
                        for ln in f:
                            if ln == b".\r\n":
                                break
                            body += ln
                        self.received.append(body)
                        conn.sendall(b"250 OK\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(self.quit_reply + b"\r\n")
                        break
                    else:
                        conn.sendall(b"250 OK\r\n")

    def close(self):
        self.sock.close()


def test_8bit_mail_bounces_at_a_server_without_8bitmime_and_7bit_mail_goes(dns_server):
    """RFC 6152 3: 8-bit mail must not be relayed to a server that does not
    offer 8BITMIME (we do not convert it: the sender gets a bounce)."""
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG + "café\r\n".encode())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["y@remote.test"], MSG)
    peer = SevenBitPeer()
    try:
        w = worker(store, dns_server, peer.port)
        w.run_once()
        w.run_once()
        assert peer.received == [MSG.replace(b"\r\n.dot", b"\r\n..dot")]      # only the 7-bit one
    finally:
        peer.close()
    assert store.queue() == []
    [b] = store.list("alice", "Inbox")
    raw = store.get_raw("alice", "Inbox", b.id)
    assert b.subject == "Undelivered Mail Returned to Sender" and b"8BITMIME" in raw


def test_a_server_that_answers_quit_oddly_still_got_the_message_once(dns_server):
    """DATA answered 250 means delivered, whatever QUIT then says (smtplib's
    context manager raised on a non-221 QUIT, and the relay sent the message
    again on every retry, then bounced it)."""
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    peer = SevenBitPeer(quit_reply=b"500 5.5.1 what?")
    try:
        w = worker(store, dns_server, peer.port)
        w.run_once()
        assert len(peer.received) == 1 and store.queue() == []
        w.run_once()
        assert len(peer.received) == 1
    finally:
        peer.close()
    assert store.list("alice", "Inbox") == []          # no bounce


def test_a_poison_item_neither_blocks_the_queue_nor_loops(dns_server):
    """A non-ASCII recipient queued (by an older server) bounces alone; and an
    item that makes the worker fail with a bug is put off, not retried in a
    tight loop ahead of everyone else's mail."""
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("bob", "bob@penncloud.local", ["jösé@remote.test", "ok@remote.test"], MSG)
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["after@remote.test"], MSG)
    with SMTPPeer(PeerHandler()) as peer:
        w = worker(store, dns_server, peer.port)
        w.run_once()
        got = sorted(r for _, rs, _ in peer.handler.received for r in rs)
        assert got == ["after@remote.test", "ok@remote.test"]
        [b] = store.list("bob", "Inbox")
        assert b"5.6.7" in store.get_raw("bob", "Inbox", b.id)
        assert store.queue() == []
        # a bug on one item: the others still go, the bad one waits its back-off
        store.enqueue_outgoing("carol", "carol@penncloud.local", ["bug@remote.test"], MSG)
        store.enqueue_outgoing("alice", "alice@penncloud.local", ["fine@remote.test"], MSG)
        real = w._attempt

        def buggy(item, raw, *more):
            if item.rcpts == ("bug@remote.test",):
                raise RuntimeError("a bug")
            return real(item, raw, *more)
        w._attempt = buggy
        w.retry_initial_s, w.retry_for_s = 600.0, 30.0
        assert w.run_once() == 2
        assert any("fine@remote.test" in rs for _, rs, _ in peer.handler.received)
        [left] = store.queue()
        assert left.rcpts == ("bug@remote.test",) and left.attempts == 1 and "a bug" in left.last_error
        assert left.next_at <= left.created + 30.0      # never put off past its give-up time
        assert w.run_once() == 0                        # not due again at once


def test_a_silent_server_holds_up_one_worker_not_everybodys_mail(dns_server, tmp_path):
    """A remote host that accepts the connection and never says a word costs
    a worker its SMTP timeout; with several workers, and at most one of them
    at a domain at a time, the other mail goes on, however many messages
    wait for the silent one."""
    import socket
    import threading
    import time
    from smtp.relay import make_relay_workers, run_workers
    from src.config import parse_config
    records = dict(RECORDS, **{"hole.test": {"A": ["127.0.0.2"]}})
    kv = MemoryKV()
    store = MailStore(kv)
    for i in range(3):                      # more messages for the silent server than workers
        store.enqueue_outgoing("bob", "bob@penncloud.local", [f"x{i}@hole.test"], MSG)
    with DNSStub(records) as dns, SMTPPeer(PeerHandler()) as peer:
        hole = socket.socket()
        hole.bind(("127.0.0.2", peer.port))   # the same port on another address:
        hole.listen(8)                        # accepts (in the backlog), never answers
        cfg = parse_config({"mail": {"resolver": dns.addr, "relay_port": peer.port}}, data_dir=str(tmp_path))
        workers = make_relay_workers(cfg, kv, n=2, poll_s=0.05)
        assert [w.worker_id for w in workers] == ["relay.0", "relay.1"]
        assert workers[0].sweeper is None or workers[1].sweeper is None
        stop = threading.Event()
        t = threading.Thread(target=run_workers, args=(workers, stop), daemon=True)
        t.start()
        try:
            time.sleep(0.5)                   # one worker is now stuck on the hole (60 s timeout) ...
            store.enqueue_outgoing("alice", "alice@penncloud.local", ["y@remote.test"], MSG)
            wait_until(lambda: any("y@remote.test" in rs for _, rs, _ in peer.handler.received), 5,
                       what="alice's mail delivered while bob's waits on a silent server")
            assert not any("hole.test" in r for _, rs, _ in peer.handler.received for r in rs)
        finally:
            stop.set()
            hole.close()                      # the stuck worker's read ends
            t.join(15)


def test_a_restarted_relay_takes_every_lease_of_its_earlier_incarnations(tmp_path):
    """Leases of this relay process's ids that no running worker holds (a
    dead incarnation's, even one that ran another number of workers, such as
    the single `relay` worker before an upgrade) are taken at once; a lease
    of a running sibling worker is respected."""
    from smtp.relay import make_relay_workers
    from src.config import parse_config
    cfg = parse_config({}, data_dir=str(tmp_path))
    w0, w1 = make_relay_workers(cfg, MemoryKV(), n=2)
    store = w0.store
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    [item] = store.queue()
    now = store.clock()
    for owner, free in (("relay:0ld", True), ("relay.7:dead", True), ("relay.0:dead", True),
                        (w1.owner, False), ("relay2.0:beef", False), ("other:1", False)):
        item = store.update(item, lease_owner=owner, lease_until=now + 600)
        assert w0._claimable(item, now) is free, owner


def test_a_tarpit_that_drips_bytes_is_cut_off_and_the_mail_retried(dns_server):
    """A server that sends its greeting a byte at a time, never finishing a
    line, never trips smtplib's timeout (it bounds each read); the attempt's
    own deadline ends it, well inside the lease, and the mail is tried again
    later instead of holding the worker for ever."""
    import socket
    import threading
    import time
    stop = threading.Event()
    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(4)

    def drip():
        conns = []
        tarpit.settimeout(0.05)
        while not stop.is_set():
            try:
                conns.append(tarpit.accept()[0])
            except OSError:
                pass
            for c in conns:
                try:
                    c.send(b"2")
                except OSError:
                    pass
            time.sleep(0.05)
        for c in conns:
            c.close()
    t = threading.Thread(target=drip, daemon=True)
    t.start()
    store = MailStore(MemoryKV())
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@plain.test"], MSG)
    w = worker(store, dns_server, tarpit.getsockname()[1], attempt_s=1.0, smtp_timeout_s=3)
    try:
        done = []
        runner = threading.Thread(target=lambda: done.append(w.run_once()), daemon=True)
        began = time.monotonic()
        runner.start()
        runner.join(10)
        assert done, "the attempt is still hanging on the tarpit"
        assert time.monotonic() - began < 5
        [item] = store.queue()
        assert item.rcpts == ("x@plain.test",) and item.attempts == 1
        assert "cut off" in item.last_error and not item.lease_owner
    finally:
        stop.set()
        t.join(5)
        tarpit.close()


def test_a_stopping_relay_cuts_its_delivery_under_way_and_the_mail_stays_queued(dns_server, tmp_path):
    """`./run_all.sh stop` gives a process 8 s before SIGKILL; a worker
    waiting on a silent remote server (60 s per reply) used to hold the
    relay past that. Stopping now cuts the delivery; the mail stays in the
    queue, unleased, for the next relay."""
    import socket
    import threading
    import time
    from smtp.relay import make_relay_workers, run_workers
    from src.config import parse_config
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    kv = MemoryKV()
    store = MailStore(kv)
    store.enqueue_outgoing("bob", "bob@penncloud.local", ["x@plain.test"], MSG)
    cfg = parse_config({"mail": {"resolver": dns_server.addr, "relay_port": hole.getsockname()[1]}},
                       data_dir=str(tmp_path))
    workers = make_relay_workers(cfg, kv, n=1, poll_s=0.05)
    stop = threading.Event()
    t = threading.Thread(target=run_workers, args=(workers, stop), daemon=True)
    t.start()
    try:
        hole.settimeout(5)
        conn, _ = hole.accept()               # the worker is now waiting for a greeting
        time.sleep(0.2)
        began = time.monotonic()
        stop.set()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - began < 3
        [item] = store.queue()
        assert item.rcpts == ("x@plain.test",) and not item.lease_owner and "stopping" in item.last_error
        conn.close()
    finally:
        stop.set()
        hole.close()


def test_a_worker_that_lost_its_lease_while_standing_still_does_not_deliver(dns_server):
    """Gray-failure QA: a relay worker paused past its lease right after its
    claim resumed and delivered, while the worker that had taken the item
    over delivered it too: the remote server got the message twice. The
    lease is renewed (a CPUT) before each remote domain is tried."""
    class Clock:
        t = 1_000_000.0

        def __call__(self):
            return self.t
    clock = Clock()
    store = MailStore(MemoryKV(), clock=clock)
    store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test"], MSG)
    with SMTPPeer(PeerHandler()) as peer:
        paused = worker(store, dns_server, peer.port, worker_id="relay-a", clock=clock, lease_s=60)
        other = worker(store, dns_server, peer.port, worker_id="relay-b", clock=clock, lease_s=60)
        real_raw = store.queue_raw
        taken = []

        def stands_still(item):
            if not taken:
                taken.append(1)
                clock.t += 61                                # relay-a stands still past its lease...
                [it] = store.queue()
                assert store.claim(it, "relay-b", 60)        # ...relay-b takes the item over
            return real_raw(item)
        store.queue_raw = stands_still
        [item] = store.queue()
        assert paused._claim_and_process(item) == 1         # relay-a goes on from its claim
        assert peer.handler.received == []                   # and delivers nothing
        assert other.run_once() == 1                         # relay-b does
        assert len(peer.handler.received) == 1
        store.enqueue_outgoing("alice", "alice@penncloud.local", ["y@remote.test"], MSG)
        [item] = store.queue()
        calls = []

        def finished_meanwhile(it):
            calls.append(1)
            if len(calls) == 1:
                clock.t += 61                                # relay-a stands still past its lease...
                assert other.run_once() == 1                 # ...relay-b delivers and finishes the item
            return real_raw(it)
        store.queue_raw = finished_meanwhile
        assert paused._claim_and_process(item) == 1          # the item is gone: nothing to do
        assert len(peer.handler.received) == 2
    assert store.queue() == []
