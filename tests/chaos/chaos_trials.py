"""Trial counts of the hostile-condition tests: the same tests run in CI with small counts and,
with LMFORGE_CHAOS=full, with the full counts the reliability page quotes. (Not a conftest.py: a
second conftest module would shadow tests/conftest.py for the modules that import from it.)"""

from __future__ import annotations

import os

FULL = os.environ.get("LMFORGE_CHAOS", "").lower() == "full"


def trials(cheap: int, full: int) -> int:
    """How many randomised trials a chaos test makes in this run."""
    return full if FULL else cheap

