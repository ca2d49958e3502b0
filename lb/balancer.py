"""Which frontend gets the next visitor: the load balancer's policy, kept pure.

`Balancer` is the LB's registry of frontends and its choice of one. It does no
I/O and reads no clock: every method that depends on time takes `now` (seconds
on any monotonic clock) from the caller, so tests drive it with plain numbers.
It is not thread-safe; the server holds one lock around each call.

A frontend is *live* while its last heartbeat is younger than the timeout
(`cfg.lb.heartbeat_timeout_s`, 3 s by default) and *usable* when it is also
enabled by the operator. Only frontends named in the config are accepted: a
heartbeat names its config id and its port, and the LB trusts the host from
the config, never one from the network.

Policies:

    round_robin    the usable frontend that follows the last one chosen, in
                   config order (so fe1, fe2, fe3, fe1, ... and a frontend that
                   comes back simply rejoins the rotation)
    least_loaded   the usable frontend with the lowest load, where load is what
                   its last heartbeat reported plus the visitors the LB sent it
                   since (so a burst between two heartbeats is spread out); ties
                   go round robin

A frontend the proxy failed to reach is marked down at once (`mark_failed`)
rather than after the timeout; its next heartbeat brings it back.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

POLICIES = ("round_robin", "least_loaded")


@dataclass
class FrontendState:
    """What the LB knows about one configured frontend."""

    id: str
    host: str
    port: int
    enabled: bool = True
    last_beat: float | None = None  # `now` of the last heartbeat, None = never
    load: float = 0.0  # reported by the last heartbeat
    sent_since_beat: int = 0  # visitors assigned since that heartbeat
    assigned: int = 0  # visitors assigned in total (for the status page)
    failed: bool = False  # the proxy could not reach it since its last heartbeat

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def beating(self, now: float, timeout: float) -> bool:
        """Has it sent a heartbeat within `timeout`?"""
        return self.last_beat is not None and now - self.last_beat < timeout

    def live(self, now: float, timeout: float) -> bool:
        return self.beating(now, timeout) and not self.failed and self.port > 0


class UnknownFrontend(KeyError):
    """A heartbeat or command named a frontend the config does not have."""


class Balancer:
    def __init__(self, frontends, policy: str = "round_robin", timeout_s: float = 3.0,
                 disabled: frozenset[str] | set[str] = frozenset()):
        """`frontends`: the config's frontend Nodes (id, host, port), in order."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self.policy = policy
        self.timeout_s = timeout_s
        self._order: list[str] = []
        self._fes: dict[str, FrontendState] = {}
        for n in frontends:
            self._order.append(n.id)
            self._fes[n.id] = FrontendState(n.id, n.host, n.port, enabled=n.id not in disabled)
        self._last_chosen: str | None = None

    # -- registry ---------------------------------------------------------------

    def get(self, fe_id: str) -> FrontendState:
        try:
            return self._fes[fe_id]
        except KeyError:
            raise UnknownFrontend(fe_id) from None

    def heartbeat(self, fe_id: str, port: int, load: float, now: float) -> FrontendState:
        """Record a heartbeat: the frontend `fe_id` serves on `port` with `load`."""
        fe = self.get(fe_id)
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port!r}")
        load = float(load)
        if not math.isfinite(load) or load < 0:      # "inf" would make /_lb/status invalid JSON
            raise ValueError(f"bad load {load!r}: a finite number >= 0")
        fe.port = port
        fe.load = load
        fe.last_beat = now
        fe.sent_since_beat = 0
        fe.failed = False
        return fe

    def set_enabled(self, fe_id: str, enabled: bool) -> FrontendState:
        fe = self.get(fe_id)
        fe.enabled = enabled
        return fe

    def disabled_ids(self) -> list[str]:
        return [i for i in self._order if not self._fes[i].enabled]

    def mark_failed(self, fe_id: str) -> None:
        """The proxy could not reach `fe_id`: out of rotation until its next heartbeat."""
        if fe_id in self._fes:
            self._fes[fe_id].failed = True

    def usable(self, fe_id: str, now: float) -> bool:
        fe = self._fes.get(fe_id)
        return fe is not None and fe.enabled and fe.live(now, self.timeout_s)

    # -- choice -----------------------------------------------------------------

    def choose(self, now: float, exclude=()) -> FrontendState | None:
        """The frontend for a new visitor, or None when no frontend is usable.

        Counts the visitor against the chosen frontend (for least_loaded).
        `exclude`: ids to skip (frontends that already failed this request).
        """
        n = len(self._order)
        start = self._order.index(self._last_chosen) + 1 if self._last_chosen in self._fes else 0
        rotation = [self._fes[self._order[(start + i) % n]] for i in range(n)]
        candidates = [fe for fe in rotation if fe.id not in exclude and self.usable(fe.id, now)]
        if not candidates:
            return None
        if self.policy == "least_loaded":
            chosen = min(candidates, key=lambda fe: fe.load + fe.sent_since_beat)  # first minimum: ties rotate
        else:
            chosen = candidates[0]
        self._last_chosen = chosen.id
        chosen.sent_since_beat += 1
        chosen.assigned += 1
        return chosen

    def snapshot(self, now: float) -> list[dict]:
        """Every configured frontend as plain data (for the status endpoint)."""
        out = []
        for fe_id in self._order:
            fe = self._fes[fe_id]
            live = fe.live(now, self.timeout_s)
            out.append({
                "id": fe.id,
                "addr": fe.addr,
                "enabled": fe.enabled,
                "live": live,
                "state": ("up" if live else "down") if fe.enabled else ("disabled" if live else "disabled, down"),
                "load": fe.load,
                "last_beat_age_s": None if fe.last_beat is None else round(now - fe.last_beat, 3),
                "assigned": fe.assigned,
            })
        return out
