"""Logging set-up, called only from each process's `__main__`.

Every line carries the time, the process name (the config id) and the module,
so the logs of a whole cluster can be merged and still read. Modules only ever
do `log = logging.getLogger(__name__)`.
"""

from __future__ import annotations

import logging
import sys


def configure(process_name: str, level: str = "INFO", path: str | None = None) -> None:
    fmt = f"%(asctime)s {process_name} %(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
