"""The pure SMTP state machine: every verb, wrong order, limits, DATA framing, smuggling, AUTH."""

import base64
import random

import pytest

from smtp.smtp_proto import MAX_COMMAND_LINE, MAX_RECIPIENTS, MAX_TEXT_LINE, Reply, SMTPConnection


class Handler:
    """Accepts @here.test recipients, others only after AUTH; records delivered messages."""

    def __init__(self):
        self.delivered = []
        self.auth_calls = []

    def handle_AUTH(self, session, username, password):
        self.auth_calls.append(username)
        return "alice" if (username, password) == ("alice", "secret pw") else None

    def handle_MAIL(self, session, envelope, address):
        return Reply(250, "2.1.0 OK")

    def handle_RCPT(self, session, envelope, address):
        if address.endswith("@here.test") or session.auth_user:
            return Reply(250, "2.1.5 OK")
        return Reply(554, "5.7.1 relay access denied")

    def handle_DATA(self, session, envelope):
        self.delivered.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return Reply(250, "2.0.0 OK")


def new(max_bytes=10_000, **kw):
    h = Handler()
    return SMTPConnection(h, hostname="mx.here.test", peer_ip="127.0.0.1", max_message_bytes=max_bytes, **kw), h


def codes(out: bytes) -> list[int]:
    """The code of each final reply line."""
    return [int(ln[:3]) for ln in out.split(b"\r\n") if ln[3:4] == b" "]


def feed_lines(c, *lines):
    return codes(c.receive_data(b"".join(ln + b"\r\n" for ln in lines)))


def test_greeting_and_ehlo_lists_extensions():
    c, _ = new()
    assert c.greeting().startswith(b"220 mx.here.test ESMTP")
    out = c.receive_data(b"EHLO client.test\r\n")
    assert out.startswith(b"250-mx.here.test\r\n")
    for ext in (b"PIPELINING", b"SIZE 10000", b"8BITMIME", b"AUTH PLAIN LOGIN", b"ENHANCEDSTATUSCODES"):
        assert ext in out
    assert out.endswith(b"250 HELP\r\n")


def test_full_transaction_and_dot_unstuffing():
    c, h = new()
    out = feed_lines(c, b"HELO client", b"MAIL FROM:<a@x.test>", b"RCPT TO:<bob@here.test>", b"DATA")
    assert out == [250, 250, 250, 354]
    assert codes(c.receive_data(b"Subject: hi\r\n\r\n..leading dot\r\n.\r\n")) == [250]
    assert h.delivered == [("a@x.test", ["bob@here.test"], b"Subject: hi\r\n\r\n.leading dot\r\n")]
    # the session goes on: a second transaction, null sender
    assert feed_lines(c, b"MAIL FROM:<>", b"RCPT TO:<bob@here.test>", b"DATA", b".") == [250, 250, 354, 250]
    assert h.delivered[1] == ("", ["bob@here.test"], b"")
    assert feed_lines(c, b"QUIT") == [221] and c.closed


@pytest.mark.parametrize("lines,expect", [
    ([b"MAIL FROM:<a@x.test>"], [503]),                       # before HELO
    ([b"HELO c", b"RCPT TO:<b@here.test>"], [250, 503]),      # RCPT before MAIL
    ([b"HELO c", b"DATA"], [250, 503]),                       # DATA before MAIL
    ([b"HELO c", b"MAIL FROM:<a@x.test>", b"DATA"], [250, 250, 503]),  # DATA without RCPT
    ([b"HELO c", b"MAIL FROM:<a@x.test>", b"MAIL FROM:<a@x.test>"], [250, 250, 503]),  # nested
    ([b"HELO c", b"MAIL FROM:<a@x.test>", b"RSET", b"RCPT TO:<b@here.test>"], [250, 250, 250, 503]),
    ([b"HELO"], [501]), ([b"EHLO"], [501]),
    ([b"HELO c", b"MAIL FROM:a@x.test SIZE=1"], [250, 555]),   # params need EHLO
    ([b"EHLO c", b"MAIL FROM:<a@x.test> SIZE=99999"], [250, 552]),
    ([b"EHLO c", b"MAIL FROM:<a@x.test> BODY=8BITMIME SIZE=100"], [250, 250]),  # Thunderbird
    ([b"EHLO c", b"MAIL FROM:<a@x.test> BODY=BINARYMIME"], [250, 501]),
    ([b"EHLO c", b"MAIL FROM:<a@x.test> FOO=1"], [250, 555]),
    ([b"EHLO c", b"MAIL FROM:<not an address>"], [250, 501]),
    ([b"EHLO c", b"MAIL TO:<a@x.test>"], [250, 501]),
    ([b"EHLO c", b"MAIL FROM:<a@x.test", b"NOOP"], [250, 501, 250]),
    ([b"EHLO c", b"MAIL FROM:<@relay.test:a@x.test>", b"RCPT TO:<>"], [250, 250, 501]),
    ([b"EHLO c", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@elsewhere.test>"], [250, 250, 554]),
    ([b"EHLO c", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@here.test> NOTIFY=NEVER"], [250, 250, 555]),
    ([b"NOOP", b"VRFY bob", b"VRFY", b"EXPN list", b"HELP", b"RSET", b"RSET x"], [250, 252, 501, 502, 214, 250, 501]),
    ([b"FOO", b"STARTTLS", b"mail from:<a@x.test>"], [500, 500, 503]),
    ([b"helo c", b"mail from:<a@x.test>", b"rcpt to:<b@here.test>", b"data"], [250, 250, 250, 354]),
    ([b"EHLO c", b"DATA x"], [250, 501]),
])
def test_order_and_syntax(lines, expect):
    c, _ = new()
    assert feed_lines(c, *lines) == expect


def test_pipelining_one_write_many_replies():
    c, h = new()
    out = c.receive_data(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@here.test>\r\nRCPT TO:<c@here.test>\r\n"
                         b"DATA\r\nhello\r\n.\r\nQUIT\r\n")
    assert codes(out) == [250, 250, 250, 250, 354, 250, 221]
    assert h.delivered == [("a@x.test", ["b@here.test", "c@here.test"], b"hello\r\n")]


def test_byte_by_byte_gives_the_same_result():
    stream = (b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@here.test>\r\nDATA\r\n"
              b"line one\r\n..two\r\n\r\n.\r\nQUIT\r\n")
    c1, h1 = new()
    whole = c1.receive_data(stream)
    c2, h2 = new()
    pieces = b"".join(c2.receive_data(stream[i:i + 1]) for i in range(len(stream)))
    assert whole == pieces and h1.delivered == h2.delivered == [("a@x.test", ["b@here.test"], b"line one\r\n.two\r\n\r\n")]


def start_data(c):
    assert feed_lines(c, b"EHLO c", b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@here.test>", b"DATA") == [250, 250, 250, 354]


@pytest.mark.parametrize("attack", [
    b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n",
])
def test_smuggling_bare_lf_or_cr_does_not_end_data(attack):
    c, h = new()
    start_data(c)
    body = b"Subject: x\r\n\r\nbefore" + attack + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@here.test>\r\nDATA\r\nforged\r\n"
    out = c.receive_data(body)
    assert out == b""  # nothing ended: no reply yet
    assert codes(c.receive_data(b".\r\n")) == [250]
    assert len(h.delivered) == 1
    stored = h.delivered[0][2]
    assert b"MAIL FROM:<evil@x.test>" in stored  # it is content, not a command
    # stored mail has only CRLF line ends
    assert b"\r\n" in stored and stored.replace(b"\r\n", b"").count(b"\n") == 0
    assert stored.replace(b"\r\n", b"").count(b"\r") == 0


def test_only_crlf_dot_crlf_ends_data_even_split_across_reads():
    c, h = new()
    start_data(c)
    assert c.receive_data(b"abc\r") == b""
    assert c.receive_data(b"\n.") == b""
    assert c.receive_data(b"\r") == b""
    assert codes(c.receive_data(b"\n")) == [250]
    assert h.delivered[0][2] == b"abc\r\n"


def test_over_long_command_line_is_read_to_its_end_then_refused():
    c, _ = new()
    long = b"NOOP " + b"x" * (MAX_COMMAND_LINE * 3)
    assert c.receive_data(long[:600]) == b""
    assert c.receive_data(long[600:]) == b""
    assert codes(c.receive_data(b"\r\nNOOP\r\n")) == [500, 250]  # the tail was not taken as a command
    ok_line = b"VRFY " + b"a" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(ok_line) == MAX_COMMAND_LINE and codes(c.receive_data(ok_line)) == [252]
    assert codes(c.receive_data(b"VRFY " + b"a" * (MAX_COMMAND_LINE - 6) + b"\r\n")) == [500]


def test_over_long_text_line_refuses_the_message_after_its_end():
    c, h = new(max_bytes=100_000)
    start_data(c)
    assert c.receive_data(b"ok\r\n" + b"y" * (MAX_TEXT_LINE * 5)) == b""
    assert codes(c.receive_data(b"\r\nmore\r\n.\r\n")) == [500]
    assert h.delivered == []
    c.receive_data(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@here.test>\r\nDATA\r\n")
    exact = b"z" * (MAX_TEXT_LINE - 2) + b"\r\n"
    assert codes(c.receive_data(exact + b".\r\n")) == [250] and h.delivered[0][2] == exact


def test_text_line_limit_does_not_count_the_dot_added_for_transparency():
    """RFC 5321 4.5.3.1.6: 1000 octets with CRLF, not counting a stuffed dot.
    A 998-octet line that begins with "." travels as 999 octets + CRLF."""
    c, h = new(max_bytes=100_000)
    start_data(c)
    line = b"." + b"a" * (MAX_TEXT_LINE - 3)                  # 998 octets as written
    assert c.receive_data(b"." + line[:500]) == b""            # arrives in two pieces
    assert codes(c.receive_data(line[500:] + b"\r\n.\r\n")) == [250]
    assert h.delivered[0][2] == line + b"\r\n"
    c.receive_data(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@here.test>\r\nDATA\r\n")
    assert codes(c.receive_data(b"." + line + b"b\r\n.\r\n")) == [500]   # one octet more


def test_message_over_size_cap_is_read_to_end_then_552():
    c, h = new(max_bytes=1000)
    start_data(c)
    out = b"".join(c.receive_data(b"x" * 98 + b"\r\n") for _ in range(30))
    assert out == b""
    assert codes(c.receive_data(b".\r\nNOOP\r\n")) == [552, 250]
    assert h.delivered == []


def test_too_many_recipients():
    c, _ = new()
    feed_lines(c, b"EHLO c", b"MAIL FROM:<a@x.test>")
    got = feed_lines(c, *[b"RCPT TO:<u%d@here.test>" % i for i in range(MAX_RECIPIENTS + 1)])
    assert got == [250] * MAX_RECIPIENTS + [452]


def test_bad_command_budget_closes_with_421():
    c, _ = new(max_bad_commands=5)
    got = feed_lines(c, *[b"BOGUS"] * 6)
    assert got == [500, 500, 500, 500, 421] and c.closed
    assert c.receive_data(b"NOOP\r\n") == b""


def test_error_budget_is_reset_by_each_delivery():
    """An MTA reusing one connection for list mail meets refused recipients in
    every message: that is not a misbehaving client while mail gets delivered."""
    c, h = new(max_bad_commands=5)
    feed_lines(c, b"EHLO mta.test")
    for i in range(10):
        got = feed_lines(c, b"MAIL FROM:<list@x.test>", b"RCPT TO:<b@here.test>",
                         b"RCPT TO:<gone1@else.test>", b"RCPT TO:<gone2@else.test>", b"DATA")
        assert got == [250, 250, 554, 554, 354], (i, got)
        assert feed_lines(c, b"Subject: %d" % i, b"", b"x", b".") == [250]
    assert len(h.delivered) == 10 and not c.closed
    assert feed_lines(c, *[b"RCPT TO:<x@else.test>"] * 5)[-1] == 421   # errors alone still end it


def test_auth_plain_as_another_identity_is_refused():
    c, h = new()
    feed_lines(c, b"EHLO c")
    assert feed_lines(c, b"AUTH PLAIN " + b64(b"bob\0alice\0secret pw")) == [535]
    assert feed_lines(c, b"AUTH PLAIN " + b64(b"alice\0alice\0secret pw")) == [235]


def test_timeout_reply():
    c, _ = new()
    assert c.timeout().startswith(b"421 4.4.2") and c.closed


def b64(s: bytes) -> bytes:
    return base64.b64encode(s)


def test_auth_plain_initial_response_and_relay():
    c, h = new()
    assert feed_lines(c, b"EHLO c", b"MAIL FROM:<alice@here.test>", b"RCPT TO:<x@far.test>", b"RSET") == [250, 250, 554, 250]
    assert feed_lines(c, b"AUTH PLAIN " + b64(b"\0alice\0secret pw")) == [235]
    assert c.session.auth_user == "alice"
    assert feed_lines(c, b"AUTH PLAIN " + b64(b"\0alice\0secret pw")) == [503]
    assert feed_lines(c, b"MAIL FROM:<alice@here.test>", b"RCPT TO:<x@far.test>") == [250, 250]


@pytest.mark.parametrize("dialogue,expect", [
    ([b"AUTH PLAIN", b64(b"\0alice\0secret pw")], [334, 235]),
    ([b"AUTH PLAIN", b"="], [334, 501]),
    ([b"AUTH LOGIN", b64(b"alice"), b64(b"secret pw")], [334, 334, 235]),
    ([b"AUTH LOGIN " + b64(b"alice"), b64(b"secret pw")], [334, 235]),
    ([b"AUTH LOGIN", b64(b"alice"), b64(b"wrong")], [334, 334, 535]),
    ([b"AUTH PLAIN " + b64(b"\0alice\0wrong")], [535]),
    ([b"AUTH PLAIN", b"*"], [334, 501]),
    ([b"AUTH PLAIN", b"!!notbase64"], [334, 501]),
    ([b"AUTH CRAM-MD5"], [504]),
    ([b"AUTH PLAIN " + b64(b"\xff\0\xff")], [501]),
])
def test_auth_dialogues(dialogue, expect):
    c, _ = new()
    feed_lines(c, b"EHLO c")
    assert feed_lines(c, *dialogue) == expect
    assert feed_lines(c, b"NOOP") == [250]


def test_auth_needs_ehlo_and_not_inside_a_transaction():
    c, _ = new()
    assert feed_lines(c, b"HELO c", b"AUTH PLAIN " + b64(b"\0alice\0secret pw")) == [250, 503]
    assert feed_lines(c, b"EHLO c", b"MAIL FROM:<a@x.test>", b"AUTH PLAIN " + b64(b"\0alice\0secret pw")) == [250, 250, 503]


def test_failed_auth_counts_against_the_budget():
    c, h = new(max_bad_commands=3)
    feed_lines(c, b"EHLO c")
    bad = b"AUTH PLAIN " + b64(b"\0alice\0nope")
    assert feed_lines(c, bad, bad, bad) == [535, 535, 421] and c.closed


def test_random_bytes_never_crash():
    rnd = random.Random(7)
    for _ in range(200):
        c, _ = new()
        for _ in range(10):
            chunk = bytes(rnd.choice(b"\r\n.:<>@ ABCDEFHILMOPRSTUVXmailfromrcptdata\x00\xff") for _ in range(rnd.randint(1, 80)))
            out = c.receive_data(chunk)
            assert all(200 <= code < 600 for code in codes(out))
            if c.closed:
                break


def test_non_ascii_addresses_are_refused_without_smtputf8():
    """SMTPUTF8 is not offered, so a UTF-8 address is 553 at MAIL or RCPT (the
    relay could not pass it on; it used to crash on one)."""
    c, _ = new()
    feed_lines(c, b"EHLO c")
    assert feed_lines(c, "MAIL FROM:<jösé@x.test>".encode()) == [553]
    assert feed_lines(c, b"MAIL FROM:<a@x.test>") == [250]
    assert feed_lines(c, "RCPT TO:<jösé@here.test>".encode(), b"RCPT TO:<b@here.test>") == [553, 250]


def test_domains_that_cannot_exist_are_refused_at_rcpt():
    c, _ = new()
    feed_lines(c, b"EHLO c", b"MAIL FROM:<a@x.test>")
    long_label = b"a" * 64
    assert feed_lines(c, b"RCPT TO:<x@a..here.test>", b"RCPT TO:<x@" + long_label + b".here.test>",
                      b"RCPT TO:<x@" + b"a" * 63 + b".here.test>",          # a name: the relay rule decides
                      b"RCPT TO:<b@here.test>") == [501, 501, 554, 250]


def test_a_bug_while_delivering_is_a_temporary_failure_and_the_session_goes_on():
    """An exception from the handler (a bug) is answered 451, so the client
    retries instead of losing its mail, and the connection stays usable."""
    c, h = new()
    calls = []

    def flaky(session, envelope):
        calls.append(envelope.content)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return Reply(250, "2.0.0 OK")
    h.handle_DATA = flaky
    assert feed_lines(c, b"EHLO c", b"MAIL FROM:<a@x.test>", b"RCPT TO:<bob@here.test>", b"DATA") == [250, 250, 250, 354]
    assert codes(c.receive_data(b"first\r\n.\r\n")) == [451]
    h.handle_RCPT = lambda *a: 1 / 0
    assert feed_lines(c, b"MAIL FROM:<a@x.test>", b"RCPT TO:<bob@here.test>") == [250, 451]
    h.handle_RCPT = Handler.handle_RCPT.__get__(h)
    assert feed_lines(c, b"RCPT TO:<bob@here.test>", b"DATA", b"second", b".") == [250, 354, 250]
    assert calls == [b"first\r\n", b"second\r\n"] and not c.closed


def test_an_http_request_from_a_browser_is_hung_up_on_before_its_body():
    """A web page can make a browser POST a form to port 2500: the header
    lines are fewer than the error budget, and the body would be read as
    SMTP (EHLO, MAIL, RCPT, DATA: mail to our users from someone else's
    browser). The request line ends the session."""
    c, h = new()
    out = c.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\n\r\nEHLO x\r\nMAIL FROM:<a@x.test>\r\n"
                         b"RCPT TO:<bob@here.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert codes(out) == [554] and c.closed and h.delivered == []
