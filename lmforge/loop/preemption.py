"""SIGTERM as a request to stop: the loop finishes the step it is in, saves a checkpoint and exits.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some seconds before they kill a job.
Dying at once would lose everything since the last periodic checkpoint; a step boundary is the
only place where the model, optimizer, RNG and data position agree, so that is where it stops.
After the last step the loop saves a final checkpoint before the final evaluation; from then on a
SIGTERM stops the run at once (nothing can be lost), and a resumed run evaluates and writes the model.
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
    main thread (a web UI worker, say) signal handlers cannot be set: the guard then does nothing.
    Entering it again (a stage around the trainer's own `with`) nests: the handler stays until the
    outermost exit. After `stop_at_once(message)` a SIGTERM raises Preempted where the process is."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._depth = 0
        self._at_once: str | None = None

    def __enter__(self) -> PreemptionGuard:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._at_once = None
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)
                self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self._at_once is not None:
            self._stop(self._at_once)

    def stop_at_once(self, message: str) -> None:
        """Everything is saved: a SIGTERM from now on (or one that came already) stops the run where it is."""
        if self._depth == 0 or self._previous is None:
            return  # not handling SIGTERM: the default action is as good
        self._at_once = message
        if self.requested:
            self._stop(message)

    def keep_flagging(self) -> None:
        """Back to stopping at the next boundary (the final save failed: the weights are not safe yet)."""
        self._at_once = None

    def _stop(self, message: str) -> None:
        self._at_once = None  # one stop: a second signal during the unwinding must not interrupt it
        try:
            print(message, flush=True)
        except RuntimeError:  # a print already in progress when the signal came (reentrant call)
            pass
        raise Preempted(message)

    def stop_now(self, accelerator) -> bool:
        """Whether to stop at this step boundary. With several processes they decide together (any one
        asked): a process that stopped alone would leave the others waiting in a collective."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)
