"""Input-pipeline workers never die of a job's stop signals.

Schedulers ask a job to stop by signalling every process of it, workers included. A DataLoader worker
or a DALI feeder worker that died of SIGTERM would take the step, and the checkpoint the trainer wants to
save at the next step boundary, down with it. So workers ignore the stop signals; the process that owns
them decides (sslscale/train/stop_signals.py installs the handlers and tells this module, through
also_ignore, which signals it stops on).
"""
from __future__ import annotations

import contextlib
import os
import signal

# The default stop signals (train.stop_signals) and Ctrl-C: ignored by workers even before a run has installed
# its handlers (a worker started early must not die of them either).
ALWAYS_IGNORED = frozenset({signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT})
_configured: frozenset = frozenset()


def also_ignore(signals) -> None:
    """The stop signals the owner of this process installed handlers for (empty when it removes them)."""
    global _configured
    _configured = frozenset(signals)


def submitit_signal() -> int | None:
    """The signal submitit requeues on (SUBMITIT_PREEMPT_SIGNAL, USR2 by default), inside a submitit job."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def worker_signals() -> set[int]:
    """What a worker process ignores: the defaults, the configured ones, SIGINT and submitit's."""
    signals = set(ALWAYS_IGNORED) | _configured
    extra = submitit_signal()
    if extra is not None:
        signals.add(extra)
    return signals


def ignore_in_worker(signals=None) -> None:
    """In a freshly started worker: ignore the stop signals, and put back the default action of every other
    signal whose Python handler the parent had installed (submitit's logging handlers, torch's SIGCHLD
    watcher): they belong to the parent, and must not run, or checkpoint, in a copy of it."""
    signals = worker_signals() if signals is None else signals
    for sig in signal.valid_signals():
        if sig in signals:
            signal.signal(sig, signal.SIG_IGN)
            continue
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler):
            signal.signal(sig, signal.SIG_DFL)


class WorkerInit:
    """A DataLoader worker_init_fn: ignore_in_worker, with the set read in the parent (a picklable object,
    so that spawned workers get it too)."""

    def __init__(self):
        self.signals = frozenset(worker_signals())

    def __call__(self, worker_id: int) -> None:
        ignore_in_worker(self.signals)


@contextlib.contextmanager
def blocked(signals=None):
    """For processes started by code that offers no hook (DALI's workers): they inherit a signal mask that
    blocks the stop signals, and live until their owner closes them. In this process the signals wait, and
    are delivered when the block ends."""
    signals = worker_signals() if signals is None else signals
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
