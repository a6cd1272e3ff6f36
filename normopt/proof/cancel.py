"""Cooperative cancellation of a proof that runs in a thread.

``optimize`` proves in a thread beside the dynamic check. When the check ends the run first (bad
input, a failed check, Ctrl-C), the proof must stop before the process exits: a thread still
reading the staged output, or writing its own temporary files, while the interpreter cleans up
races that cleanup. ``prove(..., cancel=event)`` installs the event for the calling thread; the
prover calls ``check()`` once per node and once per weight block, so it stops within one block."""

from __future__ import annotations

import threading

_local = threading.local()


class Cancelled(BaseException):
    """The caller asked the proof to stop; it has no verdict. A BaseException, as
    KeyboardInterrupt is, so that no rule's ``except Exception`` turns it into a verdict."""


def install(event):
    _local.event = event


def check() -> None:
    ev = getattr(_local, "event", None)
    if ev is not None and ev.is_set():
        raise Cancelled("the proof was cancelled")
