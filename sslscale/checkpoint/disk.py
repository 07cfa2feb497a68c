"""Full, read-only or missing disks, said in one line.

A run writes checkpoints and its config into its run folder. When that fails for lack of space or of
permission, the run stops with EXIT_DISK_ERROR and one line saying which folder and why; the writer
removes what it had half written and keeps every earlier checkpoint. The status is EX_IOERR (74, from
sysexits.h): not 2 (the config is fine) and not 75 (a requeue would meet the same full disk).
"""
from __future__ import annotations

import errno
import os
import shutil

EXIT_DISK_ERROR = 74

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}
# Below this, a failed write is taken for a full disk: torch.save reports a short write only as
# "[enforce fail at inline_container.cc] unexpected pos", without the errno.
NEARLY_FULL_BYTES = 64 * 2**20
# Texts of torch's zip writer (PyTorchStreamWriter) when the file under it fails.
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")
PROBE = ".sslscale-write-probe"


class DiskError(Exception):
    """A write into the run folder failed for lack of space or permission (one line, for the user)."""


def free_bytes(folder: str) -> int | None:
    """Free space where `folder` is (its nearest existing parent), or None if it cannot be read."""
    while folder and not os.path.isdir(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return shutil.disk_usage(folder or ".").free
    except OSError:
        return None


def describe_free(folder: str) -> str:
    free = free_bytes(folder)
    return "" if free is None else f" ({free / 2**20:.1f} MiB free)"


def reason(error: BaseException, folder: str) -> str | None:
    """Why a write into `folder` failed, if the disk is the cause: 'no space left on the device', 'not
    writable', ...; None for any other failure (which is then raised as it is)."""
    if isinstance(error, OSError):
        if error.errno in NO_SPACE:
            return f"no space left on the device{describe_free(folder)}"
        if error.errno in NO_PERMISSION:
            return f"not writable ({error.strerror})"
        if isinstance(error, (NotADirectoryError, FileExistsError)):
            return "a path in it is a file, not a folder"
        if error.errno == errno.EIO:
            return "input/output error from the device"
        return None
    if isinstance(error, RuntimeError):
        text = str(error)
        if "No space left" in text or "Disk quota" in text:
            return f"no space left on the device{describe_free(folder)}"
        if any(marker in text for marker in TORCH_WRITE_FAILURES):
            free = free_bytes(folder)
            if free is not None and free < NEARLY_FULL_BYTES:
                return f"no space left on the device{describe_free(folder)}"
            return f"the write failed ({text.strip().splitlines()[0][:200]})"
    return None


def as_disk_error(error: BaseException, folder: str, what: str) -> DiskError | None:
    why = reason(error, folder)
    if why is None:
        return None
    return DiskError(f"{what} could not be written to {folder}: {why}; earlier checkpoints are kept, free some "
                     "space (or fix the folder) and rerun the same command to resume")


def probe_folder(folder: str, what: str) -> None:
    """Creates `folder` if needed and writes, syncs and removes a small file in it, so that a folder that is
    a file, read-only or full is found before any work is done rather than at the first save."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DiskError(f"{what} {folder} is a file, not a folder; move it away")
    path = os.path.join(folder, f"{PROBE}-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)  # one page: a full device refuses it (1 byte may fit in a partial block)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        why = reason(error, folder) or error.strerror or str(error)
        raise DiskError(f"{what} {folder}: {why}") from None
    finally:
        try:
            os.remove(path)
        except OSError:
            pass
