"""Where tablets live and who leads them: the master's decisions, pure.

No sockets, threads, clocks or files: `master/server.py` tells this module
who is alive and what each server reported, and gets back new views, which it
persists (master/state.py) BEFORE anyone hears of them.

A tablet's `TabletView`:

    epoch     bumped on every change of primary or members; replicas refuse
              messages from older epochs, so a deposed primary commits nothing
    primary   the one server that orders writes, or None while no member of
              the view is alive (the tablet waits)
    members   the view: servers known to hold every acknowledged write
              (primary first). Only a member is ever elected.
    replicas  the R servers assigned to the tablet; a replica that is not a
              member is recovering and is admitted once it has caught up

Invariants kept by every function here:
- the primary, when there is one, is a member; members are replicas;
- the epoch of a tablet only grows, and any change bumps it;
- a new primary is chosen only among members that are alive, the one with
  the highest (last record epoch, last seq) it reported; a server that is
  not a member is never chosen, however long the tablet waits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class TabletView:
    tablet: int
    epoch: int
    primary: str | None
    members: tuple[str, ...]
    replicas: tuple[str, ...]

    def to_json(self) -> dict:
        return {"tablet": self.tablet, "epoch": self.epoch, "primary": self.primary,
                "members": list(self.members), "replicas": list(self.replicas)}

    @classmethod
    def from_json(cls, d: dict) -> "TabletView":
        return cls(int(d["tablet"]), int(d["epoch"]), d["primary"],
                   tuple(d["members"]), tuple(d["replicas"]))


Report = tuple[int, int]          # (epoch of the last log record, last seq)


def initial_views(servers: Sequence[str], tablets: int, replication: int) -> dict[int, TabletView]:
    """Place `tablets` tablets on `servers`, `replication` replicas each.

    Tablet t's replicas are R consecutive servers starting at t mod N, the
    first of them primary: every server is primary of T/N tablets and
    secondary of (R-1)T/N, so load spreads evenly and, when a server dies,
    its primaries move to different servers.
    """
    n = len(servers)
    if not 1 <= replication <= n:
        raise ValueError(f"replication {replication} needs 1..{n} servers")
    views = {}
    for t in range(tablets):
        # Vary the stride with each round of N tablets so the secondaries of a
        # server's primaries are not always the same two servers.
        start = t % n
        step = 1 + (t // n) % (n - 1) if n > 1 else 1
        order = [servers[(start + step * i) % n] for i in range(n)] + [servers[(start + i) % n] for i in range(n)]
        reps: list[str] = []
        for s in order:
            if s not in reps:
                reps.append(s)
        reps = reps[:replication]
        reps_t = tuple(reps)
        views[t] = TabletView(t, 1, reps_t[0], reps_t, reps_t)
    return views


def elect(view: TabletView, alive: Iterable[str], reports: Mapping[str, Report],
          load: Mapping[str, int] | None = None, presumed: Iterable[str] = ()) -> TabletView:
    """A new primary among the live members, or primary=None if none is alive.

    The new view keeps only live members (a dead one would miss the next
    writes), plus `presumed` ones (not heard from yet since the master
    started, not yet timed out either: keeping a member costs nothing but
    waiting for it), and has a new epoch. With no live member the members are kept as
    they are (they are who the tablet waits for) and the epoch is unchanged.
    With live members but none in `alive` (all `presumed`: not known dead,
    not heard from lately either), nobody is elected yet: the tablet waits
    (primary None, members kept) until one is heard from or known dead.
    Ties in (epoch, seq) go to the current primary (a restarted one keeps its
    tablets), then to the member leading the fewest tablets.
    """
    alive = set(alive)
    live = [m for m in view.members if m in alive]
    if not live:
        if view.primary is None:
            return view
        return replace(view, primary=None)
    load = load or {}
    best = max(live, key=lambda m: (tuple(reports.get(m, (0, 0))), m == view.primary, -load.get(m, 0),
                                    -view.replicas.index(m)))
    keep = set(live) | set(presumed)
    members = (best,) + tuple(m for m in view.members if m in keep and m != best)
    return replace(view, epoch=view.epoch + 1, primary=best, members=members)


def on_server_dead(view: TabletView, server: str, alive: Iterable[str],
                   reports: Mapping[str, Report], load: Mapping[str, int] | None = None,
                   presumed: Iterable[str] = ()) -> TabletView:
    """`server` stopped heartbeating (or was killed). `alive`: servers that may
    be elected; `presumed`: servers not known dead, kept in views but not elected."""
    alive = set(alive) - {server}
    presumed = set(presumed) - {server}
    if server not in view.members:
        return view
    if view.primary == server:
        return elect(view, alive, reports, load, presumed)
    if view.primary is not None and view.primary in alive:
        # A dead member would block every commit: drop it (it recovers later).
        return replace(view, epoch=view.epoch + 1, members=tuple(m for m in view.members if m != server))
    return view        # no live primary: the members are who the tablet waits for


def on_server_restarted(view: TabletView, server: str, alive: Iterable[str],
                        reports: Mapping[str, Report], load: Mapping[str, int] | None = None,
                        presumed: Iterable[str] = ()) -> TabletView:
    """`server` came back with a new boot (its memory is gone, its disk is not).

    If it was the primary, a new election with a new epoch: a restarted
    server must never go on in the epoch it led before, because records it
    sent but had not yet made durable may exist elsewhere under the same
    (seq, epoch). If the tablet had no primary and it is a member, it is
    elected (it holds every acknowledged write).
    """
    alive = set(alive) | {server}
    if view.primary == server or (view.primary is None and server in view.members):
        return elect(view, alive, reports, load, presumed)
    return view


def on_server_alive(view: TabletView, server: str, alive: Iterable[str],
                    reports: Mapping[str, Report], load: Mapping[str, int] | None = None,
                    presumed: Iterable[str] = ()) -> TabletView:
    """`server` is heard from (again): a tablet waiting for a member gets a primary."""
    if view.primary is None and server in view.members:
        return elect(view, set(alive) | {server}, reports, load, presumed)
    return view


def remove_member(view: TabletView, epoch: int, server: str, requester: str) -> TabletView | None:
    """The primary `requester` asks to drop `server` from the view of `epoch`.

    Refused (None) unless the view is still that epoch and `requester` its
    primary: a request from a deposed primary or about an old view does
    nothing. Removing a non-member is a no-op answer (the current view).
    """
    if view.epoch != epoch or view.primary != requester or server == requester:
        return None
    if server not in view.members:
        return view
    return replace(view, epoch=view.epoch + 1, members=tuple(m for m in view.members if m != server))


def admit_member(view: TabletView, epoch: int, server: str, requester: str,
                 alive: Iterable[str]) -> TabletView | None:
    """The primary `requester` vouches that `server` holds its whole log: add it."""
    if view.epoch != epoch or view.primary != requester or server not in view.replicas:
        return None
    if server in view.members:
        return view
    if server not in set(alive):
        return None
    return replace(view, epoch=view.epoch + 1, members=view.members + (server,))


def hand_over(view: TabletView, epoch: int, target: str, requester: str,
              alive: Iterable[str]) -> TabletView | None:
    """The primary `requester` of the view of `epoch` has drained its writes
    and asks to make `target` primary (it gives a restarted server back the
    tablets it was placed to lead). Refused (None) unless `target` is a live
    member: only a member holds every acknowledged write. The old primary
    stays a member."""
    if (view.epoch != epoch or view.primary != requester or target == requester
            or target not in view.members or target not in set(alive)):
        return None
    members = (target,) + tuple(m for m in view.members if m != target)
    return replace(view, epoch=view.epoch + 1, primary=target, members=members)


def primary_counts(views: Iterable[TabletView]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in views:
        if v.primary is not None:
            counts[v.primary] = counts.get(v.primary, 0) + 1
    return counts
