"""The stop signals of a job: which ones are heard, by which process, and what each does.

Schedulers ask a job to stop by signalling every process of it: SLURM's time-limit warning (SIGUSR2
with `--signal`), pre-emption and scancel (SIGTERM), systemd and `kill -- -PGID` (SIGTERM), some
clusters SIGUSR1; a terminal's Ctrl-C sends SIGINT to the whole foreground process group.

One owner. Only the main process of each rank acts on them: a `StopSignals` object, installed once
around everything a job does (pretraining, then the probe), turns the first signal into a flag that
the trainer reads at a step boundary (all ranks agree on the step), saves there and exits with
EXIT_STOPPED_FOR_REQUEUE. Later signals only add to what was received, so a SIGTERM that follows the
first signal never abandons the pending save. The one exception is a second Ctrl-C: the user insists,
and the process ends at once with EXIT_ABORTED, without saving. While the object is installed,
submitit's own handler (on its SUBMITIT_PREEMPT_SIGNAL) does not run: launch/jobs.py calls it once,
on rank 0, after the checkpoint is on disk.

Worker processes (DataLoader workers, DALI's feeder workers) ignore them all: a worker that died of
one would take the step, and the save, down with it (see ignore_in_worker and blocked).
"""
from __future__ import annotations

import contextlib
import os
import signal

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
# Exit status of a process that a second Ctrl-C ended without saving (128 + SIGINT, as shells report it).
EXIT_ABORTED = 128 + signal.SIGINT
# Not configurable: SIGKILL and SIGSTOP cannot be caught; SIGINT is always heard (Ctrl-C, see above); the
# rest are faults or job control, whose default actions the process needs.
_NOT_STOP_SIGNALS = {signal.SIGKILL, signal.SIGSTOP, signal.SIGINT, signal.SIGCHLD, signal.SIGSEGV, signal.SIGBUS,
                     signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP, signal.SIGSYS, signal.SIGPIPE,
                     signal.SIGCONT, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGWINCH,
                     signal.SIGURG}


def valid_names() -> list[str]:
    """Names train.stop_signals accepts."""
    return sorted(s.name for s in signal.Signals if s not in _NOT_STOP_SIGNALS and not s.name.startswith("SIG_"))


def check_names(names) -> list[str]:
    """Problems of a train.stop_signals value, each naming the valid choices."""
    if not isinstance(names, (list, tuple)):
        return [f"train.stop_signals: a list of signal names, not {names!r}"]
    valid = valid_names()
    bad = [n for n in names if n not in valid]
    if bad:
        return [f"train.stop_signals: {', '.join(map(repr, bad))} cannot be a stop signal; valid: {', '.join(valid)} "
                "(SIGINT, Ctrl-C, is always handled)"]
    return []


def parse(names) -> frozenset[int]:
    return frozenset(signal.Signals[n] for n in names)


def submitit_signal() -> int | None:
    """The signal submitit requeues on (SUBMITIT_PREEMPT_SIGNAL, USR2 by default), inside a submitit job."""
    if "SUBMITIT_EXECUTOR" not in os.environ and "SUBMITIT_FOLDER" not in os.environ:
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def _say(line: str) -> None:
    # os.write, not print: a handler may run while the main thread is inside a print to the same stream.
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass


class StopSignals:
    """The stop flag of this process. `received`: the first stop signal (None: none yet); `all_received`:
    every one so far. `with StopSignals(names) as stop:` installs the handlers; a nested `with` (the probe
    inside a job that also pretrained) gets the outer, installed object instead, so one object spans every
    stage and a signal heard in one is acted on in the next. Not entered, it is a flag nobody sets (bench)."""

    def __init__(self, names=DEFAULT_SIGNALS, announce: bool = True):
        extra = submitit_signal()
        self.signals = parse(names) | {signal.SIGINT} | ({extra} if extra is not None else set())
        self.announce = announce
        self.received: int | None = None
        self.all_received: set[int] = set()
        self.interrupts = 0
        self.previous: dict[int, object] | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        global _active
        if _active is not None:
            return _active
        self.previous = {sig: signal.signal(sig, self._handle) for sig in sorted(self.signals)}
        _active = self
        return self

    def __exit__(self, *exc) -> bool:
        global _active
        if self.previous is not None:  # the object that installed the handlers puts the old ones back
            _active = None
            for sig, handler in self.previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self.previous = None
        return False

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                _say("second Ctrl-C: aborting now, without saving (the last complete checkpoint is kept)")
                os._exit(EXIT_ABORTED)  # at once: no cleanup may wait on a peer or a disk
            if self.announce:
                _say("Ctrl-C: saving a checkpoint at the next step boundary, then stopping (press Ctrl-C again to "
                     "abort without saving)")
        if self.received is None:
            self.received = signum
        self.all_received.add(signum)


_active: StopSignals | None = None


def current() -> StopSignals | None:
    """The installed StopSignals of this process, if any."""
    return _active


def worker_signals() -> set[int]:
    """What a worker process ignores: the defaults, the configured ones, SIGINT and submitit's."""
    signals = set(parse(DEFAULT_SIGNALS)) | {signal.SIGINT}
    if _active is not None:
        signals |= _active.signals
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
