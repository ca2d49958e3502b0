"""One web frontend: the apps assembled on the HTTP server.

    Frontend(cfg, node, kv, port=None).start() / .port / .stop() / .stats()

The frontend is stateless: accounts, sessions and every user's data live in
the KV store, so any frontend serves any user and a crashed one loses nothing.
It registers the apps of APPS in order, serves /static/<file> from
httpserver/static, and on start makes sure the `admin` account exists (see
`admin_password`).

Each app is `httpserver/apps/<name>.py` with `register(router, ctx)`;
`ctx` is an `AppContext`.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import secrets
import threading
from dataclasses import dataclass, field

from httpserver.serve import HTTPServer
from httpserver.sessions import SWEEP_EVERY_S, Sessions
from src.throttle import LoginThrottle
from httpserver.web import App, Router, StaticFiles
from src.accounts import ADMIN_USER, Accounts
from src.config import Config, Node
from src.drive import Drive
from src.fsutil import fsync_dir
from src.kv import KV, KVError
from src.mailsweep import lister_for

log = logging.getLogger(__name__)

APPS = ("accounts", "home", "drive", "mail", "admin")
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
ADMIN_PASSWORD_FILE = "admin.password"
ADMIN_WAIT_S = 5.0


@dataclass
class AppContext:
    """What every app gets at registration."""

    config: Config
    node: Node
    kv: KV
    accounts: Accounts
    sessions: Sessions
    throttle: LoginThrottle
    static: StaticFiles
    frontend: "Frontend | None" = None
    drive: Drive | None = None   # set by the drive app; the mail app attaches drive files from it
    stop: threading.Event = field(default_factory=threading.Event)   # set when the frontend stops


def admin_password(cfg: Config) -> str:
    """The admin password: `http.admin_password` if set, else `<data_dir>/admin.password`.

    The file is created once with a random password, atomically: written
    (mode 0600) to a unique temp file, fsynced, then hard-linked to its final
    name. A link cannot replace an existing file, so when several frontends
    start at once exactly one wins and the others read the winner's file,
    which is complete the moment it becomes visible.
    """
    if cfg.http.admin_password:
        return cfg.http.admin_password
    os.makedirs(cfg.data_dir, exist_ok=True)
    path = os.path.join(cfg.data_dir, ADMIN_PASSWORD_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secrets.token_urlsafe(12) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            fsync_dir(cfg.data_dir)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


class Frontend:
    def __init__(self, cfg: Config, node: Node, kv: KV, port: int | None = None):
        self.cfg = cfg
        self.node = node
        self.kv = kv
        self.accounts = Accounts(kv)
        self.sessions = Sessions(kv, cfg.http.session_ttl_s)
        self.router = Router()
        self._stop = threading.Event()
        self.ctx = AppContext(config=cfg, node=node, kv=kv, accounts=self.accounts, sessions=self.sessions,
                              throttle=LoginThrottle(), static=StaticFiles(STATIC_DIR), frontend=self,
                              stop=self._stop)
        self.router.route("GET", "/static/<name:path>", login=False, session=False)(
            lambda req, name: self.ctx.static.serve(req, name))
        self.apps: list[str] = []
        for name in APPS:
            mod = importlib.import_module(f"httpserver.apps.{name}")
            mod.register(self.router, self.ctx)
            self.apps.append(name)
        self.app = App(self.router, self.sessions)
        trusted = frozenset({cfg.lb.node.host})
        self.http = HTTPServer(node.host, node.port if port is None else port, self.app, cfg.http,
                               name=node.id, trusted_proxies=trusted)
        self._admin_thread: threading.Thread | None = None

    def start(self) -> "Frontend":
        """Listen, and make sure the admin account exists.

        Waits at most ADMIN_WAIT_S for the admin account (normally a few
        milliseconds); if the store is not reachable yet, the frontend serves
        anyway and a background thread keeps trying every second.
        """
        self.http.start()
        self._admin_thread = threading.Thread(target=self._admin_loop, name=f"{self.node.id}-admin", daemon=True)
        self._admin_thread.start()
        self._admin_thread.join(ADMIN_WAIT_S)
        lister = lister_for(self.kv)
        if lister is not None:
            threading.Thread(target=self._sweep_sessions, args=(lister,), name=f"{self.node.id}-sessions",
                             daemon=True).start()
        return self

    def _sweep_sessions(self, lister) -> None:
        """Every SWEEP_EVERY_S (first at a random moment, so that frontends
        started together do not sweep in step), end expired sessions."""
        wait = random.uniform(1.0, SWEEP_EVERY_S)
        while not self._stop.wait(wait):
            wait = SWEEP_EVERY_S
            try:
                self.sessions.sweep(lister)
            except Exception:
                log.warning("session sweep failed; will retry", exc_info=True)

    def _ensure_admin(self) -> bool:
        try:
            if self.accounts.ensure_admin(ADMIN_USER, admin_password(self.cfg)):
                log.info("created the %s account", ADMIN_USER)
            return True
        except KVError as e:
            log.warning("cannot make sure the admin account exists yet: %s", e)
            return False

    def _admin_loop(self) -> None:
        while not self._ensure_admin():
            if self._stop.wait(1.0):
                return

    @property
    def port(self) -> int:
        return self.http.port

    def stop(self) -> None:
        self._stop.set()
        self.http.stop()
        if self._admin_thread is not None:
            self._admin_thread.join(5)

    def stats(self) -> dict:
        """Load figures for heartbeats and the admin console."""
        return {"id": self.node.id, "port": self.port, "connections": self.http.tcp.connection_count,
                "active_requests": self.http.active_requests, "requests": self.http.requests}
