"""What the admin console shows, gathered from the running cluster.

`ClusterView.snapshot()` asks every process what it is doing, in parallel
(up to PROBE_THREADS at a time, each waiting at most PROBE_TIMEOUT_S, so hung
servers cost the page a few seconds, not a minute) and returns plain data
(JSON-ready):

    master        PING, NODES and MAP on the master
    tablet server STATUS on each configured server (KV admin command)
    LB, frontends GET /_lb/status on the load balancer (src/heartbeat.py)
    frontends, SMTP, POP3, relay
                  their beacons in the KV row `sys/procs` (src/heartbeat.py);
                  SMTP and POP3 without a beacon are probed with a TCP connect

The tablet map comes from the master's MAP; when the master cannot be reached
(or in a one-server development setup without a master) it is rebuilt from
the servers' own STATUS `tablets=` lists, and the page says so.

The helpers at the bottom (`show_name`, `preview`) turn arbitrary bytes into
text that is safe to show once HTML-escaped: row and column names are
arbitrary bytes, values may be binary.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor

from src.config import Config
from src.heartbeat import LBControlClient, LBControlError, read_beacons
from src.kv import KV, KVError
from src.kvclient import ServerClient

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.5
PROBE_THREADS = 8
PREVIEW_BYTES = 4096


def _err(e: BaseException) -> str:
    """A short reason for the Detail column."""
    text = str(e) or type(e).__name__
    low = text.lower()
    for needle, short in (("refused", "connection refused"), ("timed out", "timed out"),
                          ("timeout", "timed out"), ("denied", "refused: wrong or missing cluster secret")):
        if needle in low:
            return short
    return text[:200]


class ClusterView:
    """Reads the state of every process of one cluster config."""

    def __init__(self, cfg: Config, kv: KV, timeout: float = PROBE_TIMEOUT_S):
        self.cfg = cfg
        self.kv = kv
        self.timeout = timeout
        self.secret = cfg.cluster.secret
        self._clients: dict[str, ServerClient] = {}
        self._clients_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="admin-probe")

    def client(self, addr: str) -> ServerClient:
        """A short-timeout admin client of one server (master or tablet server)."""
        with self._clients_lock:
            c = self._clients.get(addr)
            if c is None:
                c = self._clients[addr] = ServerClient(addr, timeout=self.timeout, secret=self.secret, pool_size=2)
            return c

    def server_node(self, server_id: str):
        """The config's tablet server of that id, or None."""
        for n in self.cfg.kvservers:
            if n.id == server_id:
                return n
        return None

    def lb(self) -> LBControlClient:
        n = self.cfg.lb.node
        return LBControlClient(n.host, n.port, self.secret, timeout=self.timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for c in self._clients.values():
            c.close()

    # -- probes (each returns plain data, never raises) -----------------------------------

    def _master(self) -> dict:
        c = self.client(self.cfg.master.addr)
        try:
            nodes = c.nodes()
            tmap = c.map()
        except (KVError, OSError, ValueError) as e:
            return {"ok": False, "error": _err(e)}
        return {"ok": True, "nodes": nodes, "map": {
            "tablets": tmap.tablets, "epoch": tmap.epoch,
            "entries": {t: {"primary": e.primary, "secondaries": list(e.secondaries)}
                        for t, e in tmap.entries.items()}}}

    def _server(self, addr: str) -> dict:
        try:
            return {"ok": True, "status": self.client(addr).status()}
        except (KVError, OSError, ValueError) as e:
            return {"ok": False, "error": _err(e)}

    def _lb(self) -> dict:
        try:
            return {"ok": True, "status": self.lb().status()}
        except LBControlError as e:
            return {"ok": False, "error": _err(e)}

    def _beacons(self) -> dict:
        try:
            return {"ok": True, "beacons": read_beacons(self.kv)}
        except (KVError, OSError, ValueError) as e:
            return {"ok": False, "error": _err(e), "beacons": {}}

    def _port_open(self, host: str, port: int) -> bool:
        try:
            with socket.create_connection((host, port), timeout=self.timeout):
                return True
        except OSError:
            return False

    # -- the snapshot ------------------------------------------------------------------------

    def snapshot(self) -> dict:
        cfg = self.cfg
        jobs = {"master": self._pool.submit(self._master), "lb": self._pool.submit(self._lb),
                "beacons": self._pool.submit(self._beacons)}
        for n in cfg.kvservers:
            jobs["kv:" + n.id] = self._pool.submit(self._server, n.addr)
        for n in (cfg.mail.smtp, cfg.mail.pop3):
            jobs["port:" + n.id] = self._pool.submit(self._port_open, n.host, n.port)
        got = {k: f.result() for k, f in jobs.items()}
        master, lb, beacons = got["master"], got["lb"], got["beacons"]["beacons"]

        procs: list[dict] = []
        procs.append(self._master_row(master))
        nodes = {d.get("addr"): d for d in master.get("nodes", [])}
        for n in cfg.kvservers:
            procs.append(self._server_row(n, got["kv:" + n.id], nodes.get(n.addr)))
        lb_fes = {f["id"]: f for f in lb["status"]["frontends"]} if lb["ok"] else {}
        for n in cfg.frontends:
            procs.append(self._frontend_row(n, lb_fes.get(n.id), beacons.get(n.id), lb["ok"]))
        procs.append(self._lb_row(lb))
        for n, role in ((cfg.mail.smtp, "SMTP server"), (cfg.mail.pop3, "POP3 server")):
            procs.append(self._mail_row(n.id, n.addr, role, beacons.get(n.id), got["port:" + n.id]))
        procs.append(self._mail_row(cfg.mail.relay_id, "-", "mail relay", beacons.get(cfg.mail.relay_id), None))

        return {"time": time.time(), "processes": procs,
                "map": self._tablet_map(master, {n.id: got["kv:" + n.id] for n in cfg.kvservers}),
                "lb": lb.get("status") if lb["ok"] else None}

    def _master_row(self, m: dict) -> dict:
        n = self.cfg.master
        row = {"id": n.id, "kind": "master", "addr": n.addr, "role": "coordinator", "actions": []}
        if not m["ok"]:
            return {**row, "state": "down", "load": "", "heartbeat": "", "detail": m["error"]}
        alive = sum(1 for d in m["nodes"] if d.get("state") == "alive")
        return {**row, "state": "up", "load": f"{alive}/{len(m['nodes'])} servers alive",
                "heartbeat": "answered now", "detail": f"epoch {m['map']['epoch']}"}

    def _server_row(self, n, probe: dict, node: dict | None) -> dict:
        row = {"id": n.id, "kind": "kvserver", "addr": n.addr}
        st = probe.get("status", {})
        roles = _parse_tablet_roles(st.get("tablets", ""))
        prim = sum(1 for r in roles.values() if r.startswith("p"))
        sec = len(roles) - prim
        if node is not None:
            prim = int(node.get("primary", prim) or 0)
            sec = int(node.get("secondary", sec) or 0)
        row["role"] = f"primary {prim}, secondary {sec}" if (prim or sec or probe["ok"]) else ""
        if probe["ok"]:
            row["state"] = st.get("state", "?")
            row["load"] = f"{st.get('ops', '?')} ops, {st.get('keys', '?')} keys, {_size(st.get('disk_bytes'))}"
            # (a KILLed server's STATUS has no sync count: say only what it says)
            row["detail"] = ", ".join(part for part in (
                f"{st['log_records']} log records" if "log_records" in st else "",
                f"{st['group_flushes']} syncs" if "group_flushes" in st else "") if part)
        else:
            row["state"] = "down"
            row["load"] = ""
            row["detail"] = probe["error"]
        if node is not None:
            master_state = node.get("state", "")
            if master_state and master_state not in ("alive", row["state"]):
                if probe["ok"]:
                    row["note"] = f"master: {master_state}"
                else:
                    row["state"] = master_state
            ms = node.get("last_seen_ms")
            row["heartbeat"] = f"{int(ms) / 1000:.1f} s ago" if ms and ms.isdigit() else ""
        else:
            row["heartbeat"] = "answered now" if probe["ok"] else ""
        # KILL and WAKE are commands to a running server; one that does not answer
        # (crashed, stopped) needs its process restarted: ./run_all.sh starts what is missing.
        if not probe["ok"]:
            row["actions"] = []
            if "refused" in row["detail"]:
                row["detail"] = "not running (./run_all.sh restarts it)"
        else:
            row["actions"] = ["wake"] if row["state"] == "killed" else ["kill"]
        return row

    def _frontend_row(self, n, lbf: dict | None, beacon: dict | None, lb_ok: bool) -> dict:
        row = {"id": n.id, "kind": "frontend", "addr": n.addr, "role": "web frontend", "detail": ""}
        if lbf is not None:
            row["addr"] = lbf["addr"]
            row["state"] = lbf["state"]
            row["load"] = f"load {lbf['load']:g}, {lbf['assigned']} visitors sent"
            age = lbf["last_beat_age_s"]
            row["heartbeat"] = "never" if age is None else f"{age:.1f} s ago (LB)"
            row["actions"] = ["enable" if not lbf["enabled"] else "disable"]
        elif beacon is not None:
            row["state"] = str(beacon.get("state", "?"))
            row["load"] = f"load {_num(beacon.get('load'))}"
            row["heartbeat"] = f"{beacon['age_s']:.1f} s ago"
            row["actions"] = []
        else:
            row.update(state="unknown", load="", heartbeat="never", actions=[])
        if not lb_ok:
            row["detail"] = "the load balancer does not answer"
        return row

    def _lb_row(self, lb: dict) -> dict:
        n = self.cfg.lb.node
        row = {"id": n.id, "kind": "lb", "addr": n.addr, "actions": []}
        if not lb["ok"]:
            return {**row, "state": "down", "role": f"load balancer ({self.cfg.lb.mode})", "load": "",
                    "heartbeat": "", "detail": lb["error"]}
        st = lb["status"]
        return {**row, "state": "up", "role": f"load balancer ({st['mode']}, {st['policy'].replace('_', ' ')})",
                "load": f"{st['connections']} connections, {st['requests']} requests",
                "heartbeat": "answered now", "detail": f"up {_duration(st['uptime_s'])}"}

    def _mail_row(self, proc_id: str, addr: str, role: str, beacon: dict | None, port_open: bool | None) -> dict:
        row = {"id": proc_id, "kind": "mail", "addr": addr, "role": role, "actions": [], "detail": ""}
        if beacon is not None:
            row.update(state=str(beacon.get("state", "?")),
                       load="" if addr == "-" else f"{_num(beacon.get('load'))} connections",
                       heartbeat=f"{beacon['age_s']:.1f} s ago")
            if beacon.get("stale") and port_open:
                row["state"] = "up"
                row["detail"] = "port answers; heartbeat is old"
        elif port_open is None:
            row.update(state="unknown", load="", heartbeat="never", detail="no heartbeat recorded")
        else:
            row.update(state="up" if port_open else "down", load="", heartbeat="",
                       detail="port answers" if port_open else "port does not answer")
        return row

    def _tablet_map(self, master: dict, servers: dict[str, dict]) -> dict:
        ids_by_addr = {n.addr: n.id for n in self.cfg.kvservers}
        server_ids = [n.id for n in self.cfg.kvservers]
        cells: dict[str, dict[int, str]] = {i: {} for i in server_ids}
        if master["ok"]:
            m = master["map"]
            for t, e in m["entries"].items():
                if e["primary"] in ids_by_addr:
                    cells[ids_by_addr[e["primary"]]][int(t)] = "P"
                for s in e["secondaries"]:
                    if s in ids_by_addr:
                        cells[ids_by_addr[s]][int(t)] = "S"
            tablets, source = m["tablets"], f"the master (epoch {m['epoch']})"
        else:
            for sid, probe in servers.items():
                for t, role in _parse_tablet_roles(probe.get("status", {}).get("tablets", "")).items():
                    cells[sid][t] = {"primary": "P", "secondary": "S"}.get(role, "R")
            tablets = max([self.cfg.cluster.tablets] + [t + 1 for c in cells.values() for t in c])
            source = "the tablet servers (the master does not answer)"
        down = [sid for sid, probe in servers.items() if not probe["ok"]]
        return {"tablets": tablets, "servers": server_ids, "cells": cells, "source": source, "down": down}


def _parse_tablet_roles(text: str) -> dict[int, str]:
    """`0:primary,1:secondary` (STATUS `tablets=`) -> {0: "primary", 1: "secondary"}."""
    out = {}
    for item in text.split(","):
        t, _, role = item.strip().partition(":")
        if t.isdigit():
            out[int(t)] = role or "?"
    return out


def _num(v) -> str:
    """A number from a beacon (anything may be in the store) for display."""
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "?"


def _size(v) -> str:
    try:
        n = float(v)
    except (TypeError, ValueError):
        return "? bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _duration(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


# -- showing arbitrary bytes --------------------------------------------------------------


def _printable(ch: str) -> bool:
    return ch in "\n\t" or unicodedata.category(ch)[0] not in "CZ" or ch == " "


def show_name(b: bytes) -> str:
    """A row or column name as readable text: UTF-8 where it is, `\\xNN` for other bytes.

    The result is plain text (escape it for HTML); distinct names stay distinct
    because a literal backslash is shown doubled.
    """
    out = []
    text = b.decode("utf-8", "surrogateescape")
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\n\t" or not _printable(ch):
            out.append(f"\\x{o:02x}" if o < 256 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def preview(value: bytes, limit: int = PREVIEW_BYTES) -> tuple[str, str]:
    """("text", the text) if the first `limit` bytes are printable UTF-8, else ("hex", a hex dump)."""
    head = value[:limit]
    text = None
    for cut in range(4):  # a multi-byte character may be cut at the limit
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            if len(head) < limit:
                break
    if text is not None and all(_printable(ch) or ch == "\r" for ch in text):
        return "text", text
    return "hex", hexdump(head)


def hexdump(b: bytes) -> str:
    """Offset, 16 bytes in hex, and the printable ASCII of each line."""
    lines = []
    for off in range(0, len(b), 16):
        chunk = b[off:off + 16]
        hexes = " ".join(f"{x:02x}" for x in chunk)
        ascii_ = "".join(chr(x) if 0x20 <= x < 0x7F else "." for x in chunk)
        lines.append(f"{off:08x}  {hexes:<47}  {ascii_}")
    return "\n".join(lines)
