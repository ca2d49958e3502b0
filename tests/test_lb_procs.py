"""The load balancer with real processes: a standalone tablet server, three
frontends (`python -m httpserver --kv-server`) that send heartbeats, and the
LB (`python -m lb`). Visitors are spread by the policy; a SIGKILLed frontend
stops getting visitors within the heartbeat timeout and a logged-in user goes
on without logging in again; a disabled frontend gets no new visitors;
redirect mode answers 302.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from urllib.parse import urlencode

import pytest

from src.heartbeat import LBControlClient
from tests.harness import free_port, wait_until

FRONTENDS = ("fe1", "fe2", "fe3")


def write_config(path, kv_port, fe_ports, lb_port, mode="proxy", policy="round_robin", secret=""):
    fes = "\n".join(f'[[frontend]]\nid = "{fid}"\nhost = "127.0.0.1"\nport = {p}\n'
                    for fid, p in zip(FRONTENDS, fe_ports))
    path.write_text(f"""
[cluster]
tablets = 8
replication = 1
secret = "{secret}"

[master]
port = {free_port()}

[[kvserver]]
id = "kv1"
port = {kv_port}

{fes}
[lb]
port = {lb_port}
mode = "{mode}"
policy = "{policy}"
heartbeat_timeout_s = 3.0

[mail.smtp]
port = {free_port()}

[mail.pop3]
port = {free_port()}

[http]
admin_password = "admin password 1"
""")


class Stack:
    def __init__(self, procs, tmp_path, mode="proxy", n_frontends=3, secret=""):
        self.procs = procs
        self.kv_port = free_port()
        self.fe_ports = [free_port() for _ in range(n_frontends)]
        self.lb_port = free_port()
        self.config = tmp_path / "cluster.toml"
        data = str(tmp_path / "data")
        write_config(self.config, self.kv_port, self.fe_ports, self.lb_port, mode=mode, secret=secret)
        procs.start("kvserver", ["--standalone", "--port", str(self.kv_port), "--data", str(tmp_path / "kv1"),
                                 "--tablets", "8"] + (["--secret", secret] if secret else []), name="kv1")
        self.lb = procs.start("lb", ["--config", str(self.config), "--id", "lb", "--data", data], name="lb")
        self.fes = {}
        for fid in FRONTENDS[:n_frontends]:
            self.fes[fid] = procs.start("httpserver", ["--config", str(self.config), "--id", fid, "--data", data,
                                                       "--kv-server", f"127.0.0.1:{self.kv_port}"], name=fid)
        self.ctl = LBControlClient("127.0.0.1", self.lb_port, secret)
        wait_until(lambda: all(f["live"] for f in self.status()["frontends"][:n_frontends]), timeout=10,
                   what="every frontend registered with the LB")

    def status(self):
        return self.ctl.status()

    def live(self):
        return {f["id"] for f in self.status()["frontends"] if f["live"]}


def request(port, method, path, body=b"", headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        r.text = r.read().decode("utf-8", "replace")
        return r
    finally:
        c.close()


def new_visitor_frontend(port) -> str:
    r = request(port, "GET", "/")
    assert r.status == 200
    return r.getheader("X-PennCloud-Frontend")


def cookies_of(r) -> dict:
    out = {}
    for v in r.headers.get_all("Set-Cookie") or []:
        name, _, rest = v.partition("=")
        out[name.strip()] = rest.split(";", 1)[0]
    return out


def cookie_header(jar: dict) -> dict:
    return {"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())}


@pytest.mark.slow
def test_policy_kill_and_disable_with_real_frontends(procs, tmp_path):
    s = Stack(procs, tmp_path)
    lb = s.lb_port

    # Round robin over new visitors, in config order.
    assert [new_visitor_frontend(lb) for _ in range(6)] == ["fe1", "fe2", "fe3"] * 2

    # A user signs up and logs in through the LB.
    r = request(lb, "POST", "/signup", urlencode({"username": "alice", "password": "alice password"}).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 303
    jar = cookies_of(r)
    assert "sid" in jar and "pcfe" in jar
    r = request(lb, "GET", "/home", headers=cookie_header(jar))
    assert r.status == 200 and "alice" in r.text
    home_fe = r.getheader("X-PennCloud-Frontend")
    assert home_fe == jar["pcfe"]

    # SIGKILL the user's frontend: the next request is served elsewhere, still logged in.
    s.fes[home_fe].kill()
    t0 = time.monotonic()
    r = request(lb, "GET", "/home", headers=cookie_header(jar))
    assert r.status == 200 and "alice" in r.text, r.text[:300]
    assert r.getheader("X-PennCloud-Frontend") != home_fe
    jar.update(cookies_of(r))
    assert jar["pcfe"] != home_fe
    # ... and the dead frontend is out of the rotation within the 3 s timeout.
    wait_until(lambda: home_fe not in s.live(), timeout=3.0, what=f"{home_fe} out of the LB")
    assert time.monotonic() - t0 < 3.0
    assert home_fe not in {new_visitor_frontend(lb) for _ in range(6)}

    # A frontend that dies with nobody talking to it is also out within 3 s (heartbeats stop).
    other = next(f for f in s.fes if f != home_fe and s.fes[f].alive)
    s.fes[other].kill()
    t0 = time.monotonic()
    wait_until(lambda: other not in s.live(), timeout=6, what=f"{other} timed out")
    # 3 s without a heartbeat; its last one came at most one beat interval (0.5 s) before the
    # kill; plus slack for a loaded test machine
    assert time.monotonic() - t0 <= 4.5
    last = (set(FRONTENDS) - {home_fe, other}).pop()
    assert {new_visitor_frontend(lb) for _ in range(3)} == {last}

    # The killed frontend restarts: it comes back into the rotation by itself.
    s.fes[home_fe].start()
    wait_until(lambda: home_fe in s.live(), timeout=5, what=f"{home_fe} back")
    assert home_fe in {new_visitor_frontend(lb) for _ in range(4)}

    # Disabled: no new visitors, and the user still works; enabled: back in.
    assert s.ctl.set_enabled(home_fe, False)["enabled"] is False
    assert home_fe not in {new_visitor_frontend(lb) for _ in range(6)}
    r = request(lb, "GET", "/home", headers=cookie_header(jar))
    assert r.status == 200 and "alice" in r.text and r.getheader("X-PennCloud-Frontend") != home_fe
    s.ctl.set_enabled(home_fe, True)
    assert home_fe in {new_visitor_frontend(lb) for _ in range(4)}


@pytest.mark.slow
def test_redirect_mode_sends_302_to_a_live_frontend(procs, tmp_path):
    # With a cluster secret: the frontends' heartbeats carry it (else they would never register).
    s = Stack(procs, tmp_path, mode="redirect", n_frontends=2, secret="cluster secret")
    assert request(s.lb_port, "GET", "/_lb/status").status == 403
    locations = []
    for _ in range(4):
        r = request(s.lb_port, "GET", "/home?x=1")
        assert r.status == 302
        locations.append(r.getheader("Location"))
    assert locations == [f"http://127.0.0.1:{p}/home?x=1" for p in s.fe_ports] * 2
    # following the redirect lands on a working frontend
    host_port = locations[0].split("/")[2]
    r = request(int(host_port.split(":")[1]), "GET", "/")
    assert r.status == 200


def test_lb_process_serves_503_without_frontends_and_stops_on_sigterm(procs, tmp_path):
    cfg = tmp_path / "c.toml"
    write_config(cfg, free_port(), [free_port()], free_port())
    lb = procs.start("lb", ["--config", str(cfg), "--id", "lb", "--data", str(tmp_path / "data"), "--port", "0"])
    r = request(lb.port, "GET", "/")
    assert r.status == 503 and r.getheader("Retry-After") == "2"
    lb.terminate()
    assert lb.popen.returncode == 0
    # an id that is not the LB is refused with a clear error
    out = subprocess.run([sys.executable, "-m", "lb", "--config", str(cfg), "--id", "fe1"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 2 and "not the load balancer" in out.stderr
