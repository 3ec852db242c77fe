"""SIGTERM and Ctrl-C as a request to stop: the loop finishes the step it is in, saves a checkpoint and exits.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some seconds before they kill a job, and a
person at the terminal presses Ctrl-C (SIGINT).
Dying at once would lose everything since the last periodic checkpoint; a step boundary is the
only place where the model, optimizer, RNG and data position agree, so that is where it stops.
A second Ctrl-C abandons the step and stops at once without saving (a step can take minutes on a CPU).
After the last step the loop saves a final checkpoint before the final evaluation; from then on a
signal stops the run at once (nothing can be lost), and a resumed run evaluates and writes the model.
"""

from __future__ import annotations

import signal
import threading

import torch

EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
INTERRUPT_STATUS = 128 + signal.SIGINT  # ... and by Ctrl-C
SIGNAL_WORDS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}
"""How messages name the signal that stopped a run."""


class Preempted(SystemExit):
    """The run stopped on SIGTERM (exit 143) or Ctrl-C (exit 130), after saving a checkpoint unless a second
    Ctrl-C abandoned the step; `train.resume=true` continues it."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(INTERRUPT_STATUS if signum == signal.SIGINT else EXIT_STATUS)
        self.message = message
        self.signum = signum

    def __str__(self) -> str:
        return self.message

    @property
    def interrupted(self) -> bool:
        """Stopped by a person (Ctrl-C), not by a scheduler."""
        return self.signum == signal.SIGINT


class PreemptionGuard:
    """While active, SIGTERM and Ctrl-C only set a flag that the loop reads at each step boundary (a second
    Ctrl-C stops at once, without saving). Outside the main thread (a web UI worker, say) signal handlers
    cannot be set: the guard then does nothing. Entering it again (a stage around the trainer's own
    `with`) nests: the handlers stay until the outermost exit. After `stop_at_once(message)` a signal
    raises Preempted where the process is."""

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGTERM
        """The first signal that asked to stop."""
        self.abandon_message = "stopped at once without saving this step"
        """What a second Ctrl-C says (the trainer adds where the last checkpoint is)."""
        self._previous: dict | None = None
        self._depth = 0
        self._at_once: str | None = None

    def __enter__(self) -> PreemptionGuard:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNAL_WORDS}
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._at_once = None
            if self._previous is not None:
                for signum, handler in self._previous.items():
                    signal.signal(signum, handler)
                self._previous = None

    @property
    def word(self) -> str:
        """SIGTERM or Ctrl-C: the signal that asked to stop, as messages name it."""
        return SIGNAL_WORDS[self.signum]

    def _handle(self, signum, frame) -> None:
        if self._at_once is not None:
            self.requested, self.signum = True, signum
            self._stop(self._at_once.replace("SIGTERM", SIGNAL_WORDS[signum], 1))
        if self.requested and signum == signal.SIGINT:  # Ctrl-C twice: the person will not wait for the step
            self._stop(f"Ctrl-C again: {self.abandon_message}", signum)
        if not self.requested:
            self.requested, self.signum = True, signum
            if signum == signal.SIGINT:
                self._say("Ctrl-C: stopping after this step and saving a checkpoint "
                          "(Ctrl-C again stops at once without saving)")

    def stop_at_once(self, message: str) -> None:
        """Everything is saved: a signal from now on (or one that came already) stops the run where it is.
        `message` names the signal as SIGTERM; a Ctrl-C's says Ctrl-C instead."""
        if self._depth == 0 or self._previous is None:
            return  # not handling the signals: the default action is as good
        self._at_once = message
        if self.requested:
            self._stop(message.replace("SIGTERM", self.word, 1))

    def keep_flagging(self) -> None:
        """Back to stopping at the next boundary (the final save failed: the weights are not safe yet)."""
        self._at_once = None

    def _stop(self, message: str, signum: int | None = None) -> None:
        self._at_once = None  # one stop: a second signal during the unwinding must not interrupt it
        self._ignore_more()
        self._say(message)
        raise Preempted(message, self.signum if signum is None else signum)

    def _ignore_more(self) -> None:
        """Further signals while the run unwinds would interrupt its clean-up with a traceback."""
        if self._previous is not None:
            for signum in SIGNAL_WORDS:
                signal.signal(signum, signal.SIG_IGN)

    @staticmethod
    def _say(message: str) -> None:
        try:
            print(message, flush=True)
        except RuntimeError:  # a print already in progress when the signal came (reentrant call)
            pass

    def stop_now(self, accelerator) -> bool:
        """Whether to stop at this step boundary. With several processes they decide together (any one
        asked): a process that stopped alone would leave the others waiting in a collective."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum") > 0)
