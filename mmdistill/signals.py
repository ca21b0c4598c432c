"""Stopping a run on request: SIGTERM (a scheduler's pre-emption, `kill`) or Ctrl-C asks the run to
finish its current optimizer step, save a checkpoint and exit; `mmdistill train --resume RUN_DIR`
continues from there.  A second Ctrl-C aborts at once (the last periodic checkpoint still resumes).

    mmdistill train configs/text/quickstart.yaml   # then Ctrl-C, then: mmdistill train --resume runs/quickstart
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopFlag:
    """Set by the signal handler, read by the training loop at the end of each step (every rank agrees)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        self.signum = signum
        if os.environ.get("RANK", "0") != "0":  # one line per run, from rank 0
            return
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again aborts at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Handle SIGTERM and SIGINT while the run lasts (only the main thread may install handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        sigs = (signal.SIGTERM, signal.SIGINT)
        old = {s: signal.getsignal(s) for s in sigs}
        self.signum = None
        for s in sigs:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.signum = None


STOP = StopFlag()
