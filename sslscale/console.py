"""What a run prints, also kept in its run folder (console.log), from rank 0 only."""
from __future__ import annotations

import contextlib
import datetime
import os
import sys

import sslscale

LOG_FILE = "console.log"


class Tee:
    """A text stream that writes to the terminal and to a file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


@contextlib.contextmanager
def console_log(run_dir: str, is_main: bool, command: str):
    """Copies stdout and stderr to run_dir/console.log (appended, one header line per start) on rank 0, and
    yields a function that writes a line to the log file alone (for what the caller prints elsewhere, e.g.
    the error that ends a run). A run folder that cannot be made is left to the run's own checks."""
    if not is_main:
        yield lambda line: None
        return
    try:
        os.makedirs(run_dir, exist_ok=True)
        file = open(os.path.join(run_dir, LOG_FILE), "a", buffering=1)
    except OSError:
        yield lambda line: None
        return
    now = datetime.datetime.now().isoformat(timespec="seconds")
    file.write(f"=== {now} sslscale {sslscale.__version__}: {command}\n")
    previous = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = Tee(sys.stdout, file), Tee(sys.stderr, file)
    try:
        yield lambda line: file.write(line + "\n")
    finally:
        sys.stdout, sys.stderr = previous
        file.close()
