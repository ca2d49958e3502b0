"""Slowing down password guessing, per account and per client address.

Used by the web log-in (each frontend), SMTP AUTH and POP3 log-ins (each
mail process): the same rule everywhere, or a guesser would simply use the
protocol without it. The rule (per process, in memory):

  * Failures are counted per key (`user:<name>` and `addr:<ip>`) and forgotten
    WINDOW_S after the last one.
  * The first FREE_FAILURES failures of an account (FREE_FAILURES_ADDR of an
    address, since many people may share one address) cost nothing.
  * After that, the key is locked for BASE_DELAY_S * 2**(extra failures - 1)
    seconds after each further failure, capped at MAX_DELAY_S. A log-in
    attempt during a lock is refused with 429 and Retry-After, without even
    checking the password, so no thread is held while waiting.
  * Every attempt is counted before the password is checked (guesses sent
    at the same moment cannot all get through); a successful one clears the
    account's count and takes its own count back from the address's.
  * An account is its name as typed at log-in, stripped and lower-cased:
    "Eve" and "eve" are one account, as they are to the store.

At most MAX_KEYS keys are remembered (least recently failed dropped first),
so the table cannot be grown without bound. With several frontends an
attacker gets each frontend's budget; the load balancer keeps a client on one
frontend, and the exponential delay keeps even a multiple small.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from typing import Callable

FREE_FAILURES = 5
FREE_FAILURES_ADDR = 20
BASE_DELAY_S = 1.0
MAX_DELAY_S = 60.0
WINDOW_S = 15 * 60.0
MAX_KEYS = 50_000


class Throttled(Exception):
    """A log-in attempt refused without checking the password: wait `wait_s`."""

    def __init__(self, wait_s: float):
        n = math.ceil(wait_s)
        super().__init__(f"Too many failed log-ins; try again in {n} second{'' if n == 1 else 's'}")
        self.wait_s = wait_s


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._fails: OrderedDict[str, tuple[int, float]] = OrderedDict()  # key -> (count, last failure)
        self._lock = threading.Lock()

    @staticmethod
    def _free(key: str) -> int:
        return FREE_FAILURES_ADDR if key.startswith("addr:") else FREE_FAILURES

    def _delay(self, key: str, count: int) -> float:
        extra = count - self._free(key)
        if extra <= 0:
            return 0.0
        return min(MAX_DELAY_S, BASE_DELAY_S * 2 ** (extra - 1))

    def _wait_locked(self, user: str, addr: str, now: float) -> float:
        wait = 0.0
        for key in (f"user:{user}", f"addr:{addr}"):
            entry = self._fails.get(key)
            if entry is None:
                continue
            count, last = entry
            if now - last > WINDOW_S:
                del self._fails[key]
                continue
            wait = max(wait, last + self._delay(key, count) - now)
        return max(0.0, wait)

    def _fail_locked(self, user: str, addr: str, now: float) -> None:
        for key in (f"user:{user}", f"addr:{addr}"):
            count, last = self._fails.pop(key, (0, now))
            if now - last > WINDOW_S:
                count = 0
            self._fails[key] = (count + 1, now)
        while len(self._fails) > MAX_KEYS:
            self._fails.popitem(last=False)

    def attempt(self, user: str, addr: str, verify: Callable[[], str | None]) -> str | None:
        """Run `verify()` (the password check: the canonical user or None) if
        `user` and `addr` are not locked; Throttled if they are.

        The attempt counts as a failure before the password is checked, and
        is taken back if it was right: checking first and counting after let
        guesses sent at the same moment all through (200 at once, 200
        checked). A success clears the account's count and takes back its
        own count from the address, so a class behind one address can log in
        all day."""
        key = user.strip().lower()[:64]
        with self._lock:
            wait = self._wait_locked(key, addr, self.clock())
            if wait > 0:
                raise Throttled(wait)
            self._fail_locked(key, addr, self.clock())
        who = verify()
        if who is not None:
            with self._lock:
                self._fails.pop(f"user:{key}", None)
                entry = self._fails.get(f"addr:{addr}")
                if entry is not None:
                    if entry[0] <= 1:
                        del self._fails[f"addr:{addr}"]
                    else:
                        self._fails[f"addr:{addr}"] = (entry[0] - 1, entry[1])
        return who
