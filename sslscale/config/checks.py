"""Small checks shared by the sections' validators: each returns a list of problems, one line each."""
from __future__ import annotations

INTERVALS = ("step", "epoch")  # how often a schedule changes (optim.lr_interval, objective.dino.tau_t_interval)


def choice(key: str, value, valid) -> list[str]:
    return [] if value in valid else [f"{key}: {value!r} is not valid; choose one of {', '.join(valid)}"]


def positive(key: str, value) -> list[str]:
    return [] if value > 0 else [f"{key}: {value} must be > 0"]
