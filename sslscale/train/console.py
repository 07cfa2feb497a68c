"""What a run prints, also kept in its run folder (console.log), from rank 0 only."""
from __future__ import annotations

import contextlib
import datetime
import os
import sys

import sslscale

LOG_FILE = "console.log"


class LogFile:
    """The run folder's console.log, opened once the folder exists (the run's checks make it; a run refused
    before that leaves no folder behind): until then lines wait in memory."""

    def __init__(self, run_dir: str, header: str):
        self.path = os.path.join(run_dir, LOG_FILE)
        self.waiting = [header]
        self.file = None

    def write(self, text: str) -> None:
        if self.file is None:
            self.waiting.append(text)
            if not os.path.isdir(os.path.dirname(self.path)):
                return
            try:
                self.file = open(self.path, "a", buffering=1)
            except OSError:
                return  # the run's own checks say why the folder cannot be written
            self.file.write("".join(self.waiting))
            self.waiting = []
        else:
            try:
                self.file.write(text)
            except OSError:
                self.waiting = []  # a full disk: the terminal still gets every line, and the run says why it stops

    def flush(self) -> None:
        if self.file is not None:
            try:
                self.file.flush()
            except OSError:
                pass

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass


class Tee:
    """A text stream that writes to the terminal and to the log."""

    def __init__(self, stream, log: LogFile):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


@contextlib.contextmanager
def console_log(run_dir: str, is_main: bool, command: str):
    """Copies stdout and stderr to run_dir/console.log (appended, one header line per start) on rank 0, and
    yields a function that writes a line to the log alone (for what the caller prints elsewhere, e.g. the
    error that ended a run)."""
    if not is_main:
        yield lambda line: None
        return
    now = datetime.datetime.now().isoformat(timespec="seconds")
    log = LogFile(run_dir, f"=== {now} sslscale {sslscale.__version__}: {command}\n")
    previous = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(sys.stdout, log), Tee(sys.stderr, log)
    try:
        yield lambda line: log.write(line + "\n")
    finally:
        sys.stdout, sys.stderr = previous
        log.close()
