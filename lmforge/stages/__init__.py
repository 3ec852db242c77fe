"""Training stages; each is a short module with a `run(cfg) -> metrics` function."""

from __future__ import annotations

import importlib

from lmforge.config.schema import STAGES


def _runner(name: str):
    def run(cfg):
        # Imported on use: `lmforge --help` should not pay for torch and transformers.
        from lmforge.loop.checkpoint import CheckpointError
        from lmforge.loop.diskspace import disk_full_message

        try:
            return importlib.import_module(f"lmforge.stages.{name}").run(cfg)
        except CheckpointError:
            raise
        except Exception as exc:
            # A full disk anywhere else in a run (the config, metrics.jsonl, the data cache, whose library
            # wraps the OSError in its own error): one line naming the folder and the space left, instead
            # of the traceback of whichever write hit it. Any other error goes on as it is.
            message = disk_full_message(cfg.train.output_dir, exc)
            if message is None:
                raise
            raise CheckpointError(message) from exc

    return run


STAGE_RUNNERS = {name: _runner(name) for name in STAGES}
