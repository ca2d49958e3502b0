"""The shared TCP server base: port 0, one thread per connection, a bad
handler does not take the server down, and stop() is bounded in time."""

import os
import socket
import threading
import time

from src.server import TCPServer
from tests.harness import wait_until


def echo(sock, peer):
    while data := sock.recv(1024):
        sock.sendall(data)


def test_port_zero_echo_and_clean_stop():
    srv = TCPServer("127.0.0.1", 0, echo, name="echo").start()
    assert srv.port > 0
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(5)]
    for i, c in enumerate(conns):
        c.sendall(b"hi %d" % i)
        assert c.recv(100) == b"hi %d" % i
    t = time.monotonic()
    srv.stop()
    assert time.monotonic() - t < 2.0
    for c in conns:  # every open connection was closed by stop()
        assert c.recv(100) == b""
        c.close()


def test_a_failing_handler_does_not_kill_the_server():
    calls = []

    def handler(sock, peer):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in one connection")
        sock.sendall(b"ok")

    srv = TCPServer("127.0.0.1", 0, handler).start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
            assert c.recv(10) == b""
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as c:
            assert c.recv(10) == b"ok"
    finally:
        srv.stop()


def test_stop_is_bounded_even_with_stuck_handlers():
    never = threading.Event()

    def stuck(sock, peer):
        never.wait(30)  # not interrupted by a socket shutdown

    srv = TCPServer("127.0.0.1", 0, stuck).start()
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(4)]
    wait_until(lambda: srv.connection_count == 4, 5, what="4 connections accepted")
    t = time.monotonic()
    srv.stop(timeout=1.0)
    assert time.monotonic() - t < 2.0   # one bound for all, not 1 s per thread
    never.set()
    for c in conns:
        c.close()


def test_out_of_file_descriptors_backs_off_instead_of_spinning(caplog):
    """When accept() fails for lack of file descriptors, the connection waits
    in the backlog; the server must pause, not retry in a tight loop (which
    burns a core and floods the log), and accept again once fds free up."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = TCPServer("127.0.0.1", 0, echo, name="fdlimit").start()
    # The clients' sockets are made first, so that they own their fds; then
    # the limit is set to the lowest free fd number, so no new fd can be had
    # by anyone (the server's accept included) while they connect.  Counting
    # free fds and sharing them between clients and server raced the server's
    # accepts against the clients' socket() calls.
    clients = [socket.socket() for _ in range(6)]
    try:
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        with caplog.at_level("WARNING", logger="src.server"):
            for c in clients:        # connecting needs no new fd; accepting does
                c.settimeout(5)
                c.connect(("127.0.0.1", srv.port))
            time.sleep(1.0)
        failures = [r for r in caplog.records if "accept failed" in r.getMessage()]
        assert 1 <= len(failures) <= 4            # about one per 0.5 s pause, not thousands
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for c in clients:
            c.sendall(b"x")
            assert c.recv(10) == b"x"             # every waiting connection was accepted
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for c in clients:
            c.close()
        srv.stop()


def test_a_port_in_use_is_named_in_the_error():
    """Ops QA: "Address already in use" in a log did not say which address,
    and a cluster has a dozen; both listeners (this base and the tablet
    server's loop) say it."""
    import errno
    import pytest
    from kvserver.loop import EventLoop
    taken = TCPServer("127.0.0.1", 0, echo, name="first").start()
    try:
        with pytest.raises(OSError) as e:
            TCPServer("127.0.0.1", taken.port, echo, name="second").start()
        assert e.value.errno == errno.EADDRINUSE and f"127.0.0.1:{taken.port}" in str(e.value)
        with pytest.raises(OSError) as e:
            EventLoop(None, "127.0.0.1", taken.port, "kv", 1).start()
        assert f"127.0.0.1:{taken.port}" in str(e.value)
    finally:
        taken.stop()
