"""The mail store over MemoryKV: delivery, listing, chunking, crash invariants, the relay queue."""

import threading

import pytest

from src.kv import MemoryKV
from src.mailfmt import FailedRecipient, bounce, summarize
from src.mailstore import MailStore, MailStoreError, NoSuchMessage

MSG = (b"From: Alice <alice@example.org>\r\nTo: bob@penncloud.local\r\n"
       b"Subject: =?utf-8?q?caf=C3=A9?= time\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
       b"Message-ID: <1@example.org>\r\n\r\nHello Bob\r\n.. dotted\r\n")


class Clock:
    def __init__(self, t=1_700_000_000.0):
        self.t = t

    def __call__(self):
        self.t += 0.001
        return self.t


@pytest.fixture
def store():
    return MailStore(MemoryKV(), chunk_bytes=16, clock=Clock())


def test_deliver_list_get_exact_bytes(store):
    mid = store.deliver("bob", "Inbox", MSG)
    [info] = store.list("bob", "Inbox")
    assert info.id == mid and info.size == len(MSG) and not info.read
    assert info.sender == "Alice <alice@example.org>" and info.subject == "café time"
    assert info.message_id == "<1@example.org>" and info.to == "bob@penncloud.local"
    assert info.chunks == -(-len(MSG) // 16)
    assert store.get_raw("bob", "Inbox", mid) == MSG
    assert b"".join(store.iter_raw("bob", "Inbox", mid)) == MSG
    assert store.list("bob", "Sent") == [] and store.list("alice", "Inbox") == []


def test_newest_first_and_ids_sort_by_time(store):
    ids = [store.deliver("bob", "Inbox", MSG + b"%d\r\n" % i) for i in range(5)]
    assert ids == sorted(ids)
    assert [m.id for m in store.list("bob", "Inbox")] == ids[::-1]


def test_empty_and_big_messages(store):
    e = store.deliver("bob", "Inbox", b"")
    assert store.get_raw("bob", "Inbox", e) == b"" and store.info("bob", "Inbox", e).size == 0
    big = bytes(range(256)) * 40
    b = store.deliver("bob", "Inbox", big)
    assert store.get_raw("bob", "Inbox", b) == big


def test_mark_read_delete_move(store):
    mid = store.deliver("bob", "Inbox", MSG)
    store.mark_read("bob", "Inbox", mid)
    assert store.info("bob", "Inbox", mid).read
    store.mark_read("bob", "Inbox", mid, False)
    assert not store.info("bob", "Inbox", mid).read
    store.move("bob", "Inbox", "Sent", mid)
    assert store.list("bob", "Inbox") == []
    assert store.get_raw("bob", "Sent", mid) == MSG
    store.delete("bob", "Sent", mid)
    assert store.list("bob", "Sent") == []
    assert store.kv.cols(f"mmsg/bob/{mid}") == []  # the body is gone too
    with pytest.raises(NoSuchMessage):
        store.get_raw("bob", "Sent", mid)
    with pytest.raises(NoSuchMessage):
        store.delete("bob", "Sent", mid)
    with pytest.raises(NoSuchMessage):
        store.mark_read("bob", "Inbox", "../x")


def test_bad_names_refused(store):
    with pytest.raises(MailStoreError):
        store.deliver("../bob", "Inbox", MSG)
    with pytest.raises(MailStoreError):
        store.deliver("Bob", "Inbox", MSG)
    with pytest.raises(MailStoreError):
        store.deliver("bob", "In/box", MSG)


def test_explicit_id_is_idempotent(store):
    a = store.deliver("bob", "Inbox", MSG, msg_id="bounce-1")
    b = store.deliver("bob", "Inbox", MSG, msg_id="bounce-1")
    assert a == b == "bounce-1" and len(store.list("bob", "Inbox")) == 1


class CrashAfter(MemoryKV):
    """A store that dies (raises) after `n` successful writes: a crash mid-delivery."""

    def __init__(self, n):
        super().__init__()
        self.left = n

    def _tick(self):
        if self.left == 0:
            raise ConnectionError("crash")
        self.left -= 1

    def put(self, *a):
        self._tick()
        super().put(*a)

    def putnx(self, *a):
        self._tick()
        super().putnx(*a)


@pytest.mark.parametrize("n", range(8))
def test_crash_mid_delivery_never_shows_half_a_message(n):
    kv = CrashAfter(n)
    store = MailStore(kv, chunk_bytes=32)
    msg = MSG * 3  # several chunks
    try:
        store.deliver("bob", "Inbox", msg)
    except ConnectionError:
        pass
    listed = store.list("bob", "Inbox")
    assert listed == [] or [store.get_raw("bob", "Inbox", m.id) for m in listed] == [msg]


def test_concurrent_delivery_to_one_mailbox_loses_nothing():
    store = MailStore(MemoryKV(), chunk_bytes=64)
    def worker(k):
        for i in range(25):
            store.deliver("bob", "Inbox", b"Subject: %d-%d\r\n\r\nx\r\n" % (k, i))
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    subjects = {m.subject for m in store.list("bob", "Inbox")}
    assert subjects == {f"{k}-{i}" for k in range(8) for i in range(25)}


def test_queue_claim_lease_retry_done(store):
    qid = store.enqueue_outgoing("alice", "alice@penncloud.local", ["x@remote.test", "y@remote.test"], MSG)
    [item] = store.queue()
    assert item.id == qid and item.rcpts == ("x@remote.test", "y@remote.test") and item.attempts == 0
    assert store.queue_raw(item) == MSG
    mine = store.claim(item, "w1", 30)
    assert mine and mine.lease_owner == "w1"
    assert store.claim(item, "w2", 30) is None  # stale view: someone changed it
    later = store.update(mine, rcpts=("y@remote.test",), next_at=123.0, attempts=1, last_error="451 busy",
                         lease_owner="", lease_until=0.0)
    assert later.rcpts == ("y@remote.test",) and later.attempts == 1 and later.lease_owner == ""
    assert store.update(mine, rcpts=()) is None  # an old copy cannot overwrite
    [now] = store.queue()
    assert now == later
    store.done(now)
    assert store.queue() == [] and store.kv.cols(f"mqmsg/{qid}") == []


def test_bounce_is_a_delivery_status_report():
    raw = bounce(domain="penncloud.local", to="alice@penncloud.local", original=MSG,
                 failed=[FailedRecipient("x@remote.test", "5.1.1", "550 5.1.1 no such user")],
                 now=1_700_000_000, reason="The remote server refused it.")
    import email
    from email import policy
    m = email.message_from_bytes(raw, policy=policy.default)
    assert m.get_content_type() == "multipart/report" and m.get_param("report-type") == "delivery-status"
    parts = [p.get_content_type() for p in m.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert b"Final-Recipient: rfc822; x@remote.test" in raw and b"Status: 5.1.1" in raw
    assert b"Hello Bob" not in raw  # the original's body is not sent back
    assert summarize(raw).subject == "Undelivered Mail Returned to Sender"


def test_small_messages_live_in_their_index_cell():
    kv = MemoryKV()
    store = MailStore(kv, chunk_bytes=1024, inline_bytes=len(MSG))
    small = store.deliver("bob", "Inbox", MSG)
    big = store.deliver("bob", "Inbox", MSG + b"x\r\n")
    assert store.info("bob", "Inbox", small).chunks == 0 and store.info("bob", "Inbox", big).chunks == 1
    assert kv.cols(f"mmsg/bob/{small}") == [] and kv.cols(f"mmsg/bob/{big}") != []
    store.mark_read("bob", "Inbox", small)
    store.move("bob", "Inbox", "Sent", small)
    [info] = store.list("bob", "Sent")
    assert info.read and info.subject == "café time" and store.get_raw("bob", "Sent", small) == MSG
    assert store.get_raw("bob", "Inbox", big) == MSG + b"x\r\n"
    store.delete("bob", "Sent", small)
    assert store.list("bob", "Sent") == []


@pytest.mark.parametrize("raw,want", [
    (b"Subject: a\r\n folded\r\n\tline\r\nFrom: x\r\n\r\nSubject: body\r\n", ("a folded line", "x")),
    (b"subject: \xc3\xa9t\xc3\xa9\r\nFROM:y\r\n\r\n", ("été", "y")),  # UTF-8 header (RFC 6532), any case
    (b"Subject: first\r\nSubject: second\r\n\r\n", ("first", "")),
    (b"Subject: =?iso-8859-1?q?caf=E9?= ok\nFrom: z\n\nbody", ("café ok", "z")),  # bare LF too
    (b"X-Other: 1\r\n\r\n", ("", "")),
    (b"no headers at all", ("", "")),
    (b"", ("", "")),
])
def test_summarize(raw, want):
    s = summarize(raw)
    assert (s.subject, s.sender) == want


@pytest.mark.parametrize("folder", ["Inbox\n", "", "../x", "a/b", "Inbox\x00", "x" * 65])
def test_bad_folder_names_are_refused(folder):
    from src.mailstore import BadFolder
    store = MailStore(MemoryKV())
    with pytest.raises(BadFolder):
        store.deliver("alice", folder, b"Subject: x\r\n\r\nbody\r\n")


def test_unread_count_follows_reads_moves_and_deletes_from_the_read_marks():
    kv = MemoryKV()
    store = MailStore(kv)
    a, b, c = (store.deliver("u", "Inbox", b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3))
    count = lambda folder="Inbox": store.unread_count(store.ids("u", folder), store.read_marks("u", folder))  # noqa: E731
    assert count() == 3                         # first call: the folder is indexed
    store.mark_read("u", "Inbox", a)
    store.mark_read("u", "Inbox", a)
    assert count() == 2
    store.mark_read("u", "Inbox", a, read=False)
    store.mark_read("u", "Inbox", b)
    assert count() == 2
    store.move("u", "Inbox", "Sent", b)         # a read message leaves: the count stays
    store.delete("u", "Inbox", c)               # an unread one goes: one less
    assert count() == 1 and count("Sent") == 0
    store.deliver("u", "Sent", b"Subject: mine\r\n\r\nx\r\n", read=True)
    assert count("Sent") == 0 and count() == 1


def test_healing_the_read_marks_never_undoes_another_tabs_read():
    """Crash QA round 2: a folder page read the flags, another tab opened a
    message (flag, then mark), and the page's heal, comparing its older flag
    with the newer mark, deleted the mark: one unread too many, for good.
    The page reads the marks first, and the flag again before a change."""
    kv = MemoryKV()
    store = MailStore(kv)
    ids = [store.deliver("u", "Inbox", b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3)]
    marks = store.read_marks("u", "Inbox")                # this page: marks, then flags ...
    shown = store.infos("u", "Inbox", ids)
    store.mark_read("u", "Inbox", ids[1])                 # ... another tab opens a message meanwhile ...
    store.heal_read_marks("u", "Inbox", shown, marks)     # ... then this page heals
    assert store.unread_count(store.ids("u", "Inbox"), store.read_marks("u", "Inbox")) == 2
    # and the other way round: the mark is older than the flag it disagrees with
    marks = store.read_marks("u", "Inbox")
    store.mark_read("u", "Inbox", ids[2])
    shown = store.infos("u", "Inbox", ids)
    kv.delete(b"mread/u/Inbox", ids[2].encode())          # as if the mark were lost to a crash
    store.heal_read_marks("u", "Inbox", shown, marks)
    assert store.unread_count(store.ids("u", "Inbox"), store.read_marks("u", "Inbox")) == 1


def test_a_mark_unread_inside_the_heal_does_not_leave_a_mark_behind():
    """Verification QA: a third tab's Mark unread landing between the heal's
    read of a flag and its write of the mark left a read mark on an unread
    message (the count one too low). The heal reads the flag again after
    writing and follows it."""
    class Interleaving(MemoryKV):
        hook = None

        def get(self, row, col):
            value = super().get(row, col)
            hook, self.hook = self.hook, None
            if hook is not None:
                hook()
            return value
    kv = Interleaving()
    store = MailStore(kv)
    mid = store.deliver("u", "Inbox", b"Subject: x\r\n\r\nx\r\n")
    store.read_marks("u", "Inbox")                       # index the folder
    marks = store.read_marks("u", "Inbox")
    store.mark_read("u", "Inbox", mid)                   # read in another tab: flag, then ...
    kv.delete(b"mread/u/Inbox", mid.encode())            # ... its mark lost (a crash)
    shown = store.infos("u", "Inbox", [mid])
    # the heal reads the flag (read), and right then a third tab marks it unread
    kv.hook = lambda: store.mark_read("u", "Inbox", mid, read=False)
    store.heal_read_marks("u", "Inbox", shown, marks)
    assert not store.info("u", "Inbox", mid).read
    assert store.unread_count(store.ids("u", "Inbox"), store.read_marks("u", "Inbox")) == 1
