"""Shared pytest fixtures: `procs` starts real processes and always kills them."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness import ProcSet  # noqa: E402


@pytest.fixture
def procs(tmp_path):
    ps = ProcSet(tmp_path)
    try:
        yield ps
    finally:
        ps.cleanup()
