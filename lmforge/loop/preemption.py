"""SIGTERM as a request to stop: the loop finishes the step it is in, saves a checkpoint and exits.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some seconds before they kill a job.
Dying at once would lose everything since the last periodic checkpoint; a step boundary is the
only place where the model, optimizer, RNG and data position agree, so that is where it stops.
"""

from __future__ import annotations

import signal
import threading

import torch

EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(SystemExit):
    """The run saved a checkpoint after SIGTERM and stops; `train.resume=true` continues it."""

    def __init__(self, message: str):
        super().__init__(EXIT_STATUS)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionGuard:
    """While active, SIGTERM only sets a flag that the loop reads at each step boundary. Outside the
    main thread (a web UI worker, say) signal handlers cannot be set: the guard then does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def stop_now(self, accelerator) -> bool:
        """Whether to stop at this step boundary. With several processes they decide together (any one
        asked): a process that stopped alone would leave the others waiting in a collective."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)
