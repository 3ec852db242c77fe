"""Training stages; each is a short module with a `run(cfg) -> metrics` function."""

from __future__ import annotations

import importlib

from lmforge.config.schema import STAGES


def _runner(name: str):
    def run(cfg):
        # Imported on use: `lmforge --help` should not pay for torch and transformers.
        return importlib.import_module(f"lmforge.stages.{name}").run(cfg)

    return run


STAGE_RUNNERS = {name: _runner(name) for name in STAGES}
