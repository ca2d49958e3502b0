"""A primary's replication stream to one peer (kvserver/cluster.py PeerStream)
against a fake peer: one that takes the stream and then never answers.

Gray-failure case: a replica whose heartbeat thread still beats (so the
master keeps it) while its event loop or its disk is stuck. The stream must
give up on it after IO_TIMEOUT_S without an answer, even though the
primary's state machine keeps probing it meanwhile; the tablet's writes
otherwise waited for that replica for ever."""

import queue
import selectors
import socket
import threading
import time
import types

from kvserver import cluster
from kvserver.replication import Append


class FakeLoop:
    """Just enough of kvserver.loop.EventLoop: calls, flushes and watched
    sockets, all run on one thread."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.calls = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def call_soon(self, fn):
        self.calls.put(fn)

    def flush_soon(self, obj):
        self.calls.put(obj.flush)

    def watch(self, sock, on_readable):
        self.sel.register(sock, selectors.EVENT_READ, on_readable)

    def unwatch(self, sock):
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _run(self):
        while not self.stopped.is_set():
            if self.sel.get_map():
                for key, _ in self.sel.select(0.02):
                    key.data()
            else:
                time.sleep(0.02)
            while True:
                try:
                    fn = self.calls.get_nowait()
                except queue.Empty:
                    break
                fn()


class FakeNode:
    def __init__(self):
        self.server = types.SimpleNamespace(loop=FakeLoop())
        self.secret = ""
        self.stopped = threading.Event()
        self.cc = types.SimpleNamespace(failure_timeout_s=1.0)
        self.events = []

    @staticmethod
    def split(addr):
        host, port = addr.rsplit(":", 1)
        return host, int(port)

    def peer_up(self, peer, lane):
        self.events.append("up")

    def peer_down(self, peer, lane):
        self.events.append("down")

    def on_reply(self, peer, reply):
        self.events.append("reply")


def silent_peer():
    """A peer that accepts REPLSTREAM, then reads everything and answers nothing."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(4)

    def serve():
        while True:
            try:
                conn, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=swallow, args=(conn,), daemon=True).start()

    def swallow(conn):
        with conn:
            got = b""
            while b"\r\n" not in got:
                got += conn.recv(4096)
            conn.sendall(b"+OK\r\n")
            while conn.recv(65536):
                pass
    threading.Thread(target=serve, daemon=True).start()
    return ls


def test_a_peer_that_takes_the_stream_and_never_answers_is_given_up(monkeypatch):
    monkeypatch.setattr(cluster, "IO_TIMEOUT_S", 1.0)
    ls = silent_peer()
    node = FakeNode()
    stream = cluster.PeerStream(node, "kv2", f"127.0.0.1:{ls.getsockname()[1]}", 0)
    try:
        deadline = time.monotonic() + 2.0
        while "up" not in node.events and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.events == ["up"]
        began = time.monotonic()
        while "down" not in node.events and time.monotonic() - began < 4.0:
            stream.put(("msg", Append(0, 1, 5, 1)))    # the state machine's probes, every 0.2 s
            time.sleep(0.2)
        assert "down" in node.events, "the stream kept waiting for a peer that never answers"
        assert time.monotonic() - began < 3.0
    finally:
        node.stopped.set()
        node.server.loop.stopped.set()
        ls.close()
