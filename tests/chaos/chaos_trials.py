"""Hostile-condition tests. The same tests run in CI with small trial counts and, with
LMFORGE_CHAOS=full, with the full counts the reliability page quotes."""

from __future__ import annotations

import os

import pytest

FULL = os.environ.get("LMFORGE_CHAOS", "").lower() == "full"


def trials(cheap: int, full: int) -> int:
    """How many randomised trials a chaos test makes in this run."""
    return full if FULL else cheap


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/chaos" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.chaos)
