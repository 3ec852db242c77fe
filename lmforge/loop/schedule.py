"""The learning-rate schedule: linear warm-up, then constant, linear or cosine decay to a floor."""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int, kind: str, floor: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * decay
