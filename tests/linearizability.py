"""A linearizability checker: Wing & Gong's search with Lowe's memoisation (WGL).

Fault tests record every operation as an `Op`: when it was invoked, when its
answer came back, and what the answer was. `check(ops)` says whether some
order of the operations, each placed at one instant between its invocation
and its return, explains every answer as if one copy of each cell had
executed them one at a time (Herlihy & Wing). Each cell (row, col) is its own
register and linearizability is local (a history is linearizable iff its
restriction to each object is), so cells are checked one by one.

An operation whose outcome is unknown (the connection broke after the request
was sent, the client gave up) has `ret = INF` and `out = UNKNOWN`: it may have
taken effect at any instant after its invocation, or never. A write in the
future of everything else does not change any answer, so "never" is the same
as "at the very end", and the search needs no special case beyond accepting
any answer. Unknown reads tell nothing and may be left out.

The search (G. Lowe, "Testing for linearizability", 2017, section 3): walk a
doubly linked list of call and return entries in time order; at a call, try
to linearize that operation now (if the model agrees with its answer) and
lift its two entries out; at a return whose operation is not yet linearized,
backtrack. The cache of (set of linearized ops, state) pairs seen makes it
fast on the histories tests produce.

The model (PROTOCOL.md): a register holding bytes, or None when absent.

    put(v)          -> "ok"                              state := v
    cput(old, new)  -> "ok" if state == old              state := new
                       "mismatch" if state not in (old, None)
                       "notfound" if state is None
    putnx(v)        -> "ok" if state is None (state := v), else "exists"
    delete()        -> "ok" if state is not None (state := None), else "notfound"
    get()           -> the value, or None for NOTFOUND
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

INF = float("inf")


class _Unknown:
    def __repr__(self):
        return "UNKNOWN"


UNKNOWN = _Unknown()


@dataclass
class Op:
    key: object                 # the cell: any hashable, e.g. (row, col)
    kind: str                   # put | cput | putnx | delete | get
    args: tuple                 # put: (v,), cput: (old, new), putnx: (v,), others: ()
    out: object                 # "ok" / "mismatch" / "notfound" / "exists", a get's value or None, or UNKNOWN
    call: float
    ret: float = INF
    client: int = 0
    id: int = field(default=-1)


def step(state, op: Op):
    """(legal?, new state) for `op` applied to `state` with its recorded answer."""
    k, a, out = op.kind, op.args, op.out
    unknown = out is UNKNOWN
    if k == "get":
        return (unknown or out == state), state
    if k == "put":
        return (unknown or out == "ok"), a[0]
    if k == "cput":
        if state == a[0]:
            return (unknown or out == "ok"), a[1]
        return (unknown or out == ("notfound" if state is None else "mismatch")), state
    if k == "putnx":
        if state is None:
            return (unknown or out == "ok"), a[0]
        return (unknown or out == "exists"), state
    if k == "delete":
        if state is not None:
            return (unknown or out == "ok"), None
        return (unknown or out == "notfound"), state
    raise ValueError(f"unknown operation kind {k!r}")


class _Entry:
    __slots__ = ("op", "is_call", "match", "prev", "next", "time")

    def __init__(self, op, is_call, t):
        self.op, self.is_call, self.time = op, is_call, t
        self.match = self.prev = self.next = None


def check_register(ops: list[Op], init=None) -> bool:
    """Is this history of ONE register linearizable from `init`?"""
    ops = [o for o in ops if not (o.kind == "get" and o.out is UNKNOWN)]
    if not ops:
        return True
    entries = []
    for i, o in enumerate(ops):
        o.id = i
        c, r = _Entry(o, True, o.call), _Entry(o, False, o.ret)
        c.match = r
        entries += [c, r]
    # Time order; at equal times calls first (more overlap: never a false alarm).
    entries.sort(key=lambda e: (e.time, not e.is_call))
    head = _Entry(None, False, -INF)
    prev = head
    for e in entries:
        prev.next, e.prev = e, prev
        prev = e

    def lift(c):
        c.prev.next = c.next
        if c.next:
            c.next.prev = c.prev
        r = c.match
        r.prev.next = r.next
        if r.next:
            r.next.prev = r.prev

    def unlift(c):
        r = c.match
        r.prev.next = r
        if r.next:
            r.next.prev = r
        c.prev.next = c
        if c.next:
            c.next.prev = c

    state = init
    linearized = 0
    cache = {(0, init)}
    stack: list[tuple[_Entry, object]] = []
    entry = head.next
    while head.next is not None:
        if entry.is_call:
            legal, new = step(state, entry.op)
            if legal:
                lin = linearized | (1 << entry.op.id)
                if (lin, new) not in cache:
                    cache.add((lin, new))
                    stack.append((entry, state))
                    state, linearized = new, lin
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if entry.time == INF:
                return True       # only never-answered operations are left: they may never have happened
            if not stack:
                return False
            entry, state = stack.pop()
            linearized &= ~(1 << entry.op.id)
            unlift(entry)
            entry = entry.next
    return True


def check(ops: list[Op], init: dict | None = None) -> tuple[bool, object]:
    """Check every cell's history; (True, None) or (False, the first bad cell's key)."""
    init = init or {}
    by_key: dict = {}
    for o in ops:
        by_key.setdefault(o.key, []).append(o)
    for key, hist in by_key.items():
        if not check_register(hist, init.get(key)):
            return False, key
    return True, None


class History:
    """A thread-safe recorder: `with h.record(key, kind, args) as r: r.out = ...`.

    If the block raises, the operation is recorded with an unknown outcome
    (ret = INF) unless the block set `r.definite` (an error that proves the
    operation had no effect, e.g. RETRY, MOVED)."""

    def __init__(self):
        self.ops: list[Op] = []
        self._lock = threading.Lock()
        self._clients = itertools.count()

    def record(self, key, kind, args=(), client=0):
        return _Recording(self, Op(key, kind, tuple(args), UNKNOWN, time.monotonic(), INF, client))

    def _add(self, op):
        with self._lock:
            self.ops.append(op)


class _Recording:
    def __init__(self, h: History, op: Op):
        self.h, self.op = h, op
        self.out = UNKNOWN
        self.skip = False          # the operation certainly did nothing: leave it out

    def __enter__(self):
        self.op.call = time.monotonic()
        return self

    def __exit__(self, et, ev, tb):
        if self.skip:
            return False
        if et is None and self.out is not UNKNOWN:
            self.op.out = self.out
            self.op.ret = time.monotonic()
        self.h._add(self.op)
        return False
