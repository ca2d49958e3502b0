"""Accounts: username rules, hashing, verification, password change."""

import pytest

from src.accounts import (Accounts, InvalidPassword, InvalidUsername, UsernameTaken, WrongPassword,
                          normalize_username)
from src.kv import MemoryKV


def test_create_verify_change():
    kv = MemoryKV()
    acc = Accounts(kv)
    assert acc.create("Alice", "correct horse") == "alice"
    assert b"correct horse" not in kv.get("acct/alice", "pw")
    assert acc.verify("ALICE", "correct horse") == "alice"
    assert acc.verify("alice", "wrong password") is None
    assert acc.verify("nobody", "correct horse") is None
    with pytest.raises(UsernameTaken):
        acc.create("alice", "another one")
    with pytest.raises(WrongPassword):
        acc.change_password("alice", "not it at all", "new password")
    acc.change_password("alice", "correct horse", "new password")
    assert acc.verify("alice", "correct horse") is None
    assert acc.verify("alice", "new password") == "alice"


def test_same_password_different_hash():
    kv = MemoryKV()
    acc = Accounts(kv)
    acc.create("a1", "same password")
    acc.create("b1", "same password")
    assert kv.get("acct/a1", "pw") != kv.get("acct/b1", "pw")


@pytest.mark.parametrize("name", ["", "a" * 33, "-abc", "a..b", "abc.", "al ice", "al/ice", "ali%ce",
                                  "élodie", "a@b"])
def test_bad_usernames(name):
    with pytest.raises(InvalidUsername):
        normalize_username(name)


def test_password_rules_and_reserved():
    acc = Accounts(MemoryKV())
    with pytest.raises(InvalidPassword):
        acc.create("bob", "short")
    with pytest.raises(UsernameTaken):
        acc.create("postmaster", "long enough pw")


def test_admin():
    acc = Accounts(MemoryKV())
    assert acc.ensure_admin("admin", "admin password") is True
    assert acc.ensure_admin("admin", "other password") is False
    assert acc.is_admin("admin") and acc.verify("admin", "admin password") == "admin"
    acc.create("carol", "carol password")
    assert not acc.is_admin("carol")


def test_no_more_scrypts_at_once_than_cores(monkeypatch):
    """Each scrypt takes 16 MiB that the process keeps: a burst of log-ins on
    32 threads took a frontend to 500 MB. At most one per core runs at once."""
    import hashlib
    import os
    import threading
    import time
    from src import accounts
    running, peak, lock = [0], [0], threading.Lock()
    real = hashlib.scrypt

    def counting(*a, **k):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        try:
            return real(*a, **k)
        finally:
            with lock:
                running[0] -= 1
    monkeypatch.setattr(accounts.hashlib, "scrypt", counting)
    record = accounts.hash_password("correct horse", n=2 ** 10)
    threads = [threading.Thread(target=accounts.password_matches, args=("correct horse", record)) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert 1 <= peak[0] <= max(1, os.cpu_count() or 1)
