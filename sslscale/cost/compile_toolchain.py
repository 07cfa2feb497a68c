"""What `train.compile: true` needs on the machine, checked before the run starts.

torch.compile builds code at run time: on a GPU, Triton compiles a small C launcher per kernel (with $CC,
else clang, else gcc, against Python's headers); on a CPU, Inductor compiles C++ (g++ or clang++, also
against Python's headers). Without them the first compiled step fails minutes into the job, after the
process group, the data and the compilation itself have started. The project's container image leaves
compilers out of its default target on purpose; its `compile` target has them (docs/containers.md).
"""
from __future__ import annotations

import os
import shutil
import sysconfig


def _first_on_path(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def c_compiler() -> str | None:
    """The C compiler Triton would use: $CC, else clang, else gcc (triton/runtime/build.py's order)."""
    return os.environ.get("CC") or _first_on_path("clang", "gcc")


def cxx_compiler() -> str | None:
    """The C++ compiler Inductor's CPU backend would use: $CXX, else g++, else clang++."""
    return os.environ.get("CXX") or _first_on_path("g++", "clang++")


def python_header() -> str:
    """Where Python.h of this interpreter is, which both compilers include; Debian's python3 without -dev
    lacks it."""
    return os.path.join(sysconfig.get_paths()["include"], "Python.h")


def compile_toolchain_problem(device_type: str) -> str | None:
    """One line naming what torch.compile would miss on `device_type` ("cuda" or "cpu"), or None."""
    if device_type == "cuda":
        compiler, wanted = c_compiler(), "a C compiler ($CC, clang or gcc) for Triton's kernel launchers"
    else:
        compiler, wanted = cxx_compiler(), "a C++ compiler ($CXX, g++ or clang++) for Inductor's CPU kernels"
    missing = [] if compiler else [wanted]
    if not os.path.exists(python_header()):
        missing.append(f"Python's headers ({python_header()}; Debian/Ubuntu: python3-dev)")
    if not missing:
        return None
    return (f"train.compile: torch.compile needs {' and '.join(missing)} on this machine, and they are missing; "
            f"set train.compile=false, or install them (the container image's `compile` target has them)")
