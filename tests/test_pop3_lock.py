"""The POP3 mailbox lock cell: one holder at a time, released with CPUT, freed by expiry after a crash."""

from smtp.pop3_server import MailboxLock
from src.kv import MemoryKV


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_one_holder_release_and_reacquire():
    kv, clock = MemoryKV(), Clock()
    a, b = MailboxLock(kv, "bob", 60, clock), MailboxLock(kv, "bob", 60, clock)
    assert a.acquire()
    assert not b.acquire()
    assert MailboxLock(kv, "alice", 60, clock).acquire()  # other mailboxes are independent
    a.release()
    assert kv.get("maillock/bob", "pop3") == b""
    assert b.acquire()
    a.release()  # a stale holder's release does not free b's lock
    assert not MailboxLock(kv, "bob", 60, clock).acquire()


def test_crashed_holder_expires_and_renewal_keeps_it():
    kv, clock = MemoryKV(), Clock()
    dead = MailboxLock(kv, "bob", 60, clock)
    assert dead.acquire()  # ... and its process is SIGKILLed: no release
    other = MailboxLock(kv, "bob", 60, clock)
    clock.t += 59
    assert not other.acquire()
    clock.t += 2
    assert other.acquire()
    # the holder renews while active, so it is not taken from under it
    for _ in range(5):
        clock.t += 40
        other.renew()
    assert not MailboxLock(kv, "bob", 60, clock).acquire()
    dead.release()  # the old holder's late release changes nothing
    assert not MailboxLock(kv, "bob", 60, clock).acquire()


def test_a_restarted_pop3_process_takes_its_dead_predecessors_locks_at_once():
    """kill -9 of the POP3 process mid-session, then a restart under the same
    id: its users must not hear "mailbox in use" until the lock expires."""
    kv, clock = MemoryKV(), Clock()
    before = MailboxLock(kv, "bob", 630, clock, owner="pop3:0001")
    assert before.acquire()                                  # ... and the process dies
    same_process = MailboxLock(kv, "bob", 630, clock, owner="pop3:0001")
    assert not same_process.acquire()                        # a second session of a live process waits
    other_process = MailboxLock(kv, "bob", 630, clock, owner="pop3b:0002")
    assert not other_process.acquire()                       # another POP3 process's session is respected
    restarted = MailboxLock(kv, "bob", 630, clock, owner="pop3:0003")
    assert restarted.acquire()
    assert not MailboxLock(kv, "bob", 630, clock, owner="pop3:0003").acquire()


def test_a_session_that_lost_its_lock_while_paused_deletes_nothing_at_quit():
    """Gray-failure QA: a POP3 process paused past the lock's TTL resumed
    and committed its DELEs at QUIT, deleting messages the session that had
    taken the lock meanwhile had listed and was reading."""
    from smtp.pop3_proto import MailboxInUse
    from smtp.pop3_server import KVMaildrop
    from src.mailstore import MailStore
    kv, clock = MemoryKV(), Clock()
    store = MailStore(kv, clock=clock)
    ids = [store.deliver("bob", "Inbox", b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(3)]
    paused = MailboxLock(kv, "bob", 60, clock, owner="pop3b:0001")
    assert paused.acquire()
    drop = KVMaildrop(store, "bob", paused)
    clock.t += 61                                            # ... it stood still past the TTL
    other = MailboxLock(kv, "bob", 60, clock, owner="pop3:0002")
    assert other.acquire()                                   # another session has the mailbox now
    import pytest
    with pytest.raises(MailboxInUse):
        drop.commit(ids[:2])                                 # the paused one's QUIT
    assert len(store.list("bob", "Inbox")) == 3
    drop.release()
    assert not MailboxLock(kv, "bob", 60, clock, owner="pop3c:0003").acquire()  # the other session keeps it
    mine = KVMaildrop(store, "bob", other)
    assert mine.commit(ids[:1]) == 1 and len(store.list("bob", "Inbox")) == 2
