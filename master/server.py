"""The master: failure detector, view keeper and tablet directory.

It holds, per tablet, the `TabletView` of master/placement.py, and per tablet
server its liveness (heard from within `failure_timeout_s`), its boot id and
its last report (per tablet: epoch and seq of its last log record). Decisions
are made by placement.py's pure functions; this module adds time, the
network and persistence, in this order for every change:

    decide (pure) -> save to disk (master/state.py) -> publish -> answer

so no server ever hears of a view a restarted master would not know. Changes
are serialised by `_change_lock`, which is held across the save on purpose
(changes are rare, and a change must not be published before it is durable);
readers (MAP, LOOKUP, NODES) read the published views, a dict that is
replaced, never mutated, and so never wait on the disk. A heartbeat takes the
lock (it records the server's report and may change views), so it can wait
for another change's save: a slow master disk delays heartbeat answers, and
a tablet server counts its lease from when it sent the heartbeat, so a late
answer grants a shorter lease (kvserver/cluster.py).

Commands (PROTOCOL.md "Master commands", plus the internal ones of
docs/replication.md):

    PING | MAP | LOOKUP <row> | NODES | AUTH <secret> | QUIT
    HEARTBEAT <id> <boot> <state> <report>   (report: a literal, one line per tablet)
    VIEWCHANGE <tablet> <epoch> <REMOVE|ADMIT|HANDOVER> <server> <requester>
    BYE <id> <boot>                          (a tablet server was KILLed)

Internal commands need AUTH first when the cluster has a secret.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time

from master import placement
from master.placement import TabletView
from master.state import MasterState
from src.config import Config
from src.kv import tablet_of
from src.kvproto import (MASTER_COMMANDS, NEED_DATA, RAW, VALUE, CommandSpec, ProtocolErrorEvent,
                         RequestParser, error, listing, ok, pong)
from src.server import TCPServer

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 1024 * 1024     # a heartbeat's report literal (24 tablets take ~600 bytes)
RECV_BYTES = 65536
STARTUP_GRACE_S = 5.0              # after the master (re)starts, servers get this long to say hello
                                   # (a tablet server recovering its tablets on a busy machine is slow)

INTERNAL_COMMANDS = {
    "HEARTBEAT": CommandSpec((RAW, RAW, RAW, VALUE)),
    "VIEWCHANGE": CommandSpec((RAW, RAW, RAW, RAW, RAW)),
    "BYE": CommandSpec((RAW, RAW)),
}
COMMANDS = {**MASTER_COMMANDS, **INTERNAL_COMMANDS}


def view_line(v: TabletView) -> str:
    """`<tablet> <epoch> <primary|-> <member,...|-> <replica,...>` (heartbeat answers)."""
    return f"{v.tablet} {v.epoch} {v.primary or '-'} {','.join(v.members) or '-'} {','.join(v.replicas)}"


class _Server:
    """What the master knows of one tablet server (in memory only)."""

    def __init__(self, node, now: float):
        self.node = node
        self.last_seen = now          # presumed alive until a timeout from (re)start
        self.heard = False            # heard from since this master started
        self.alive = True
        self.killed = False
        self.state = "serving"
        self.dropped_at = 0.0         # when a primary last removed it from a view
        self.reports: dict[int, tuple[int, int]] = {}


class Master:
    def __init__(self, cfg: Config, node_id: str = "master", port: int | None = None):
        self.cfg = cfg
        self.node = cfg.node(node_id)
        self.cc = cfg.cluster
        self.ids = [n.id for n in cfg.kvservers]
        if not self.ids:
            raise ValueError(f"{cfg.path}: no [[kvserver]] entries: the master has nothing to place")
        self.store = MasterState(cfg.process_dir(node_id))
        now = time.monotonic()
        self.started = now
        self.servers = {n.id: _Server(n, now) for n in cfg.kvservers}
        loaded = self.store.load(self.cc.tablets, self.cc.replication, self.ids)
        if loaded is None:
            views = placement.initial_views(self.ids, self.cc.tablets, self.cc.replication)
            self.boots: dict[str, str] = {}
            self.store.save(self.cc.tablets, self.cc.replication, self.ids, views, self.boots)
            log.info("placed %d tablets on %d servers (R=%d)", len(views), len(self.ids), self.cc.replication)
        else:
            views, self.boots = loaded
            log.info("resumed master state: %d tablets, map epoch %d", len(views),
                     sum(v.epoch for v in views.values()))
        self.views: dict[int, TabletView] = views          # published; replaced, never mutated
        self._change_lock = threading.Lock()
        self._stop = threading.Event()
        self.tcp = TCPServer(self.node.host, self.node.port if port is None else port, self._handle, "master")
        self._detector: threading.Thread | None = None
        self._last_pass = time.monotonic()   # the failure detector's last look

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> "Master":
        self.tcp.start()
        self._detector = threading.Thread(target=self._detect_loop, name="master-detector", daemon=True)
        self._detector.start()
        return self

    @property
    def port(self) -> int:
        return self.tcp.port

    def stop(self) -> None:
        # Both waits together stay well inside run_all.sh's stop grace (8 s):
        # the master's state is on disk before anyone hears of it, so a
        # handler cut short loses nothing.
        self._stop.set()
        self.tcp.stop(timeout=3.0)
        if self._detector:
            self._detector.join(2.0)

    # -- decisions ---------------------------------------------------------------------

    def _alive(self) -> set[str]:
        """Servers an election may choose: heard from lately (within half the
        failure timeout). One that is late but not yet dead may have died
        with the server being replaced: electing it would shrink the view to
        a dead server."""
        now = time.monotonic()
        fresh = self.cc.failure_timeout_s / 2
        return {sid for sid, s in self.servers.items() if s.alive and s.heard and now - s.last_seen < fresh}

    def _presumed(self) -> set[str]:
        """Not known dead, but not electable now (not heard from since this
        master started, or late): kept in views, never chosen."""
        return {sid for sid, s in self.servers.items() if s.alive} - self._alive()

    def _reports(self, tablet: int) -> dict[str, tuple[int, int]]:
        return {sid: s.reports[tablet] for sid, s in self.servers.items() if tablet in s.reports}

    def _apply(self, fn, servers: list[str], why: str, dead: set[str] = frozenset()) -> None:
        """Run a per-tablet transition for each of `servers` on every tablet
        (`dead`: servers being declared dead); save and publish if anything
        changed. Caller holds _change_lock."""
        views = dict(self.views)
        alive = self._alive() - dead
        presumed = self._presumed() - dead
        changed = {}
        for server in servers:
            for t, v in views.items():
                load = placement.primary_counts(views.values())
                nv = fn(v, server, alive, self._reports(t), load, presumed)
                if nv != v:
                    views[t] = nv
                    changed[t] = nv
        if changed:
            self._publish(views, list(changed.values()), why)

    def _publish(self, views: dict[int, TabletView], changed: list[TabletView], why: str) -> None:
        self.store.save(self.cc.tablets, self.cc.replication, self.ids, views, self.boots)
        self.views = views
        for v in changed:
            log.info("tablet %d epoch %d primary %s members %s (%s)", v.tablet, v.epoch, v.primary or "-",
                     ",".join(v.members) or "-", why)

    def _detect_loop(self) -> None:
        interval = min(0.05, self.cc.heartbeat_interval_s / 2)
        while not self._stop.wait(interval):
            try:
                self._detect_once(time.monotonic())
            except Exception:
                log.exception("failure detector")

    def _detect_once(self, now: float) -> None:
        """Declare dead every server silent for the failure timeout. All of
        one pass are marked dead before any tablet is re-elected, so servers
        that died together are not elected for each other."""
        gap, self._last_pass = now - self._last_pass, now
        if gap > self.cc.failure_timeout_s / 2:
            # The master itself stood still (a paused VM, SIGSTOP, a swap
            # storm): the heartbeats of that time wait unread in its sockets,
            # so its silence proves nothing. The time the master stood still
            # is not counted (each server's silence is moved on by the gap),
            # so a master that stutters still finds a server that stopped
            # beating after one timeout of its own running time.
            with self._change_lock:
                for s in self.servers.values():
                    s.last_seen = min(now, s.last_seen + gap)
            log.warning("the failure detector did not run for %.2fs: that time is not counted as silence", gap)

        def expired(s):
            timeout = self.cc.failure_timeout_s if s.heard else max(STARTUP_GRACE_S, 2 * self.cc.failure_timeout_s)
            return s.alive and now - s.last_seen > timeout

        if not any(expired(s) for s in self.servers.values()):
            return
        with self._change_lock:
            dead = [sid for sid, s in self.servers.items() if expired(s)]
            for sid in dead:
                log.warning("server %s is dead (silent %.2fs)", sid, now - self.servers[sid].last_seen)
            # New views first, then the flags: MAP never shows a dead primary
            # as "-" while its view still names it.
            self._apply(placement.on_server_dead, dead, f"{','.join(dead)} dead", set(dead))
            for sid in dead:
                self.servers[sid].alive = False

    def heartbeat(self, sid: str, boot: str, state: str, report: dict[int, tuple[int, int]]) -> list[str]:
        """A tablet server's heartbeat: note it, react to a restart or a return, answer its views."""
        s = self.servers[sid]
        with self._change_lock:
            s.last_seen = time.monotonic()
            s.reports = report
            s.state = state
            came_back = not s.alive or not s.heard
            s.alive = True
            s.heard = True
            s.killed = False
            if self.boots.get(sid) != boot:
                first = sid not in self.boots
                self.boots[sid] = boot
                log.info("server %s %s (boot %s)", sid, "registered" if first else "restarted", boot[:8])
                views = dict(self.views)
                changed = []
                for t, v in views.items():
                    nv = placement.on_server_restarted(v, sid, self._alive(), self._reports(t),
                                                       placement.primary_counts(views.values()),
                                                       self._presumed())
                    if nv != v:
                        views[t] = nv
                        changed.append(nv)
                self._publish(views, changed, f"{sid} restarted")   # saves the boot id too
            else:
                if came_back:
                    log.info("server %s is alive again", sid)
                if any(v.primary is None and sid in v.members for v in self.views.values()):
                    self._apply(placement.on_server_alive, [sid], f"{sid} alive")
            views = self.views
        return [view_line(v) for v in views.values()]

    def bye(self, sid: str, boot: str) -> None:
        """A server was KILLed: dead now (no need to wait for the timeout)."""
        s = self.servers[sid]
        with self._change_lock:
            if self.boots.get(sid) != boot or not s.alive:
                return
            log.warning("server %s was killed", sid)
            self._apply(placement.on_server_dead, [sid], f"{sid} killed", {sid})
            s.alive = False
            s.killed = True

    def view_change(self, tablet: int, epoch: int, op: str, server: str, requester: str) -> TabletView | None:
        with self._change_lock:
            v = self.views.get(tablet)
            if v is None or server not in self.servers or requester not in self.servers:
                return None
            if not self.servers[requester].alive:
                return None
            if op == "REMOVE":
                nv = placement.remove_member(v, epoch, server, requester)
            elif op == "ADMIT":
                nv = placement.admit_member(v, epoch, server, requester, self._alive())
            else:
                nv = placement.hand_over(v, epoch, server, requester, self._alive())
            if nv is None:
                return None
            if nv != v:
                views = dict(self.views)
                views[tablet] = nv
                self._publish(views, [nv], f"{requester} asked {op} {server}")
                if op == "REMOVE":
                    self.servers[server].dropped_at = time.monotonic()
            return nv

    # -- answers ---------------------------------------------------------------------------

    def addr(self, sid: str | None) -> str:
        return self.servers[sid].node.addr if sid else "-"

    def map_lines(self) -> list[str]:
        views = self.views
        lines = [f"tablets={self.cc.tablets} epoch={sum(v.epoch for v in views.values())}"]
        for t in sorted(views):
            lines.append(self._tablet_text(views[t]))
        return lines

    def _tablet_text(self, v: TabletView) -> str:
        s = self.servers[v.primary] if v.primary else None
        # Not yet heard from since the master started (its grace period): as
        # NODES says, it may be dead, so no client is sent there.
        primary = self.addr(v.primary) if s is not None and s.alive and s.heard else "-"
        secs = [self.addr(m) for m in v.members if m != v.primary]
        return f"{v.tablet} {primary} {','.join(secs) or '-'}"

    def node_lines(self) -> list[str]:
        views = self.views.values()
        now = time.monotonic()
        lines = []
        for sid, s in self.servers.items():
            prim = sum(1 for v in views if v.primary == sid)
            sec = sum(1 for v in views if sid in v.members and v.primary != sid)
            # Out of a view it is a replica of: recovering (being brought up
            # to date) only if it has spoken since it was dropped; a server
            # that went silent (SIGKILL) stays "alive" until it times out.
            lagging = s.last_seen > s.dropped_at and any(sid in v.replicas and sid not in v.members
                                                         for v in views)
            if s.killed:
                state = "killed"
            elif not s.alive or not s.heard:
                state = "dead"
            elif s.state == "recovering" or lagging:
                state = "recovering"
            else:
                state = "alive"
            seen = int((now - s.last_seen) * 1000) if s.heard else -1
            lines.append(f"{sid} {s.node.addr} {state} primary={prim} secondary={sec} last_seen_ms={seen}")
        return lines

    # -- the connection loop ---------------------------------------------------------------

    def _handle(self, sock: socket.socket, peer) -> None:
        parser = RequestParser(COMMANDS, max_literal=MAX_REPORT_BYTES)
        conn = {"authed": not self.cc.secret}
        while True:
            data = sock.recv(RECV_BYTES)
            if not data:
                return
            parser.feed(data)
            out = []
            while True:
                ev = parser.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, ProtocolErrorEvent):
                    out.append(ev.reply())
                    if ev.close:
                        sock.sendall(b"".join(out))
                        return
                    continue
                try:
                    reply = getattr(self, "cmd_" + ev.cmd)(ev.args, conn)
                except Exception as e:   # a bug: answer it, keep serving
                    log.exception("master: %s failed", ev.cmd)
                    reply = error("INTERNAL", type(e).__name__)
                if reply is None:      # QUIT
                    out.append(ok("bye"))
                    sock.sendall(b"".join(out))
                    return
                out.append(reply)
            if out:
                sock.sendall(b"".join(out))

    def _internal(self, conn) -> bytes | None:
        return None if conn["authed"] else error("DENIED", "AUTH first")

    def cmd_PING(self, args, conn):
        return pong()

    def cmd_QUIT(self, args, conn):
        return None

    def cmd_AUTH(self, args, conn):
        if not hmac.compare_digest(args[0], self.cc.secret.encode()):
            return error("DENIED", "wrong secret")
        conn["authed"] = True
        return ok()

    def cmd_MAP(self, args, conn):
        return listing(self.map_lines())

    def cmd_LOOKUP(self, args, conn):
        t = tablet_of(args[0], self.cc.tablets)
        return ok(self._tablet_text(self.views[t]))

    def cmd_NODES(self, args, conn):
        return listing(self.node_lines())

    def cmd_HEARTBEAT(self, args, conn):
        denied = self._internal(conn)
        if denied:
            return denied
        sid, boot, state, raw = args
        if sid not in self.servers:
            return error("BADREQ", f"unknown server {sid}")
        report = {}
        try:
            for line in raw.decode("ascii").splitlines():
                if line.strip():
                    t, e, s = line.split()[:3]
                    report[int(t)] = (int(e), int(s))
        except (ValueError, UnicodeDecodeError):
            return error("BADREQ", "malformed heartbeat report")
        return listing(self.heartbeat(sid, boot, state, report))

    def cmd_BYE(self, args, conn):
        denied = self._internal(conn)
        if denied:
            return denied
        if args[0] not in self.servers:
            return error("BADREQ", f"unknown server {args[0]}")
        self.bye(args[0], args[1])
        return ok()

    def cmd_VIEWCHANGE(self, args, conn):
        denied = self._internal(conn)
        if denied:
            return denied
        t, e, op, server, requester = args
        op = op.upper()
        if not (t.isdigit() and e.isdigit()) or op not in ("REMOVE", "ADMIT", "HANDOVER"):
            return error("BADREQ", "VIEWCHANGE <tablet> <epoch> REMOVE|ADMIT|HANDOVER <server> <requester>")
        nv = self.view_change(int(t), int(e), op, server, requester)
        if nv is None:
            return error("RETRY", f"view change refused (current epoch {self.views[int(t)].epoch})"
                         if int(t) in self.views else "no such tablet")
        return listing([view_line(nv)])
