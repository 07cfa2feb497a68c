"""Everything on disk that a run owns: checkpoints and the run folder.

store.py        checkpoints in a run folder: atomic, marked complete, newest-first fallback, keep-last-k
state.py        TrainingState: every stateful part of a run, saved and restored in one call
integrity.py    the COMPLETE marker and the sha256 of every file, checked before a load
dcp_io.py       sharded (DCP) checkpoints read and written with a restricted unpickler
atomic.py       write-to-temp-then-rename for the small files
disk.py         full and read-only disks: found early, named in one line
verify.py       `sslscale verify RUN_DIR`
trunk_file.py   the trunk alone, as `sslscale export` writes it and hubconf.py reads it
run_folder.py   the run's config.yaml: saved, resumed, changes named
lock.py         one live process per run folder and stage
"""
