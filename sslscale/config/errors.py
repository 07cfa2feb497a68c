"""The one error every config problem is reported with."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))
