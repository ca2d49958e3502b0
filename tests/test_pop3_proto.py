"""The pure POP3 state machine: every verb, states, deletion at QUIT only, dot-stuffing, SASL, limits."""

import base64
import random

import pytest

from smtp.pop3_proto import MAX_COMMAND_LINE, DotStuffer, MailboxInUse, MessageGone, POP3Connection, top_of

MSGS = {
    "u1": b"Subject: one\r\n\r\nfirst\r\n",
    "u2": b"Subject: two\r\n\r\n.starts with a dot\r\nline\r\n.\r\n..\r\nend",
    "u3": b"Subject: three\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n",
}


class Drop:
    def __init__(self, msgs, chunk=5):
        self.msgs = dict(msgs)
        self.chunk = chunk
        self.committed = None
        self.released = 0

    def messages(self):
        return [(k, len(v)) for k, v in self.msgs.items()]

    def iter_message(self, uid):
        raw = self.msgs[uid]
        return [raw[i:i + self.chunk] for i in range(0, len(raw), self.chunk)]

    def commit(self, deleted):
        self.committed = list(deleted)
        return len(deleted)

    def release(self):
        self.released += 1


class Handler:
    def __init__(self):
        self.drop = Drop(MSGS)
        self.locked = False

    def authenticate(self, user, pw, peer_ip=""):
        return "bob" if (user.lower(), pw) == ("bob", "pw pw pw") else None

    def open_maildrop(self, user):
        if self.locked:
            raise MailboxInUse(user)
        return self.drop


def flat(out) -> bytes:
    return b"".join(p if isinstance(p, bytes) else b"".join(p) for p in out)


def run(c, *lines) -> bytes:
    return flat(c.receive_data(b"".join(ln + b"\r\n" for ln in lines)))


def status(out: bytes) -> list[str]:
    return [ln[:4].decode() for ln in out.split(b"\r\n") if ln.startswith((b"+OK", b"-ERR"))]


def logged_in():
    h = Handler()
    c = POP3Connection(h)
    assert run(c, b"USER bob", b"PASS pw pw pw").endswith(b"+OK Logged in, 3 messages\r\n")
    return c, h


def test_capa_lists_user_and_sasl_plain():
    c = POP3Connection(Handler())
    assert c.greeting().startswith(b"+OK")
    out = run(c, b"CAPA")
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[-2] == b"." and b"USER" in lines and b"SASL PLAIN" in lines
    assert b"UIDL" in lines and b"TOP" in lines


def test_commands_not_allowed_before_login():
    c = POP3Connection(Handler())
    assert status(run(c, b"STAT", b"RETR 1", b"PASS x", b"LIST", b"FOO")) == ["-ERR"] * 5
    assert status(run(c, b"USER bob", b"PASS wrong")) == ["+OK ", "-ERR"]
    assert b"[AUTH]" in run(c, b"USER bob", b"PASS nope")


def test_stat_list_uidl():
    c, _ = logged_in()
    sizes = [len(v) for v in MSGS.values()]
    assert run(c, b"STAT") == f"+OK 3 {sum(sizes)}\r\n".encode()
    assert run(c, b"LIST") == (b"+OK 3 messages\r\n" + b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes))
                               + b".\r\n")
    assert run(c, b"LIST 2") == b"+OK 2 %d\r\n" % sizes[1]
    assert run(c, b"UIDL") == b"+OK 3 messages\r\n1 u1\r\n2 u2\r\n3 u3\r\n.\r\n"
    assert run(c, b"UIDL 3") == b"+OK 3 u3\r\n"
    assert status(run(c, b"LIST 4", b"LIST 0", b"LIST x", b"UIDL 9", b"RETR 4")) == ["-ERR"] * 5
    assert run(c, b"NOOP") == b"+OK\r\n"
    assert status(run(c, b"USER bob")) == ["-ERR"]  # not in TRANSACTION


def unstuff(out: bytes) -> bytes:
    """What poplib-like clients do: strip the status line and terminator, unstuff dots."""
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"+OK") and lines[-2:] == [b".", b""]
    return b"\r\n".join(ln[1:] if ln.startswith(b"..") else ln for ln in lines[1:-2])


def test_retr_dot_stuffs_and_terminates():
    c, _ = logged_in()
    out = run(c, b"RETR 2")
    assert out.startswith(b"+OK %d octets\r\n" % len(MSGS["u2"]))
    body = out.split(b"\r\n", 1)[1]
    assert body == b"Subject: two\r\n\r\n..starts with a dot\r\nline\r\n..\r\n...\r\nend\r\n.\r\n"
    assert unstuff(out) == MSGS["u2"] + b""  # the added CRLF before "." is the terminator's
    assert run(c, b"RETR 1") == b"+OK %d octets\r\n" % len(MSGS["u1"]) + MSGS["u1"] + b".\r\n"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_dot_stuffer_is_chunking_independent(chunk):
    raw = b".a\r\n.\r\nb\n.c\r\n..\r\n"
    ds = DotStuffer()
    out = b"".join(ds.feed(raw[i:i + chunk]) for i in range(0, len(raw), chunk)) + ds.end()
    assert out == b"..a\r\n..\r\nb\n..c\r\n...\r\n.\r\n"


class LazyDrop(Drop):
    """Reads a message's chunks only as they are sent, as the real store does,
    and records the order of reads and the commit."""

    def __init__(self, msgs, events):
        super().__init__(msgs)
        self.events = events
        self.gone = set()

    def iter_message(self, uid):
        if uid in self.gone:
            raise MessageGone(uid)
        chunks = super().iter_message(uid)

        def lazily():
            for ch in chunks:
                self.events.append(("read", uid))
                yield ch
        return lazily()

    def commit(self, deleted):
        self.events.append(("commit", tuple(deleted)))
        return super().commit(deleted)


def test_pipelined_retr_dele_quit_sends_the_message_before_deleting_it():
    """RFC 2449 PIPELINING: RETR 1, DELE 1, QUIT in one packet. QUIT deletes;
    it must run only after the message, read lazily, has been sent."""
    events = []
    h = Handler()
    h.drop = LazyDrop(MSGS, events)
    c = POP3Connection(h)
    run(c, b"USER bob", b"PASS pw pw pw")
    out = run(c, b"RETR 1", b"DELE 1", b"RETR 2", b"QUIT")
    assert out == (b"+OK 23 octets\r\nSubject: one\r\n\r\nfirst\r\n.\r\n"
                   b"+OK Message 1 deleted\r\n"
                   b"+OK 52 octets\r\nSubject: two\r\n\r\n..starts with a dot\r\nline\r\n..\r\n...\r\nend\r\n.\r\n"
                   b"+OK Bye, 1 messages deleted\r\n")
    assert events.index(("commit", ("u1",))) > max(i for i, e in enumerate(events) if e[0] == "read")
    # many RETRs in one packet: a loop, not a recursion
    c2 = POP3Connection(Handler())
    out = run(c2, b"USER bob", b"PASS pw pw pw", *[b"RETR 1"] * 3000, b"QUIT")
    assert out.count(b"+OK %d octets" % len(MSGS["u1"])) == 3000 and out.endswith(b"+OK Bye, 0 messages deleted\r\n")


def test_retr_of_a_message_deleted_by_another_session_is_an_error_not_an_empty_message():
    events = []
    h = Handler()
    h.drop = LazyDrop(MSGS, events)
    c = POP3Connection(h)
    run(c, b"USER bob", b"PASS pw pw pw")
    h.drop.gone.add("u2")                         # deleted in the webmail meanwhile
    assert run(c, b"RETR 2").startswith(b"-ERR Message 2 was deleted")
    assert run(c, b"TOP 2 0").startswith(b"-ERR Message 2 was deleted")
    assert run(c, b"RETR 1").startswith(b"+OK")   # the session goes on


def test_pass_keeps_the_spaces_of_the_password():
    """RFC 1939: PASS has one argument, so spaces are part of the password."""
    class Spaced(Handler):
        def authenticate(self, user, pw, peer_ip=""):
            return "bob" if (user, pw) == ("bob", " spaced pass ") else None
    c = POP3Connection(Spaced())
    assert run(c, b"USER  bob ", b"PASS  spaced pass ").endswith(b"+OK Logged in, 3 messages\r\n")


def test_top():
    c, _ = logged_in()
    assert run(c, b"TOP 3 0") == b"+OK\r\nSubject: three\r\nX: y\r\n\r\n.\r\n"
    assert run(c, b"TOP 3 2") == b"+OK\r\nSubject: three\r\nX: y\r\n\r\nl1\r\nl2\r\n.\r\n"
    assert run(c, b"TOP 3 99") == b"+OK\r\n" + MSGS["u3"] + b".\r\n"
    assert status(run(c, b"TOP 3", b"TOP 9 1", b"TOP 3 x")) == ["-ERR"] * 3
    assert top_of([b"no body at all"], 3) == b"no body at all"


def test_dele_rset_quit_applies_deletions_only_at_quit():
    c, h = logged_in()
    assert status(run(c, b"DELE 1", b"DELE 1", b"RETR 1", b"LIST 1")) == ["+OK ", "-ERR", "-ERR", "-ERR"]
    assert run(c, b"STAT").startswith(b"+OK 2 ")
    assert status(run(c, b"RSET")) == ["+OK "]
    assert run(c, b"STAT").startswith(b"+OK 3 ")
    run(c, b"DELE 3", b"DELE 1")
    assert run(c, b"UIDL") == b"+OK 1 messages\r\n2 u2\r\n.\r\n"  # numbers do not shift
    assert h.drop.committed is None
    assert run(c, b"QUIT") == b"+OK Bye, 2 messages deleted\r\n"
    assert h.drop.committed == ["u1", "u3"] and h.drop.released == 1 and c.closed


def test_lost_connection_deletes_nothing_and_releases():
    c, h = logged_in()
    run(c, b"DELE 1")
    c.receive_data(b"")  # end of stream
    assert h.drop.committed is None and h.drop.released == 1 and c.closed


def test_quit_before_login():
    c = POP3Connection(Handler())
    assert run(c, b"QUIT") == b"+OK Bye\r\n" and c.closed


def test_mailbox_in_use():
    h = Handler()
    h.locked = True
    c = POP3Connection(h)
    out = run(c, b"USER bob", b"PASS pw pw pw")
    assert b"-ERR [IN-USE]" in out and c.maildrop is None


def b64(s):
    return base64.b64encode(s)


@pytest.mark.parametrize("lines,last", [
    ([b"AUTH PLAIN " + b64(b"\0bob\0pw pw pw")], b"+OK Logged in"),
    ([b"AUTH PLAIN", b64(b"\0bob\0pw pw pw")], b"+OK Logged in"),
    ([b"AUTH PLAIN", b"*"], b"-ERR"),
    ([b"AUTH PLAIN " + b64(b"\0bob\0bad")], b"-ERR [AUTH]"),
    ([b"AUTH PLAIN !!"], b"-ERR"),
    ([b"AUTH LOGIN"], b"-ERR"),
])
def test_sasl_plain(lines, last):
    c = POP3Connection(Handler())
    out = run(c, *lines)
    assert out.split(b"\r\n")[-2].startswith(last)


def test_auth_without_argument_lists_mechanisms():
    c = POP3Connection(Handler())
    assert run(c, b"AUTH") == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"


def test_over_long_line_read_to_end():
    c, _ = logged_in()
    assert c.receive_data(b"NOOP " + b"x" * (MAX_COMMAND_LINE * 2)) == []
    assert status(run(c, b"yyy", b"NOOP")) == ["-ERR", "+OK"]


def test_bad_command_budget():
    c = POP3Connection(Handler(), max_bad_commands=3)
    out = run(c, b"X", b"Y", b"Z", b"NOOP")
    assert status(out) == ["-ERR"] * 3 and c.closed


def test_byte_by_byte_and_pipelined_match():
    stream = b"USER bob\r\nPASS pw pw pw\r\nSTAT\r\nUIDL\r\nRETR 2\r\nTOP 3 1\r\nDELE 2\r\nQUIT\r\n"
    a = POP3Connection(Handler())
    whole = flat(a.receive_data(stream))
    b = POP3Connection(Handler())
    pieces = b"".join(flat(b.receive_data(stream[i:i + 1])) for i in range(len(stream)))
    assert whole == pieces and whole.endswith(b"+OK Bye, 1 messages deleted\r\n")


def test_random_bytes_never_crash():
    rnd = random.Random(3)
    for _ in range(200):
        c = POP3Connection(Handler())
        for _ in range(8):
            chunk = bytes(rnd.choice(b"\r\n USERPASLITRDEQ0123bob pw\x00\xff") for _ in range(rnd.randint(1, 60)))
            out = flat(c.receive_data(chunk))
            assert all(ln.startswith((b"+OK", b"-ERR", b"+ ")) or ln in (b"", b".") or ln[:1].isalnum()
                       for ln in out.split(b"\r\n"))


def test_auth_plain_as_another_identity_is_refused():
    c = POP3Connection(Handler())
    token = base64.b64encode(b"alice\0bob\0pw pw pw")
    assert run(c, b"AUTH PLAIN " + token).startswith(b"-ERR [AUTH]")
    assert run(c, b"AUTH PLAIN " + base64.b64encode(b"bob\0bob\0pw pw pw")).startswith(b"+OK Logged in")


def test_a_bug_in_one_command_is_an_error_reply_and_the_session_goes_on():
    h = Handler()
    c = POP3Connection(h)
    h.drop.iter_message = lambda uid: 1 / 0
    out = run(c, b"USER bob", b"PASS pw pw pw", b"TOP 1 0", b"STAT")
    assert b"-ERR [SYS/TEMP] Internal error" in out and out.endswith(b"+OK 3 " + str(sum(map(len, MSGS.values()))).encode() + b"\r\n")
    assert not c.closed


def test_an_http_request_from_a_browser_is_hung_up_on():
    h = Handler()
    c = POP3Connection(h)
    out = run(c, b"POST / HTTP/1.1", b"Host: x", b"", b"USER bob", b"PASS pw pw pw", b"DELE 1", b"QUIT")
    assert out.startswith(b"-ERR") and out.count(b"\r\n") == 1 and c.closed
    assert h.drop.committed is None
