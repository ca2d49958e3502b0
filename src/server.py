"""The TCP server base of every PennCloud process but the tablet servers
(which serve every connection from one event loop: kvserver/loop.py).

    TCPServer(host, port, handle_connection, name)
      .start()  bind + listen (port 0 allowed; the real port is in .port),
                then an accept thread hands each connection to its own thread
      .stop()   close the listener and every open connection, join threads

    TCPService(host, port, name)       a subclass's `_serve(sock, peer)` on a
                                       TCPServer, with .port, .start(), .stop()

`handle_connection(sock, peer)` runs on the connection's thread and owns the
socket for the connection's life; the base closes it afterwards. A handler
that raises is logged and the connection closed: one bad client never takes
the server down. `stop()` shuts every open socket down, so handlers blocked in
`recv` return at once and the join is quick.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket, tuple], None]
ACCEPT_PAUSE_S = 0.5    # after accept() failed (out of file descriptors): try again after this


def listen(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening socket on host:port (port 0: any free one). An OSError
    names the address, so "Address already in use" says which one."""
    ls = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        ls.bind((host, port))
        ls.listen(backlog)
    except OSError as e:
        ls.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return ls


class TCPServer:
    def __init__(self, host: str, port: int, handle_connection: Handler, name: str = "server",
                 backlog: int = 128, nodelay: bool = True):
        self.host = host
        self.requested_port = port
        self.port = 0
        self.name = name
        self._handle = handle_connection
        self._backlog = backlog
        self._nodelay = nodelay
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------

    def start(self) -> "TCPServer":
        """Bind and start accepting. Raises OSError (e.g. port in use) here, in the caller."""
        ls = listen(self.host, self.requested_port, self._backlog)
        self._listener = ls
        self.port = ls.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._accept_thread.start()
        log.info("%s listening on %s:%d", self.name, self.host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, and join the threads.

        `timeout` bounds the whole join, not each thread: a handler stuck in
        something a socket shutdown does not interrupt cannot make a process
        outlive its stop grace (it is a daemon thread and dies with it)."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        self.close_connections()
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))

    def close_connections(self, keep: socket.socket | None = None) -> None:
        """Shut down every open connection (except `keep`), as a crash would."""
        with self._lock:
            conns = [c for c in self._conns if c is not keep]
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- internals -------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                # Out of file descriptors (or memory): the connection stays in
                # the backlog, and accept() would fail again at once; wait
                # instead of spinning (and filling the log).
                log.warning("%s: accept failed (%s): not accepting for %.1fs, %d connections open",
                            self.name, e, ACCEPT_PAUSE_S, self.connection_count)
                self._stopping.wait(ACCEPT_PAUSE_S)
                continue
            if self._nodelay and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(sock, peer), name=f"{self.name}-conn", daemon=True)
            with self._lock:
                self._conns.add(sock)
                self._threads.add(t)
            t.start()

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        try:
            self._handle(sock, peer)
        except (ConnectionError, TimeoutError, socket.timeout):
            pass
        except OSError as e:
            if not self._stopping.is_set():
                log.debug("%s: connection from %s ended: %s", self.name, peer, e)
        except Exception:
            log.exception("%s: handler for %s failed", self.name, peer)
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._conns.discard(sock)
                self._threads.discard(threading.current_thread())


class TCPService:
    """A server that is one TCPServer calling its `_serve(sock, peer)` for
    each connection (HTTP, SMTP, POP3): the port, start and stop they share."""

    def __init__(self, host: str, port: int, name: str):
        self.tcp = TCPServer(host, port, self._serve, name=name)

    @property
    def port(self) -> int:
        return self.tcp.port

    def start(self):
        self.tcp.start()
        return self

    def stop(self) -> None:
        self.tcp.stop()

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        raise NotImplementedError
