"""run_all.sh as a user runs it: start a whole (small) cluster from a config,
report status, restart only what died, stop everything."""

import os
import signal
import subprocess

import pytest

from tests.harness import REPO, free_port, wait_until


def write_config(tmp_path):
    p = {name: free_port() for name in ("master", "kv1", "kv2", "kv3", "fe1", "smtp", "pop3", "lb")}
    cfg = f"""
data_dir = "{tmp_path / 'data'}"
[cluster]
tablets = 6
replication = 2
[http]
admin_password = "admin password"
[master]
port = {p['master']}
[[kvserver]]
id = "kv1"
port = {p['kv1']}
[[kvserver]]
id = "kv2"
port = {p['kv2']}
[[kvserver]]
id = "kv3"
port = {p['kv3']}
[[frontend]]
id = "fe1"
port = {p['fe1']}
[lb]
port = {p['lb']}
[mail.smtp]
port = {p['smtp']}
[mail.pop3]
port = {p['pop3']}
"""
    path = tmp_path / "small.toml"
    path.write_text(cfg)
    return str(path), p


def run_all(*args, timeout=180):
    return subprocess.run([os.path.join(REPO, "run_all.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def status(config):
    out = run_all("status", "--config", config).stdout
    return {line.split()[0]: line.split() for line in out.splitlines()}


@pytest.mark.slow
def test_start_status_restart_stop(tmp_path):
    config, ports = write_config(tmp_path)
    try:
        r = run_all("start", "--config", config)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"http://127.0.0.1:{ports['lb']}/" in r.stdout
        assert "password admin password" not in r.stdout  # the config's password is not echoed
        assert f"status: ./run_all.sh status --config {config}" in r.stdout
        assert run_all("status", "--config", config).returncode == 0      # all up
        st = status(config)
        assert set(st) == {"master", "kv1", "kv2", "kv3", "fe1", "smtp", "pop3", "relay", "lb"}
        for name, fields in st.items():
            assert len(fields) == 4 and fields[3] == "up", fields
        assert st["kv2"][2] == f"127.0.0.1:{ports['kv2']}"
        assert (tmp_path / "data" / "log" / "kv2.log").exists()

        # A crash: only the dead process is started again, the others keep their pids.
        os.kill(int(st["kv2"][1]), signal.SIGKILL)
        wait_until(lambda: status(config)["kv2"][3] == "down", 10, what="kv2 reported down")
        assert run_all("status", "--config", config).returncode == 3      # a health check sees it
        r = run_all("start", "--config", config)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "kv2      started" in r.stdout and "kv1      already running" in r.stdout
        st2 = status(config)
        assert st2["kv1"][1] == st["kv1"][1] and st2["kv2"][1] != st["kv2"][1]
        assert all(f[3] == "up" for f in st2.values())
    finally:
        r = run_all("stop", "--config", config)
    assert r.returncode == 0
    st = status(config)
    assert all(f[1] == "-" and f[3] == "down" for f in st.values()), st


def test_bad_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster]\ntablets = 'many'\n")
    r = run_all("status", "--config", str(bad))
    assert r.returncode == 2
    assert "cluster.tablets: must be an integer" in r.stderr


def test_only_this_hosts_processes_are_started_here():
    # Binding tells whether an address is ours; no packet is sent anywhere.
    from src.launcher import is_local
    assert is_local("127.0.0.1")
    assert not is_local("192.0.2.1")  # TEST-NET-1, never assigned to a machine


def test_status_into_a_closed_pipe_is_quiet(tmp_path):
    """`./run_all.sh status | head -1`: the reader goes away early; the
    launcher carries on without a traceback."""
    config, _ = write_config(tmp_path)
    p = subprocess.Popen([os.path.join(REPO, "run_all.sh"), "status", "--config", config], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()                      # nobody will read what it says
    err = p.stderr.read().decode()
    assert p.wait(60) == 3                # nothing of this cluster runs: "not running", not a crash
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_big_log_is_set_aside_at_the_next_start(tmp_path):
    """Process logs are plain files the launcher opens; one over the limit
    becomes <name>.log.1 when the process is started again."""
    from src.launcher import rotate_log
    log = tmp_path / "kv1.log"
    log.write_bytes(b"old\n" * 100)
    rotate_log(str(log), keep_bytes=1000)
    assert log.read_bytes() == b"old\n" * 100                 # small: kept as it is
    log.write_bytes(b"x" * 2000)
    rotate_log(str(log), keep_bytes=1000)
    assert not log.exists() and (tmp_path / "kv1.log.1").read_bytes() == b"x" * 2000
    rotate_log(str(tmp_path / "never.log"))                    # no log yet: nothing to do


def test_a_pid_file_naming_another_clusters_process_is_not_ours(tmp_path):
    """Ops QA: stop with the --data of a backup copy (its pid files copied
    too) stopped the live cluster: a pid counted as ours when its command
    line had `--id kv1`, whatever its data directory."""
    import sys
    from src.config import load_config
    from src.launcher import Launcher, ProcessSpec
    cfg_path, _ = write_config(tmp_path)
    cfg = load_config(cfg_path)
    launcher = Launcher(cfg, cfg_path, out=open(os.devnull, "w"))
    spec = ProcessSpec("kv1", "kvserver", "127.0.0.1", 0)
    os.makedirs(launcher.run_dir, exist_ok=True)
    procs = []
    try:
        for data in ("/some/other/data", cfg.data_dir):
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                  "--id", "kv1", "--data", data])
            procs.append(p)
            with open(launcher.pid_path(spec), "w") as f:
                f.write(f"{p.pid}\n")
            wait_until(lambda: os.path.exists(f"/proc/{p.pid}/cmdline") and
                       b"--data" in open(f"/proc/{p.pid}/cmdline", "rb").read(), 5, what="the process runs")
        assert launcher.running_pid(spec) == procs[1].pid       # this cluster's kv1
        with open(launcher.pid_path(spec), "w") as f:
            f.write(f"{procs[0].pid}\n")
        assert launcher.running_pid(spec) is None                # another cluster's kv1
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_sigterm_taken_by_another_thread_still_stops_the_process(tmp_path):
    """Ops QA: the master sometimes ignored SIGTERM until the launcher's
    SIGKILL. Linux gives a signal to any thread; Python runs the handler
    (which sets the stop event) in the main thread, which sat in
    `stop.wait()` with no timeout and never ran it. Here the main thread
    blocks SIGTERM, so another thread must take it, as happens by chance."""
    import sys
    import time
    script = tmp_path / "proc.py"
    script.write_text(
        "import signal, sys, threading, time\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from src import process\n"
        "stop = process.stop_event()\n"
        "threading.Thread(target=lambda: time.sleep(60), daemon=True).start()\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "print('READY', flush=True)\n"
        "process.wait_for(stop)\n"
        "print('STOPPED', flush=True)\n")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "READY"
        began = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0 and p.stdout.readline().strip() == "STOPPED"
        assert time.monotonic() - began < 5
    finally:
        p.kill()
        p.wait()


def test_mistakes_running_it_are_one_line_errors_and_start_nothing(tmp_path):
    """Ops QA: a data directory that is a file gave a traceback; port = 0
    started a tablet server nobody could find; a relative --config was
    looked up in the checkout, not where the user typed it."""
    config, _ = write_config(tmp_path)
    as_file = tmp_path / "not-a-dir"
    as_file.write_text("x")
    r = run_all("start", "--config", config, "--data", str(as_file))
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(as_file) in r.stderr
    zero = tmp_path / "zero.toml"
    zero.write_text(open(config).read().replace("[[kvserver]]\nid = \"kv1\"\nport = ",
                                                "[[kvserver]]\nid = \"kv1\"\nport = 0 #"))
    r = run_all("start", "--config", str(zero))
    assert r.returncode == 2 and "kv1 need a port" in r.stdout + r.stderr
    assert not os.path.exists(tmp_path / "data" / "run" / "master.pid")
    # A relative path is relative to the user's directory.
    r = subprocess.run([os.path.join(REPO, "run_all.sh"), "status", "--config", os.path.basename(config)],
                       capture_output=True, text=True, timeout=60, cwd=os.path.dirname(config))
    assert r.returncode == 3 and "no such config file" not in r.stderr


def test_two_launchers_on_one_cluster_take_turns(tmp_path):
    import threading
    from src.launcher import one_at_a_time
    order = []
    with one_at_a_time(str(tmp_path)):
        t = threading.Thread(target=lambda: (one_at_a_time(str(tmp_path)).__enter__(), order.append("second")))
        t.start()
        t.join(0.5)
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"]


def test_status_calls_a_frozen_or_killed_tablet_server_down(tmp_path):
    """Ops QA: `status` (a health check: exit 0 only when all are up) said
    "up" for a SIGSTOPped tablet server, since the kernel still accepts its
    connections, and for one KILLed from the admin console."""
    from src.config import load_config
    from src.kvclient import ServerClient
    from src.launcher import Launcher, ProcessSpec
    from tests.harness import Proc
    config, _ = write_config(tmp_path)
    launcher = Launcher(load_config(config), config, out=open(os.devnull, "w"))
    kv = Proc("kvserver", ["--standalone", "--port", "0", "--data", str(tmp_path / "kv"), "--tablets", "4"]).start()
    try:
        spec = ProcessSpec("kv1", "kvserver", "127.0.0.1", kv.port)
        assert launcher.answers(spec)
        os.kill(kv.popen.pid, signal.SIGSTOP)
        try:
            assert not launcher.answers(spec)
        finally:
            os.kill(kv.popen.pid, signal.SIGCONT)
        assert launcher.answers(spec)
        admin = ServerClient(f"127.0.0.1:{kv.port}", timeout=5)
        admin.call("KILL")
        assert not launcher.answers(spec)
        admin.call("WAKE")
        assert launcher.answers(spec)
        admin.close()
    finally:
        kv.kill()


def test_stop_says_so_when_nothing_was_running(tmp_path):
    config, _ = write_config(tmp_path)
    r = run_all("stop", "--config", config)
    assert r.returncode == 0 and "nothing of this cluster was running" in r.stdout
