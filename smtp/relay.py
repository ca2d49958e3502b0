"""The relay worker: delivers queued mail to other domains, retries, bounces.

The queue lives in the KV store (src/mailstore.py, row `mailq`), so any number
of SMTP servers and frontends add to it and a relay worker anywhere takes
from it. An item goes through these states (docs/mail.md draws them):

    queued --claim (CPUT: lease)--> attempting --all delivered--> done (cell and body removed)
       ^                               |   \\--5xx / time up--> bounce pending --bounce delivered--> ...
       +---- next_at = now + back-off -+ 4xx, network or DNS trouble

- A relay process runs WORKERS workers, each a thread with its own id
  (`<relay_id>.<i>`), so that a remote server that never answers holds up
  one of them, not everybody's mail.
- Claiming is a CPUT that sets `lease_owner`/`lease_until`: one worker at a
  time attempts an item. A worker SIGKILLed mid-delivery leaves its lease
  behind; the restarted worker (same config id, new incarnation) knows the
  lease is its dead predecessor's and takes the item at once, any other
  worker once the lease has run out. Mail is thus delivered at least once,
  never lost: a crash after the remote 250 but before the queue was updated
  sends it again.
- Each attempt resolves the recipients' domains (smtp/mx.py: MX, then A/AAAA),
  tries the hosts in order, and sorts each recipient by the reply: 2xx
  delivered, 5xx failed for good, 4xx / network / DNS trouble tried again
  after `retry_initial_s * 2**attempts` (at most MAX_BACKOFF_S), until
  `retry_for_s` after queueing, when they fail too (status 4.4.7).
- Failed recipients get one delivery status notification (src/mailfmt.bounce)
  in the sender's Inbox. The bounce's message id is chosen and written into
  the queue item *before* the bounce is delivered, and delivery with an
  explicit id is idempotent, so a crash in between never bounces twice.
  Mail with the null sender <> is never bounced (no bounce loops).
- Between passes the worker also sweeps orphaned message bodies (a crash
  between a body row and its index cell leaves one; src/mailsweep.py): a
  round every `sweep_every_s`, done a few seconds per loop turn so queued
  mail never waits long behind it.
"""

from __future__ import annotations

import logging
import os
import re
import smtplib
import socket
import threading
import time
from typing import Callable

from smtp.mx import DNSError, mail_hosts, make_resolver
from src import mailfmt
from src.kv import KVError, NotFound
from src.mailstore import MailStore, MailStoreError, QueueItem
from src.mailsweep import SWEEP_BUDGET_S, SWEEP_EVERY_S, MailSweeper, SweepStats, lister_for
from src.process import wait_for

log = logging.getLogger(__name__)

LEASE_S = 600.0  # longer than any one attempt can take (ATTEMPT_S)
ATTEMPT_S = LEASE_S / 2  # one attempt at an item, all its domains and hosts, is cut off after this
POLL_S = 1.0
WORKERS = 4  # worker threads per relay process: a silent remote server holds up one of them
MAX_BACKOFF_S = 4 * 3600.0
SMTP_TIMEOUT_S = 60.0  # for each reply; a server that drips bytes is cut off by ATTEMPT_S
MAX_HOSTS = 5  # MX addresses tried per domain and attempt

_ENHANCED_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


class HostTrouble(Exception):
    """This host could not take the message now (greeting refused): try the next one."""


def status_of(code: int, text: str) -> str:
    """The enhanced status code in a reply, or one made from its first digit."""
    m = _ENHANCED_RE.match(text)
    return m.group(1) if m else f"{code // 100}.0.0"


class LeaseLost(Exception):
    """The queue item's lease ran out and another worker took it."""


class RelayWorker:
    """Takes due items from the queue and delivers them; `run(stop)` loops until `stop` is set."""

    def __init__(self, store: MailStore, *, domain: str, worker_id: str, resolver: str = "", relay_port: int = 25,
                 retry_initial_s: float = 60.0, retry_for_s: float = 4 * 24 * 3600.0, lease_s: float = LEASE_S,
                 poll_s: float = POLL_S, smtp_timeout_s: float = SMTP_TIMEOUT_S, attempt_s: float = ATTEMPT_S,
                 clock: Callable[[], float] = time.time, sweeper: MailSweeper | None = None,
                 sweep_every_s: float = SWEEP_EVERY_S, sweep_budget_s: float = SWEEP_BUDGET_S):
        self.store = store
        self.domain = domain
        self.worker_id = worker_id
        self.owner = f"{worker_id}:{os.urandom(4).hex()}"  # this incarnation
        self.siblings: frozenset[str] = frozenset({self.owner})  # the owners of this process's workers
        # Domains some worker of this process is delivering to right now
        # (shared between siblings): one silent or slow remote server then
        # ties up one worker, however many messages wait for it.
        self.busy: set[str] = set()
        self.busy_lock = threading.Lock()
        self.resolver = make_resolver(resolver)
        self.relay_port = relay_port
        self.retry_initial_s = retry_initial_s
        self.retry_for_s = retry_for_s
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.smtp_timeout_s = smtp_timeout_s
        self.attempt_s = min(attempt_s, lease_s / 2)  # the lease outlives the attempt: never two at once
        self.clock = clock
        self.sweeper = sweeper
        self.sweep_every_s = sweep_every_s
        self.sweep_budget_s = sweep_budget_s
        self._next_sweep_at = 0.0  # the first round starts at once
        self._stop: threading.Event | None = None
        self._cut_in_flight: Callable[[str], None] | None = None   # ends the delivery under way

    # -- the loop ------------------------------------------------------------------

    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def abort(self) -> None:
        """Cut the delivery under way, if any (the relay is stopping)."""
        cut = self._cut_in_flight
        if cut is not None:
            cut("the relay is stopping")

    def run(self, stop: threading.Event) -> None:
        self._stop = stop
        while True:
            for job in (self.run_once, self.sweep_if_due):
                try:
                    job()
                except (KVError, MailStoreError, OSError) as e:
                    log.warning("relay %s failed (will try again): %s", job.__name__, e)
                except Exception:
                    log.exception("relay %s failed with a bug (will try again)", job.__name__)
            if stop.wait(self.poll_s):
                return

    def run_once(self) -> int:
        """One pass over the queue; returns how many items this worker handled."""
        n = 0
        for item in self.store.queue():
            if self._stopping():
                break
            if not self._claimable(item, self.clock()):
                continue
            domains = {r.rpartition("@")[2].lower() for r in item.rcpts}
            with self.busy_lock:
                if domains & self.busy:
                    continue  # a sibling is at one of its servers now: later
                self.busy |= domains
            try:
                n += self._claim_and_process(item)
            finally:
                with self.busy_lock:
                    self.busy -= domains
        return n

    def _claim_and_process(self, item: QueueItem) -> int:
        """1 if this worker took `item` and tried it, else 0."""
        mine = self.store.claim(item, self.owner, self.lease_s)
        if mine is None:
            return 0  # another worker was quicker
        try:
            self._process(mine)
        except (KVError, MailStoreError, OSError):
            raise   # the store or the network: the whole pass waits for the next poll
        except Exception as e:
            # A bug this item triggers must not stop every other item
            # behind it: log it, and try the item again later.
            log.exception("queue item %s: delivery failed with a bug; tried again later", mine.id)
            self.store.update(mine, attempts=mine.attempts + 1, next_at=self._next_attempt_at(mine, self.clock()),
                              last_error=f"bug: {e!r}"[:500], lease_owner="", lease_until=0.0)
        return 1

    def sweep_if_due(self) -> SweepStats | None:
        """Go on with the orphan sweep for up to `sweep_budget_s`; the round's stats when one ends."""
        if self.sweeper is None or self._stopping():
            return None
        if not self.sweeper.in_round and self.clock() < self._next_sweep_at:
            return None
        stats = self.sweeper.step(self.sweep_budget_s)
        if stats is not None:
            self._next_sweep_at = self.clock() + self.sweep_every_s
        return stats

    def _claimable(self, item: QueueItem, now: float) -> bool:
        # A lease of another worker that has not run out is respected. One of
        # our own id is free: a dead predecessor's, or this worker's own after
        # a pass that failed half-way (one worker handles one item at a time).
        # So is one of this relay process's id (`relay`, `relay.<i>`) that no
        # worker running now holds: an earlier incarnation's, however many
        # workers it had.
        if item.lease_until > now and not self._predecessors(item.lease_owner):
            return False
        return bool(item.failed) or item.next_at <= now

    def _predecessors(self, owner: str) -> bool:
        worker = owner.split(":")[0]
        if worker == self.worker_id:
            return True
        return worker.split(".")[0] == self.worker_id.split(".")[0] and owner not in self.siblings

    # -- one item ------------------------------------------------------------------

    def _next_attempt_at(self, item: QueueItem, now: float) -> float:
        """When to try `item` again after its attempt number `item.attempts`
        failed: the back-off doubles from `retry_initial_s` up to
        MAX_BACKOFF_S, and is never later than the give-up time (so the last
        attempt is made, and the bounce sent, when `retry_for_s` runs out)."""
        backoff = min(self.retry_initial_s * 2 ** item.attempts, MAX_BACKOFF_S)
        return max(now, min(now + backoff, item.created + self.retry_for_s))

    def _process(self, item: QueueItem) -> None:
        item = self._send_pending_bounce(item)
        if item is None:
            return
        now = self.clock()
        if not item.rcpts:
            self.store.done(item)
            return
        if item.next_at > now:
            self.store.update(item, lease_owner="", lease_until=0.0)
            return
        try:
            raw = self.store.queue_raw(item)
        except NotFound:
            # Finished by another worker meanwhile (this one stood still past
            # its lease): its body went with it.
            log.warning("queue item %s: finished by another worker meanwhile", item.id)
            return
        held = [item]

        def still_mine() -> bool:
            """Renew the item's lease (a CPUT): False if another worker has
            it now. Asked before each remote domain is tried: a worker that
            stood still past its lease (a paused VM) must not deliver what
            the item's new holder delivers too."""
            renewed = self.store.update(held[0], lease_until=self.clock() + self.lease_s)
            if renewed is None:
                return False
            held[0] = renewed
            return True
        try:
            delivered, failed, retry, last_error = self._attempt(item, raw, still_mine)
        except LeaseLost:
            log.warning("queue item %s: lost its lease before delivering; the new holder goes on", item.id)
            return
        item = held[0]
        now = self.clock()
        if retry and now >= item.created + self.retry_for_s:
            failed += [(r, "4.4.7", f"gave up after {item.attempts + 1} attempts; last error: {last_error}")
                       for r in retry]
            retry = []
        log.info("queue item %s attempt %d: %d delivered, %d failed, %d to retry", item.id, item.attempts + 1,
                 len(delivered), len(failed), len(retry))
        next_at = self._next_attempt_at(item, now)
        pending = item.failed + tuple(tuple(f) for f in failed)
        bounce_id = item.bounce_id or (self.store.new_id() if pending else "")
        item = self.store.update(item, rcpts=tuple(retry), failed=pending, bounce_id=bounce_id,
                                 attempts=item.attempts + 1, next_at=next_at, last_error=last_error[:500])
        if item is None:
            log.warning("lost the lease of a queue item meanwhile; the new holder goes on")
            return
        item = self._send_pending_bounce(item)
        if item is None:
            return
        if not item.rcpts:
            self.store.done(item)
        else:
            self.store.update(item, lease_owner="", lease_until=0.0)

    def _send_pending_bounce(self, item: QueueItem) -> QueueItem | None:
        if not item.failed:
            return item
        if item.owner and item.mail_from:
            raw = mailfmt.bounce(
                domain=self.domain, to=f"{item.owner}@{self.domain}", original=self.store.queue_raw(item),
                failed=[mailfmt.FailedRecipient(*f) for f in item.failed], now=self.clock(),
                reason="The remote mail server refused it, or it could not be delivered in time.")
            self.store.deliver(item.owner, "Inbox", raw, msg_id=item.bounce_id)
            log.info("bounced %d recipients of queue item %s to %s", len(item.failed), item.id, item.owner)
        return self.store.update(item, failed=(), bounce_id="")

    def _attempt(self, item: QueueItem, raw: bytes, still_mine: Callable[[], bool] = lambda: True):
        """Try every recipient domain of `item` once; LeaseLost (before the
        first) if the item is no longer this worker's: (delivered, failed,
        retry, last_error)."""
        by_domain: dict[str, list[str]] = {}
        for r in item.rcpts:
            by_domain.setdefault(r.rpartition("@")[2].lower(), []).append(r)
        delivered: list[str] = []
        failed: list[tuple[str, str, str]] = []
        retry: list[str] = []
        last_error = ""
        deadline = time.monotonic() + self.attempt_s
        for domain, rcpts in by_domain.items():
            if time.monotonic() >= deadline:
                retry += rcpts
                last_error = f"this attempt took more than {self.attempt_s:g} s; the rest waits for the next one"
                continue
            if not still_mine():
                if not delivered and not failed:
                    raise LeaseLost(item.id)
                retry += rcpts           # (the new holder has them too; this worker's update will fail)
                continue
            try:
                addrs = mail_hosts(domain, self.resolver)
            except DNSError as e:
                if e.permanent:
                    failed += [(r, e.status, str(e)) for r in rcpts]
                else:
                    retry += rcpts
                    last_error = str(e)
                continue
            results = None
            for ip in addrs[:MAX_HOSTS]:
                if time.monotonic() >= deadline:
                    break
                try:
                    results = self._deliver_to(ip, item.mail_from, rcpts, raw, deadline)
                    break
                except (HostTrouble, OSError, smtplib.SMTPException) as e:
                    last_error = f"{ip}: {e}"
                    log.info("delivery to %s for %s failed: %s", ip, domain, e)
            if results is None:
                retry += rcpts
                continue
            for r in rcpts:
                code, text = results[r]
                if 200 <= code < 300:
                    delivered.append(r)
                elif code >= 500:
                    failed.append((r, status_of(code, text), f"{code} {text}"))
                else:
                    retry.append(r)
                    last_error = f"{code} {text}"
        return delivered, failed, retry, last_error

    def _deliver_to(self, ip: str, mail_from: str, rcpts: list[str], raw: bytes,
                    deadline: float) -> dict[str, tuple[int, str]]:
        """One SMTP transaction with one host: each recipient's final (code, text).

        Once DATA is answered the outcome is known, whatever QUIT then says:
        `smtplib.SMTP` used as a context manager raises on a QUIT reply other
        than 221, which made a delivered message look failed and sent it
        again on every retry. So QUIT is sent by hand and its answer ignored.

        smtplib's timeout bounds each read, not the transaction: a server
        that sends a byte every minute (a tarpit) would hold the worker, and
        outlive its lease, so that another worker sent the message again
        meanwhile. At `deadline` a timer shuts the socket, which ends the
        read in progress; the recipients are tried again later."""
        s = smtplib.SMTP(timeout=self.smtp_timeout_s, local_hostname=self.domain)
        cut: list[str] = []

        def cut_off(why: str) -> None:
            cut.append(why)
            sock = s.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut_off,
                                [f"no complete answer within {self.attempt_s:g} s"])
        timer.daemon = True
        timer.start()
        self._cut_in_flight = cut_off
        try:
            try:
                results = self._transaction(s, ip, mail_from, rcpts, raw)
            except (HostTrouble, OSError, smtplib.SMTPException) as e:
                if cut:
                    raise HostTrouble(f"{cut[0]} (cut off)") from e
                raise
            if cut:     # smtplib takes a reply cut short ("55") for a whole one: trust none
                raise HostTrouble(f"{cut[0]} (cut off)")
            return results
        finally:
            self._cut_in_flight = None
            timer.cancel()
            if not cut:
                try:
                    s.quit()
                except (OSError, smtplib.SMTPException):
                    pass
            s.close()

    def _transaction(self, s: smtplib.SMTP, ip: str, mail_from: str, rcpts: list[str],
                     raw: bytes) -> dict[str, tuple[int, str]]:
        code, msg = s.connect(ip, self.relay_port)
        if code != 220:
            raise HostTrouble(f"greeting {code} {msg.decode(errors='replace')}")
        code, msg = s.ehlo()
        if code != 250:
            code, msg = s.helo()
            if code != 250:
                raise HostTrouble(f"HELO refused: {code}")
        opts = []
        if s.does_esmtp and s.has_extn("size"):
            opts.append(f"SIZE={len(raw)}")
        if not raw.isascii():
            if not (s.does_esmtp and s.has_extn("8bitmime")):
                # RFC 6152 3: 8-bit mail may not go to a server without
                # 8BITMIME; we do not convert it, so it bounces.
                why = "5.6.3 the receiving server does not accept 8-bit mail (no 8BITMIME)"
                return {r: (554, why) for r in rcpts}
            opts.append("BODY=8BITMIME")
        code, msg = s.mail(mail_from, opts)
        if code != 250:
            return {r: (code, msg.decode(errors="replace")) for r in rcpts}
        results = {}
        for r in rcpts:
            if not r.isascii():     # queued before the SMTP server refused such addresses
                results[r] = (553, "5.6.7 a non-ASCII address needs SMTPUTF8, which we do not send")
                continue
            c, m = s.rcpt(r)
            results[r] = (c, m.decode(errors="replace"))
        accepted = [r for r in rcpts if results[r][0] in (250, 251)]
        if accepted:
            try:
                c, m = s.data(raw)
            except smtplib.SMTPDataError as e:
                c, m = e.smtp_code, e.smtp_error
            for r in accepted:
                results[r] = (c, m.decode(errors="replace") if isinstance(m, bytes) else str(m))
        return results


def make_relay_worker(cfg, kv, poll_s: float = POLL_S, lease_s: float = LEASE_S, worker_id: str | None = None,
                      sweep: bool = True) -> RelayWorker:
    """The relay worker of `cfg` over `kv` (which also sweeps orphaned bodies
    when `kv` can list rows and `sweep`)."""
    store = MailStore(kv, chunk_bytes=cfg.drive.chunk_bytes)
    lister = lister_for(kv) if sweep else None
    return RelayWorker(store, domain=cfg.mail.domain, worker_id=worker_id or cfg.mail.relay_id,
                       resolver=cfg.mail.resolver, relay_port=cfg.mail.relay_port,
                       retry_initial_s=cfg.mail.retry_initial_s, retry_for_s=cfg.mail.retry_for_s,
                       poll_s=poll_s, lease_s=lease_s, sweeper=MailSweeper(store, lister) if lister else None)


def make_relay_workers(cfg, kv, n: int = WORKERS, **kw) -> list[RelayWorker]:
    """`n` workers for one relay process, each a thread with its own id
    (`<relay_id>.<i>`: a restarted process's worker i knows a lease of that
    id is its dead predecessor's). Several, so that one remote server that
    never answers (60 s per try) or answers slowly holds up one worker, not
    everybody's mail. Only the first sweeps orphaned bodies."""
    workers = [make_relay_worker(cfg, kv, worker_id=f"{cfg.mail.relay_id}.{i}", sweep=(i == 0), **kw)
               for i in range(n)]
    siblings = frozenset(w.owner for w in workers)
    busy: set[str] = set()
    busy_lock = threading.Lock()
    for w in workers:
        w.siblings, w.busy, w.busy_lock = siblings, busy, busy_lock
    return workers


def run_workers(workers: list[RelayWorker], stop: threading.Event, join_s: float = 5.0) -> None:
    """Run every worker on a thread of its own until `stop` is set; then cut
    the deliveries under way (their mail is tried again by the next relay:
    at least once, never lost) and give the threads `join_s` to finish."""
    threads = [threading.Thread(target=w.run, args=(stop,), name=w.worker_id, daemon=True) for w in workers]
    for t in threads:
        t.start()
    wait_for(stop)          # not stop.wait(): see src/process.py
    for w in workers:
        w.abort()
    deadline = time.monotonic() + join_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
