"""The values `model.gradient_checkpointing` takes and the blocks each selects (see
lmforge/models/checkpointing.py, which applies them to a model)."""

from __future__ import annotations

import re

from lmforge.config.errors import ConfigError

KEY = "model.gradient_checkpointing"
EVERY = re.compile(r"every-([0-9]+)")


def check_setting(value: bool | int | str) -> None:
    """Refuse a value that names no set of blocks, when the config is read."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{KEY}={value}: a block count must be >= 0 (0 or false: off; true: every block)")
        return
    match = EVERY.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"{KEY}={value!r}: use true, false, a block count k (the first k blocks) or "
                          "every-N (every N-th block, N >= 1)")


def selected_blocks(value: bool | int | str, count: int) -> list[int]:
    """Indices of the blocks, of `count`, that `value` checkpoints."""
    check_setting(value)
    if isinstance(value, bool):
        return list(range(count)) if value else []
    if isinstance(value, int):
        if value > count:
            raise ConfigError(f"{KEY}={value}: the model has {count} blocks; use at most {count} (or true for all)")
        return list(range(value))
    step = int(EVERY.fullmatch(value.strip()).group(1))
    return list(range(0, count, step))
