"""Heartbeats that let the load balancer and the admin console see processes.

Two senders, each a background thread (`while not stop.wait(interval)`):

- `LBHeartbeat`: a frontend tells the LB "I am fe1, serving on port P, with
  load L" every `lb_beat_interval(cfg.lb.heartbeat_timeout_s)` seconds (a
  quarter of the LB's timeout, at most 0.5 s), so a frontend that dies is out
  of the rotation within `cfg.lb.heartbeat_timeout_s`. It is an HTTP request
  to the LB's control endpoint (`POST /_lb/heartbeat`, urlencoded `id`,
  `port`, `load`), carrying the cluster secret in the `X-PennCloud-Secret`
  header when one is set.
- `ProcessBeacon`: any process (frontend, SMTP, POP3, relay) writes one cell
  into the KV store every `BEACON_INTERVAL_S`: row `sys/procs`, column = its
  config id, value = a small JSON object `{"role", "addr", "state", "load",
  "time" (unix seconds), "pid"}`. On a clean stop it writes state "stopped" (from its own thread, so a store
  that does not answer never delays a shutdown by more than two seconds).
  The admin console reads the row (`read_beacons`) and calls a process whose
  beacon is older than `BEACON_STALE_S` "down". One row, a few writes a
  second for the whole cluster: cheap, and it needs no new port or protocol.

`LBControlClient` is the client side of the LB's control endpoints (heartbeat
in, status out, enable/disable a frontend), shared by the heartbeat sender and
the admin console; docs/lb.md describes the endpoints and who may call them.

A failed beat is logged (once per outage, not per beat) and the thread keeps
going: neither the LB nor the store being down may stop a process.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from typing import Callable

from src.kv import KV, KVError

log = logging.getLogger(__name__)

SECRET_HEADER = "X-PennCloud-Secret"
CONTROL_PREFIX = "/_lb/"
HEARTBEAT_PATH = "/_lb/heartbeat"
STATUS_PATH = "/_lb/status"
FRONTEND_PATH = "/_lb/frontend/"  # + <id>/enable or <id>/disable

BEACON_ROW = b"sys/procs"
BEACON_INTERVAL_S = 2.0
BEACON_STALE_S = 6.0
CONTROL_TIMEOUT_S = 2.0


def lb_beat_interval(lb_timeout_s: float) -> float:
    """How often a frontend beats: four beats per LB timeout, at most every 0.5 s."""
    return min(0.5, lb_timeout_s / 4)


class LBControlError(Exception):
    """The LB could not be reached, or refused a control request."""


class LBControlClient:
    """Talks to one LB's control endpoints over HTTP/1.1 (one request per call)."""

    def __init__(self, host: str, port: int, secret: str = "", timeout: float = CONTROL_TIMEOUT_S):
        self.host, self.port, self.secret, self.timeout = host, port, secret, timeout

    def request(self, method: str, path: str, fields: dict | None = None) -> tuple[int, bytes]:
        body = urllib.parse.urlencode(fields or {}).encode() if method == "POST" else None
        headers = {"Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if self.secret:
            headers[SECRET_HEADER] = self.secret
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:
            raise LBControlError(f"load balancer {self.host}:{self.port} unreachable: {e}") from None
        finally:
            conn.close()

    def _expect_ok(self, status: int, body: bytes) -> dict:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            data = {}
        if status != 200:
            raise LBControlError(data.get("error") or f"load balancer answered {status}")
        return data

    def heartbeat(self, fe_id: str, port: int, load: float) -> None:
        self._expect_ok(*self.request("POST", HEARTBEAT_PATH, {"id": fe_id, "port": port, "load": load}))

    def status(self) -> dict:
        """The LB's view: `{"id", "mode", "policy", "frontends": [...], ...}`."""
        return self._expect_ok(*self.request("GET", STATUS_PATH))

    def set_enabled(self, fe_id: str, enabled: bool) -> dict:
        action = "enable" if enabled else "disable"
        path = FRONTEND_PATH + urllib.parse.quote(fe_id, safe="") + "/" + action
        return self._expect_ok(*self.request("POST", path))


class Periodic:
    """A daemon thread that calls `beat()` now and then every `interval` s until `stop()`."""

    def __init__(self, interval: float, name: str):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failing = False
        self._got_through = False       # a beat has reached the other side at least once

    def start(self) -> "Periodic":
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop beating; waits at most `timeout` s (a last beat may be under way)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def beat(self) -> None:
        raise NotImplementedError

    def final(self) -> None:
        """Called once on the thread after the last beat, when stopping (optional)."""

    def _run(self) -> None:
        self._beat_once()
        while not self._stop.wait(self.interval):
            self._beat_once()
        try:
            self.final()
        except Exception as e:
            log.debug("%s: final beat failed: %s", self._thread.name, e)

    def _beat_once(self) -> None:
        try:
            self.beat()
        except Exception as e:  # keep beating: the other side may come back
            if not self._failing:
                # Before the first beat got through, the other side is most
                # likely still starting (run_all.sh starts the LB last): not
                # worth a WARNING in every frontend's log at every start.
                log.log(logging.WARNING if self._got_through else logging.INFO,
                        "%s: heartbeat failed (%s); will keep trying", self._thread.name, e)
            self._failing = True
            return
        self._got_through = True
        if self._failing:
            log.info("%s: heartbeats get through again", self._thread.name)
        self._failing = False


class LBHeartbeat(Periodic):
    """A frontend's heartbeat to the LB."""

    def __init__(self, client: LBControlClient, fe_id: str, port_fn: Callable[[], int],
                 load_fn: Callable[[], float], interval: float):
        super().__init__(interval, f"lb-heartbeat-{fe_id}")
        self.client, self.fe_id, self.port_fn, self.load_fn = client, fe_id, port_fn, load_fn

    def beat(self) -> None:
        self.client.heartbeat(self.fe_id, self.port_fn(), self.load_fn())


class ProcessBeacon(Periodic):
    """A process's heartbeat cell in the KV store (row `sys/procs`)."""

    def __init__(self, kv: KV, proc_id: str, role: str, addr: str,
                 load_fn: Callable[[], float] = lambda: 0, state_fn: Callable[[], str] = lambda: "up",
                 interval: float = BEACON_INTERVAL_S):
        super().__init__(interval, f"beacon-{proc_id}")
        self.kv, self.proc_id, self.role, self.addr = kv, proc_id, role, addr
        self.load_fn, self.state_fn = load_fn, state_fn

    def _write(self, state: str) -> None:
        cell = {"role": self.role, "addr": self.addr, "state": state, "load": self.load_fn(),
                "time": round(time.time(), 3), "pid": os.getpid()}
        self.kv.put(BEACON_ROW, self.proc_id.encode(), json.dumps(cell, separators=(",", ":")).encode())

    def beat(self) -> None:
        self._write(self.state_fn())

    def final(self) -> None:
        # On the beacon's own thread, so a store that does not answer cannot
        # hold up the process's shutdown beyond stop()'s timeout.
        if not self._failing:
            self._write("stopped")


def read_beacons(kv: KV, now: float | None = None) -> dict[str, dict]:
    """Every beacon in `sys/procs`: id -> the JSON cell plus `age_s` and `stale`.

    Unreadable cells are skipped. A process whose beacon is older than
    BEACON_STALE_S and says it is up is reported with state "down".
    """
    now = time.time() if now is None else now
    out: dict[str, dict] = {}
    for col in kv.cols(BEACON_ROW):
        try:
            cell = json.loads(kv.get(BEACON_ROW, col))
            proc_id = col.decode()
            if not isinstance(cell, dict):
                continue
            t = float(cell.get("time", 0))
        except (KVError, ValueError, UnicodeDecodeError, TypeError):
            continue
        cell["age_s"] = round(max(0.0, now - t), 1)
        cell["stale"] = now - t > BEACON_STALE_S
        if cell["stale"] and cell.get("state") not in ("stopped",):
            cell["state"] = "down"
        out[proc_id] = cell
    return out
