"""Training stages; each is a short module with a `run(cfg) -> metrics` function.

`STAGE_RUNNERS` maps a stage name to its module's `run`, guarded so a full disk ends as one line. The CLI
imports this package only when a command trains, so `lmforge --help` does not pay for torch.
"""

from __future__ import annotations

from collections.abc import Callable

from lmforge.config.schema import STAGES
from lmforge.loop.checkpoint import CheckpointError
from lmforge.loop.diskspace import disk_full_message
from lmforge.stages import distill, dpo, grpo, ppo, pt, rloo, rm, sft

STAGE_MODULES = {"pt": pt, "sft": sft, "rm": rm, "dpo": dpo, "ppo": ppo, "grpo": grpo, "rloo": rloo,
                 "distill": distill}
assert set(STAGE_MODULES) == set(STAGES), "every stage the config accepts has a module here"


def _guarded(run: Callable) -> Callable:
    def guarded_run(cfg):
        try:
            return run(cfg)
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

    return guarded_run


STAGE_RUNNERS = {name: _guarded(module.run) for name, module in STAGE_MODULES.items()}
