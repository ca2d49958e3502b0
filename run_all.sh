#!/usr/bin/env bash
# Run PennCloud on this machine.
#   ./run_all.sh [start]     set up .venv, start what is not running, print URLs
#   ./run_all.sh stop        stop everything
#   ./run_all.sh status      <name> <pid|-> <host:port> <up|down>, one per process
#   --config FILE            another cluster description (default configs/local.toml)
#   --data DIR               another data directory (or set PENNCLOUD_DATA)
set -euo pipefail
export PENNCLOUD_CWD="$PWD"     # relative --config/--data paths mean relative to here
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import dns' >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
fi
exec .venv/bin/python -m src.launcher "$@"
