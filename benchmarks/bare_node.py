"""Run Python as on a bare GPU node: imports of the packages such a node lacks fail as they would there.

    python benchmarks/bare_node.py -m sslscale.cli pretrain ...   # a module, like python -m
    python benchmarks/bare_node.py benchmarks/gpu_check.py ...    # a script

The packages come from SSLSCALE_BLOCKED_IMPORTS (comma-separated; default: the optional packages a lent GPU
node has been without: DALI, fvcore, submitit, tensorboard). benchmarks/gpu_check.py --imitate-bare-node runs
itself and the processes it starts this way, so that the CPU smoke run in the test suite meets what a bare
node would.
"""
from __future__ import annotations

import importlib.abc
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BLOCKED = ("nvidia.dali", "fvcore", "submitit", "tensorboard")
ENV = "SSLSCALE_BLOCKED_IMPORTS"


class BlockedImports(importlib.abc.MetaPathFinder):
    """Refuses the named top-level packages (and their submodules) before any other finder sees them."""

    def __init__(self, names):
        self.names = tuple(names)

    def find_spec(self, fullname, path=None, target=None):
        if any(fullname == name or fullname.startswith(name + ".") for name in self.names):
            raise ImportError(f"No module named {fullname!r} (not on this bare node)", name=fullname)
        return None


def block(names=None) -> tuple[str, ...]:
    """Installs the blocker in this process and in the environment its children inherit."""
    names = tuple(names if names is not None else os.environ.get(ENV, ",".join(DEFAULT_BLOCKED)).split(","))
    names = tuple(n for n in names if n)
    os.environ[ENV] = ",".join(names)
    for name in list(sys.modules):
        if any(name == n or name.startswith(n + ".") for n in names):
            del sys.modules[name]
    sys.meta_path.insert(0, BlockedImports(names))
    return names


def command(*args: str) -> list[str]:
    """The argv that runs `args` (a module after -m, or a script) under the blocker, in a new process."""
    return [sys.executable, os.path.abspath(__file__), *args]


def main() -> None:
    block()
    sys.path.insert(0, REPO)
    args = sys.argv[1:]
    if args[:1] == ["-m"]:
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
