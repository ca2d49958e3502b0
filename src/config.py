"""Cluster configuration: one TOML file read once into frozen dataclasses.

Every process of PennCloud is started with `--config FILE --id NAME`; the file
describes the whole cluster (every address, every limit), so the same file is
handed to every process and nothing hard-codes an address. `load_config` reads
it with `tomllib`, fills in defaults, validates every value and returns a
`Config`. Any problem raises `ConfigError` naming the file, the key and what is
wrong; unknown keys are errors too, since a typo in a config file would
otherwise be silently ignored.

Sizes may be written as integers (bytes) or strings with a unit: "64MiB",
"1 GiB", "512KiB". Durations are seconds (int or float).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ConfigError(Exception):
    """A config file is missing, unreadable, or holds a bad value."""


@dataclass(frozen=True)
class Node:
    """One process of the cluster: a name and the address it listens on."""

    id: str
    host: str
    port: int

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ClusterConfig:
    tablets: int = 24
    replication: int = 3
    secret: str = ""
    heartbeat_interval_s: float = 0.2
    failure_timeout_s: float = 1.0


@dataclass(frozen=True)
class StorageConfig:
    memory_budget_bytes: int = 256 * MiB
    checkpoint_log_bytes: int = 64 * MiB
    checkpoint_interval_s: float = 300.0
    max_cell_bytes: int = 64 * MiB
    group_commit: bool = True


@dataclass(frozen=True)
class HttpConfig:
    max_line_bytes: int = 8 * KiB
    max_header_bytes: int = 64 * KiB
    max_body_bytes: int = 64 * GiB
    idle_timeout_s: float = 30.0
    session_ttl_s: float = 1800.0
    admin_password: str = ""


@dataclass(frozen=True)
class DriveConfig:
    chunk_bytes: int = 1 * MiB
    quota_bytes: int = 10 * GiB


@dataclass(frozen=True)
class MailConfig:
    domain: str = "penncloud.local"
    smtp: Node = Node("smtp", "127.0.0.1", 2500)
    pop3: Node = Node("pop3", "127.0.0.1", 1100)
    relay_id: str = "relay"
    resolver: str = ""  # "host:port" of a DNS server; "" = the system's
    relay_port: int = 25  # the port of remote SMTP servers
    max_message_bytes: int = 25 * MiB
    retry_initial_s: float = 60.0
    retry_for_s: float = 4 * 24 * 3600.0


@dataclass(frozen=True)
class LBConfig:
    node: Node = Node("lb", "127.0.0.1", 8080)
    policy: str = "round_robin"  # or "least_loaded"
    mode: str = "proxy"  # or "redirect"
    heartbeat_timeout_s: float = 3.0


@dataclass(frozen=True)
class Config:
    path: str
    data_dir: str
    cluster: ClusterConfig
    storage: StorageConfig
    master: Node
    kvservers: tuple[Node, ...]
    frontends: tuple[Node, ...]
    lb: LBConfig
    mail: MailConfig
    http: HttpConfig
    drive: DriveConfig
    processes: tuple[Node, ...] = field(default=())

    def node(self, node_id: str) -> Node:
        """The process named `node_id`; ConfigError if the file has none."""
        for n in self.processes:
            if n.id == node_id:
                return n
        raise ConfigError(f"{self.path}: no process with id {node_id!r}")

    def process_dir(self, node_id: str) -> str:
        """`<data_dir>/<id>`: where a process keeps its files."""
        return os.path.join(self.data_dir, node_id)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$", re.I)
_UNITS = {"b": 1, "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}


def parse_size(text: str) -> int:
    """Bytes in a size such as "64MiB", "1 GiB" or "4096"; ValueError otherwise."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size such as 64MiB: {text!r}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]


# A host name or an IPv4 address. Not an IPv6 literal: addresses travel as
# `host:port` (KV replies, MAP, URLs) with no brackets, so "::1" would come
# out as "::1:7000", and "[::1]" is not an address a socket can bind.
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class _Reader:
    """Reads typed values out of one TOML table, naming file and key in errors."""

    def __init__(self, path: str, section: str, table: Any):
        self.path = path
        self.section = section
        if not isinstance(table, dict):
            self.fail("", "must be a table")
        self.table = dict(table)

    def where(self, key: str) -> str:
        return f"{self.section}.{key}" if self.section else key

    def fail(self, key: str, problem: str):
        raise ConfigError(f"{self.path}: {self.where(key) or '(top)'}: {problem}")

    def take(self, key: str, default: Any) -> Any:
        return self.table.pop(key, default)

    def str(self, key: str, default: str) -> str:
        v = self.take(key, default)
        if not isinstance(v, str):
            self.fail(key, f"must be a string, not {v!r}")
        return v

    def int(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self.take(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be an integer, not {v!r}")
        self._range(key, v, lo, hi)
        return v

    def float(self, key: str, default: float, lo: float | None = None) -> float:
        v = self.take(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            # (nan passes every comparison: a failure_timeout_s of nan meant no failover, ever)
            self.fail(key, f"must be a number of seconds, not {v!r}")
        self._range(key, v, lo, None)
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.take(key, default)
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, not {v!r}")
        return v

    def size(self, key: str, default: int, lo: int = 0) -> int:
        v = self.take(key, default)
        if isinstance(v, str):
            try:
                v = parse_size(v)
            except ValueError:
                self.fail(key, f"must be a size such as 64MiB, not {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be a size in bytes or a string such as '64MiB', not {v!r}")
        self._range(key, v, lo, None)
        return v

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.str(key, default)
        if v not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, not {v!r}")
        return v

    def _range(self, key, v, lo, hi):
        if lo is not None and v < lo:
            self.fail(key, f"must be at least {lo}, not {v}")
        if hi is not None and v > hi:
            self.fail(key, f"must be at most {hi}, not {v}")

    def node(self, default_id: str, default_host: str, default_port: int) -> Node:
        node_id = self.id("id", default_id)
        host = self.str("host", default_host)
        if not _HOST_RE.fullmatch(host):
            # (a trailing space made the launcher take the server for a remote one)
            why = " (IPv6 addresses are not supported)" if ":" in host else ""
            self.fail("host", f"must be a host name or an IPv4 address, not {host!r}{why}")
        port = self.int("port", default_port, 0, 65535)
        return Node(node_id, host, port)

    def id(self, key: str, default: str) -> str:
        """A process id: it names files (pid, log) and directories, so no '/'."""
        v = self.str(key, default)
        if not _ID_RE.fullmatch(v) or v in (".", ".."):
            self.fail(key, f"must be 1-64 letters, digits, '.', '_' or '-', not {v!r}")
        return v

    def done(self):
        if self.table:
            key = sorted(self.table)[0]
            if not self.section and isinstance(self.table[key], (dict, list)):
                self.fail(key, f"unknown section [{key}]")
            self.fail(key, "unknown key")


def load_config(path: str, data_dir: str | None = None) -> Config:
    """Read and validate the cluster description at `path`.

    `data_dir`, when given, overrides the file's `data_dir` (the command line's
    or $PENNCLOUD_DATA's choice, resolved by `__main__`). A relative data_dir
    in the file is taken relative to the file's directory (`configs/local.toml`
    says `../data`: the checkout's `data/`).
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_config(raw, path, data_dir)


def parse_config(raw: dict, path: str = "<config>", data_dir: str | None = None) -> Config:
    top = _Reader(path, "", raw)

    file_data_dir = top.str("data_dir", "data")
    if data_dir is None:
        data_dir = file_data_dir
        if not os.path.isabs(data_dir):
            data_dir = os.path.join(os.path.dirname(os.path.abspath(path)), data_dir)
    data_dir = os.path.abspath(data_dir)

    r = _Reader(path, "cluster", top.take("cluster", {}))
    cluster = ClusterConfig(
        tablets=r.int("tablets", 24, 1, 4096),
        replication=r.int("replication", 3, 1, 16),
        secret=r.str("secret", ""),
        heartbeat_interval_s=r.float("heartbeat_interval_s", 0.2, 0.01),
        failure_timeout_s=r.float("failure_timeout_s", 1.0, 0.05),
    )
    r.done()
    if cluster.failure_timeout_s <= cluster.heartbeat_interval_s:
        raise ConfigError(f"{path}: cluster.failure_timeout_s: must be longer than heartbeat_interval_s")

    r = _Reader(path, "storage", top.take("storage", {}))
    storage = StorageConfig(
        memory_budget_bytes=r.size("memory_budget", 256 * MiB, 64 * KiB),
        checkpoint_log_bytes=r.size("checkpoint_log_bytes", 64 * MiB, 4 * KiB),
        checkpoint_interval_s=r.float("checkpoint_interval_s", 300.0, 0.1),
        max_cell_bytes=r.size("max_cell_bytes", 64 * MiB, 1),
        group_commit=r.bool("group_commit", True),
    )
    r.done()

    r = _Reader(path, "master", top.take("master", {}))
    master = r.node("master", "127.0.0.1", 7000)
    r.done()

    kvservers = tuple(_node_list(path, "kvserver", top.take("kvserver", []), "kv", 7001))
    frontends = tuple(_node_list(path, "frontend", top.take("frontend", []), "fe", 8081))

    r = _Reader(path, "lb", top.take("lb", {}))
    lb = LBConfig(
        node=r.node("lb", "127.0.0.1", 8080),
        policy=r.choice("policy", "round_robin", ("round_robin", "least_loaded")),
        mode=r.choice("mode", "proxy", ("proxy", "redirect")),
        heartbeat_timeout_s=r.float("heartbeat_timeout_s", 3.0, 0.1),
    )
    r.done()

    r = _Reader(path, "mail", top.take("mail", {}))
    domain = r.str("domain", "penncloud.local").lower()
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", domain):
        r.fail("domain", f"is not a valid domain name: {domain!r}")
    smtp = _Reader(path, "mail.smtp", r.take("smtp", {}))
    smtp_node = smtp.node("smtp", "127.0.0.1", 2500)
    smtp.done()
    pop3 = _Reader(path, "mail.pop3", r.take("pop3", {}))
    pop3_node = pop3.node("pop3", "127.0.0.1", 1100)
    pop3.done()
    resolver = r.str("resolver", "")
    if resolver and not re.fullmatch(r"[^:\s]+:\d{1,5}", resolver):
        r.fail("resolver", f"must be 'host:port' or empty, not {resolver!r}")
    mail = MailConfig(
        domain=domain,
        smtp=smtp_node,
        pop3=pop3_node,
        relay_id=r.id("relay_id", "relay"),
        resolver=resolver,
        relay_port=r.int("relay_port", 25, 1, 65535),
        max_message_bytes=r.size("max_message_bytes", 25 * MiB, 1 * KiB),
        retry_initial_s=r.float("retry_initial_s", 60.0, 0.01),
        retry_for_s=r.float("retry_for_s", 4 * 24 * 3600.0, 0.0),
    )
    r.done()

    r = _Reader(path, "http", top.take("http", {}))
    http = HttpConfig(
        max_line_bytes=r.size("max_line_bytes", 8 * KiB, 256),
        max_header_bytes=r.size("max_header_bytes", 64 * KiB, 1 * KiB),
        max_body_bytes=r.size("max_body_bytes", 64 * GiB, 1),
        idle_timeout_s=r.float("idle_timeout_s", 30.0, 0.1),
        session_ttl_s=r.float("session_ttl_s", 1800.0, 1.0),
        admin_password=r.str("admin_password", ""),
    )
    r.done()

    r = _Reader(path, "drive", top.take("drive", {}))
    drive = DriveConfig(
        chunk_bytes=r.size("chunk_bytes", 1 * MiB, 1),
        quota_bytes=r.size("quota_bytes", 10 * GiB, 0),
    )
    r.done()
    top.done()

    relay = Node(mail.relay_id, smtp_node.host, 0)
    processes = (master, *kvservers, *frontends, lb.node, smtp_node, pop3_node, relay)
    seen: set[str] = set()
    listening: dict[tuple[str, int], str] = {}
    for n in processes:
        if n.id in seen:
            raise ConfigError(f"{path}: two processes are named {n.id!r}")
        seen.add(n.id)
        if n.port:          # (0: any free port, for a process a test starts itself)
            other = listening.setdefault((n.host, n.port), n.id)
            if other != n.id:
                raise ConfigError(f"{path}: {other!r} and {n.id!r} would both listen on {n.host}:{n.port}")
    if kvservers and cluster.replication > len(kvservers):
        raise ConfigError(
            f"{path}: cluster.replication: {cluster.replication} replicas need at least "
            f"that many [[kvserver]] entries, the file has {len(kvservers)}")

    return Config(path=path, data_dir=data_dir, cluster=cluster, storage=storage,
                  master=master, kvservers=kvservers, frontends=frontends, lb=lb,
                  mail=mail, http=http, drive=drive, processes=processes)


def _node_list(path: str, name: str, items: Any, prefix: str, first_port: int) -> list[Node]:
    if not isinstance(items, list):
        raise ConfigError(f"{path}: {name}: must be an array of tables ([[{name}]])")
    nodes = []
    for i, item in enumerate(items):
        r = _Reader(path, f"{name}[{i}]", item)
        nodes.append(r.node(f"{prefix}{i + 1}", "127.0.0.1", first_port + i))
        r.done()
    return nodes
