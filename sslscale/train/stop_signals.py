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
one would take the step, and the save, down with it. The installed object tells the input pipeline which
signals those are (data_pipelines/worker_signals.py).
"""
from __future__ import annotations

import os
import signal

from data_pipelines import worker_signals
from data_pipelines.worker_signals import submitit_signal
from sslscale.config.training import DEFAULT_STOP_SIGNALS

# Exit status of a run that stopped on a stop signal (train.stop_signals, Ctrl-C) after saving a checkpoint:
# the launcher requeues on it and treats any other non-zero status as a failure (75 is EX_TEMPFAIL).
EXIT_STOPPED_FOR_REQUEUE = 75
# Exit status of a process that a second Ctrl-C ended without saving (128 + SIGINT, as shells report it).
EXIT_ABORTED = 128 + signal.SIGINT
def parse(names) -> frozenset[int]:
    return frozenset(signal.Signals[n] for n in names)


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

    def __init__(self, names=DEFAULT_STOP_SIGNALS, announce: bool = True):
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
        worker_signals.also_ignore(self.signals)
        return self

    def __exit__(self, *exc) -> bool:
        global _active
        if self.previous is not None:  # the object that installed the handlers puts the old ones back
            _active = None
            worker_signals.also_ignore(frozenset())
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


class StoppedForRequeue(Exception):
    """The run saved a checkpoint and stopped because it was asked to (pre-emption, time limit).
    `signals`: what this process received (empty if only another rank was signalled)."""

    def __init__(self, message: str, signals: frozenset = frozenset()):
        super().__init__(message)
        self.signals = signals


def describe_signal(signum: int | None) -> str:
    return f"signal {signal.Signals(signum).name}" if signum is not None else "a stop signal on another rank"
