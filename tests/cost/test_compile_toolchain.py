"""train.compile needs compilers at run time (Triton's launchers on a GPU, Inductor's C++ on a CPU): a machine
without them, like the container image's default target, is refused before the run instead of failing at its
first compiled step."""
import os
import sysconfig

import pytest

from sslscale.config import ConfigError
from sslscale.cost import compile_toolchain
from sslscale.train.loop import pretrain


@pytest.fixture
def no_compilers(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(compile_toolchain.shutil, "which", lambda name: None)


def test_a_gpu_needs_a_c_compiler_and_a_cpu_a_cxx_compiler(no_compilers, monkeypatch):
    assert "a C compiler ($CC, clang or gcc)" in compile_toolchain.compile_toolchain_problem("cuda")
    assert "a C++ compiler ($CXX, g++ or clang++)" in compile_toolchain.compile_toolchain_problem("cpu")
    monkeypatch.setenv("CC", "/opt/cc")
    monkeypatch.setenv("CXX", "/opt/c++")
    if os.path.exists(compile_toolchain.python_header()):
        assert compile_toolchain.compile_toolchain_problem("cuda") is None
        assert compile_toolchain.compile_toolchain_problem("cpu") is None


def test_missing_python_headers_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/opt/cc")
    paths = {**sysconfig.get_paths(), "include": str(tmp_path)}  # a folder without Python.h
    monkeypatch.setattr(compile_toolchain.sysconfig, "get_paths", lambda *a, **k: paths)
    problem = compile_toolchain.compile_toolchain_problem("cuda")
    assert problem.startswith("train.compile:")
    assert os.path.join(str(tmp_path), "Python.h") in problem and "python3-dev" in problem
    assert "C compiler" not in problem


def test_pretrain_with_compile_on_a_machine_without_compilers_stops_before_training(tiny_config, no_compilers):
    cfg = tiny_config("train.compile=true", "train.max_steps=2")
    with pytest.raises(ConfigError, match=r"train.compile: torch.compile needs a C\+\+ compiler") as error:
        pretrain(cfg)
    assert len(error.value.problems) == 1
    assert not os.path.exists(cfg.run_dir)  # refused before its first step: the folder it made is removed
    # The same config without compile trains: the refusal is about the machine, not the config.
    pretrain(tiny_config("train.compile=false", "train.max_steps=2", "run.name=eager"))
