"""One live process per run folder and stage: an exclusive flock on `<folder>/.lock` (pretraining) or
`<eval folder>/.lock` (evaluation). The kernel drops it when its process dies, however it dies, so a
crashed or killed run never leaves a stale lock behind.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_FILE = ".lock"


class FolderInUse(Exception):
    """Another live process holds the folder: a refusal in one line (the config is not at fault)."""


class FolderLock:
    """An exclusive, non-blocking flock on `<folder>/.lock`, held while the stage runs. The file keeps who holds
    it (host, pid, what, since) for the message the next process gets; the lock itself is the flock, which
    the kernel releases when the holder exits or is killed."""

    def __init__(self, folder: str, what: str):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            other = ("or choose another run.name" if self.what == "pretraining"
                     else "or give this evaluation another output folder")
            raise FolderInUse(f"{self.folder} is in use by another process ({describe_holder(holder)}); wait for "
                              f"it to end, or stop it, {other}") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "what": self.what,
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"{holder['what']}, pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
