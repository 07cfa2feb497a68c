"""Files that are either absent, or whole: written under a temporary name in the same folder, flushed
to disk, then renamed over the final name (a rename within a folder is atomic)."""
from __future__ import annotations

import json
import os


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")
