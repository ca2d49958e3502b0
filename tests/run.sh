#!/usr/bin/env bash
# The one test command: sets up .venv with what the tests need, installs the
# system packages the end-to-end tests drive (Chromium, dnsmasq, swaks, curl)
# when it can (root + apt), then runs pytest. Extra arguments go to pytest:
#   ./tests/run.sh                 everything
#   ./tests/run.sh tests/test_kvproto.py -x
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium fonts-dejavu-core)
command -v dnsmasq  >/dev/null 2>&1 || need_apt+=(dnsmasq-base)
command -v swaks    >/dev/null 2>&1 || need_apt+=(swaks)
command -v curl     >/dev/null 2>&1 || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "tests/run.sh: installing ${need_apt[*]} with apt-get" >&2
        { apt-get update -qq >/dev/null &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null; } \
        || echo "tests/run.sh: apt-get could not install ${need_apt[*]}; tests that need them will be skipped" >&2
    else
        echo "tests/run.sh: missing ${need_apt[*]}; tests that need them will be skipped" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import pytest, dns, playwright, aiosmtpd' >/dev/null 2>&1 \
   || [ requirements-test.txt -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
    touch .venv/.installed
fi

exec .venv/bin/python -m pytest "$@"
