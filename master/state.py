"""The master's durable state: every tablet's view, and each server's boot id.

One small JSON file, `<master dir>/state.json`, replaced atomically (write a
temp file, fsync it, rename it over the old one, fsync the directory: STYLE.md
rule 6). The master saves BEFORE it answers or tells any server about a
change, so whatever a server has heard, a restarted master still knows: it
resumes the same epochs and views and never elects a server that had fallen
out of a view.

    {"version": 1, "tablets": 24, "replication": 3, "servers": ["kv1", ...],
     "views": [{"tablet": 0, "epoch": 3, "primary": "kv1",
                "members": ["kv1", "kv2"], "replicas": ["kv1", "kv2", "kv3"]}, ...],
     "boots": {"kv1": "5f0c...", ...}}

A state file written for another tablet count or server list is refused with
a clear error (re-placing live data is not something to do silently).
"""

from __future__ import annotations

import json
import os

from master.placement import TabletView
from src.fsutil import atomic_write

VERSION = 1


class StateError(Exception):
    """The state file is unreadable or does not match the config."""


class MasterState:
    def __init__(self, directory: str):
        self.dir = directory
        self.path = os.path.join(directory, "state.json")

    def load(self, tablets: int, replication: int, servers: list[str]):
        """(views, boots) from disk, or None when there is no state yet."""
        try:
            with open(self.path, "rb") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StateError(f"{self.path}: cannot read master state: {e}") from None
        try:
            if raw["version"] != VERSION:
                raise StateError(f"{self.path}: unknown version {raw['version']!r}")
            if raw["tablets"] != tablets or raw["replication"] != replication or raw["servers"] != servers:
                raise StateError(
                    f"{self.path}: state is for tablets={raw['tablets']} replication={raw['replication']} "
                    f"servers={raw['servers']}, the config says tablets={tablets} "
                    f"replication={replication} servers={servers}; move the data dir away to start afresh")
            views = {v["tablet"]: TabletView.from_json(v) for v in raw["views"]}
            boots = {str(k): str(v) for k, v in raw.get("boots", {}).items()}
        except (KeyError, TypeError) as e:
            raise StateError(f"{self.path}: malformed master state ({e!r})") from None
        if sorted(views) != list(range(tablets)):
            raise StateError(f"{self.path}: state does not hold exactly tablets 0..{tablets - 1}")
        return views, boots

    def save(self, tablets: int, replication: int, servers: list[str],
             views: dict[int, TabletView], boots: dict[str, str]) -> None:
        """Durably replace the state file (returns once it is on disk)."""
        os.makedirs(self.dir, exist_ok=True)
        data = json.dumps({"version": VERSION, "tablets": tablets, "replication": replication,
                           "servers": servers, "views": [views[t].to_json() for t in sorted(views)],
                           "boots": boots}, indent=1).encode()
        atomic_write(self.path, data)
