"""`sslscale verify RUN_DIR`: every checkpoint of a run checked against the checksums in its marker (by the
rule the loader uses, `integrity.find_problem`), then as the loader would open it (parts present, nothing
refused), without building a model or reading a tensor; one line per checkpoint, newest first.

Exit status: 0 if the newest checkpoint is good (a resume would use it), 1 if it is not or there is
none. Older bad ones are named but do not fail the command: a resume never reaches them.
"""
from __future__ import annotations

from sslscale.checkpoint.integrity import CheckpointUnusable, find_problem, has_checksums, read_marker
from sslscale.checkpoint.store import Checkpointer


def verify_run(run_dir: str, stream) -> int:
    checkpointer = Checkpointer(run_dir, keep=0)
    names = checkpointer.newest_first()
    if not names:
        print(f"{run_dir}: no complete checkpoint in {checkpointer.dir}", file=stream)
        return 1
    newest_ok = False
    for i, name in enumerate(names):
        folder = checkpointer.path(name)
        problem = find_problem(folder)
        if problem is None:
            try:  # what the loader would refuse although every checksum matches
                checkpointer.check_loadable(name)
            except CheckpointUnusable as error:
                problem = error.problem
        if problem is not None:
            line = f"BAD  {problem}"
        elif has_checksums(folder):
            line = f"ok   {len(read_marker(folder)['files'])} file(s) match their sha256"
        else:
            line = "ok?  files present; written before checksums were recorded, so not checked"
        print(f"{name}  {line}", file=stream)
        if i == 0:
            newest_ok = problem is None
    set_aside = checkpointer.set_aside_names()
    if set_aside:
        print(f"({len(set_aside)} set aside as unusable by an earlier resume: {', '.join(set_aside)})", file=stream)
    return 0 if newest_ok else 1
