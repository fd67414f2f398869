"""Stopping a training run loses at most the step in flight: Ctrl-C or SIGTERM is deferred to the
end of the current step, that step is checkpointed, and only then does the run stop.

Without this a stop lost everything since the last periodic checkpoint (`--save-every` steps: for
full fine-tuning, where a checkpoint is ~12 bytes a parameter, those are far apart). A second
Ctrl-C stops at once, as a user who insists expects. Only a single process in its main thread
defers: Python delivers signals to the main thread only, and under torchrun the ranks would see
the signal at different steps and then wait for each other in the checkpoint's collectives.
A SIGKILL (or a power cut) cannot be deferred; such a run resumes from its last checkpoint.
"""
from __future__ import annotations

import signal
import threading

__all__ = ["GracefulStop", "StopRequested"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """Raised after the checkpoint of the last finished step is written (a KeyboardInterrupt, so
    callers that handle Ctrl-C handle it, and the CLI exits 130)."""


class GracefulStop:
    """Context manager: while active, the first SIGINT/SIGTERM only sets `requested`."""

    def __init__(self, enabled: bool = True, log=print):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.log = log
        self.requested: int | None = None  # the signal number, once one arrived
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:  # the second one: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        self.log(f"{signal.Signals(signum).name}: stopping after the step in flight (it will be checkpointed); "
                 "send it again to stop at once")

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        if self.enabled:
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
