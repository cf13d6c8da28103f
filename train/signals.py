"""Stop signals: SIGTERM (preemption; torchrun forwards it) and SIGUSR1 (SLURM's ``--signal=USR1@<seconds>``
warning) are recorded, never fatal, so the trainer can checkpoint at its next step boundary and leave cleanly.

Signals belong to the process, so the record is one module-level object. ``python -m train`` installs it before
importing anything heavy: a warning that arrives while torch is still importing would otherwise kill the process
with the default action, losing the work since the last checkpoint. This module imports nothing but the standard
library for that reason.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Records the first stop signal the process receives."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        """Take over the stop signals (from the main thread); False if already installed."""
        if self._previous:
            return False
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = self.received or signal.Signals(signum).name

    def restore(self) -> None:
        """Give the signals back to their previous handlers and forget what was received."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self.received = None


STOP = StopSignals()
