"""User accounts, stored in the KV store: shared by the web frontends and the
mail servers (SMTP AUTH, POP3 log-in), so both check passwords the same way.

Layout (one row per account, so every account operation is one atomic row):

    row  acct/<username>
      pw        "scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>"   (created with PUTNX: sign-up is atomic)
      created   unix seconds, ASCII
      admin     "1" for administrators (absent otherwise)

Usernames are also mail addresses (`<username>@<mail domain>`), so they are
restricted to what is safe in both: 1 to 32 characters, lowercase ASCII
letters, digits, '.', '_' and '-', starting with a letter or digit, not ending
with '.', no '..'. Input is lower-cased first, so "Alice" and "alice" are one
account. A few names that mail systems reserve cannot be taken.

Passwords: 8 to 1024 characters (any Unicode), salted and hashed with
`hashlib.scrypt`. `verify` costs the same for an unknown user as for a wrong
password, so timing does not tell which accounts exist.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
import time

from src.kv import KV, Exists, Mismatch, NotFound

USERNAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,30}[a-z0-9_-])?$")
RESERVED = frozenset({"postmaster", "mailer-daemon", "abuse", "root", "nobody", "noreply"})
ADMIN_USER = "admin"          # the administrator's account; every frontend makes sure it exists
POSTMASTER_USER = ADMIN_USER  # who reads mail to postmaster@ (RFC 5321 4.5.1), by SMTP or webmail
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32


class AccountError(Exception):
    """A user-facing problem with an account request; str() is the message to show."""


class InvalidUsername(AccountError):
    pass


class InvalidPassword(AccountError):
    pass


class UsernameTaken(AccountError):
    pass


class WrongPassword(AccountError):
    pass


def normalize_username(name: str) -> str:
    """The canonical form of a username; InvalidUsername if it can never be one."""
    u = name.strip().lower()
    if not USERNAME_RE.match(u) or ".." in u:
        raise InvalidUsername(
            "Usernames are 1-32 characters: letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, not ending with '.'.")
    return u


def mail_login_name(name: str, domain: str) -> str:
    """A mail client's user name as the username it means: Thunderbird's
    account wizard and most phones try the whole address first, so
    `alice@penncloud.local` is `alice` (another domain's address is left as
    it is, and fails as any unknown name does)."""
    local, at, host = name.strip().rpartition("@")
    if at and host.lower().rstrip(".") == domain.lower():
        return local
    return name


def check_password_rules(password: str) -> None:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidPassword(f"Passwords are {MIN_PASSWORD} to {MAX_PASSWORD} characters long.")


# scrypt takes 16 MiB and a core for ~50 ms. More at once than there are
# cores is no faster, and each thread's 16 MiB stays in the process (malloc
# keeps it): a burst of log-ins over the LB's 32 pooled connections took a
# frontend from 44 to 500 MB. So a process runs at most this many at once.
_SCRYPT_SLOTS = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    with _SCRYPT_SLOTS:
        return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen)


def hash_password(password: str, salt: bytes | None = None, n: int = SCRYPT_N) -> str:
    salt = salt if salt is not None else os.urandom(16)
    digest = _scrypt(password, salt, n, SCRYPT_R, SCRYPT_P, SCRYPT_LEN)
    return f"scrypt${n}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, record: str) -> bool:
    try:
        scheme, n, r, p, salt, want = record.split("$")
        if scheme != "scrypt":
            return False
        got = _scrypt(password, bytes.fromhex(salt), int(n), int(r), int(p), len(want) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), want)


# Hashed once per process, so verifying an unknown user costs one scrypt too.
_DUMMY_RECORD = hash_password("not a password", salt=b"\0" * 16)


def _row(username: str) -> bytes:
    return b"acct/" + username.encode()


class Accounts:
    """Account operations over any `KV` (the cluster client, or MemoryKV in tests)."""

    def __init__(self, kv: KV):
        self.kv = kv

    def create(self, username: str, password: str, admin: bool = False) -> str:
        """Make an account; returns the canonical username.

        Raises InvalidUsername, InvalidPassword or UsernameTaken.
        """
        u = normalize_username(username)
        if u in RESERVED:
            raise UsernameTaken("That name is reserved.")
        check_password_rules(password)
        row = _row(u)
        try:
            self.kv.putnx(row, b"pw", hash_password(password).encode())
        except Exists:
            raise UsernameTaken("That username is taken.") from None
        self.kv.put(row, b"created", str(int(time.time())).encode())
        if admin:
            self.kv.put(row, b"admin", b"1")
        return u

    def exists(self, username: str) -> bool:
        try:
            u = normalize_username(username)
        except InvalidUsername:
            return False
        try:
            self.kv.get(_row(u), b"pw")
            return True
        except NotFound:
            return False

    def verify(self, username: str, password: str) -> str | None:
        """The canonical username if the password is right, else None.

        Takes one scrypt whether or not the account exists.
        """
        try:
            u = normalize_username(username)
            record = self.kv.get(_row(u), b"pw").decode()
        except (InvalidUsername, NotFound, UnicodeDecodeError):
            password_matches(password, _DUMMY_RECORD)
            return None
        return u if password_matches(password, record) else None

    def change_password(self, username: str, old: str, new: str) -> None:
        """Set a new password if `old` is right (WrongPassword otherwise)."""
        u = normalize_username(username)
        check_password_rules(new)
        row = _row(u)
        try:
            record = self.kv.get(row, b"pw")
        except NotFound:
            raise WrongPassword("The current password is not right.") from None
        if not password_matches(old, record.decode()):
            raise WrongPassword("The current password is not right.")
        try:
            # CPUT: a concurrent change of the same password makes one of them fail.
            self.kv.cput(row, b"pw", record, hash_password(new).encode())
        except (Mismatch, NotFound):
            raise WrongPassword("The password was changed meanwhile; try again.") from None

    def is_admin(self, username: str) -> bool:
        try:
            return self.kv.get(_row(normalize_username(username)), b"admin") == b"1"
        except (NotFound, InvalidUsername):
            return False

    def ensure_admin(self, username: str, password: str) -> bool:
        """Create the admin account if it does not exist; True if it was created."""
        u = normalize_username(username)
        row = _row(u)
        try:
            self.kv.putnx(row, b"pw", hash_password(password).encode())
        except Exists:
            self.kv.put(row, b"admin", b"1")
            return False
        self.kv.put(row, b"created", str(int(time.time())).encode())
        self.kv.put(row, b"admin", b"1")
        return True
