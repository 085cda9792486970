"""Error types users see. The CLI prints a :class:`ConfigError` without a traceback and exits with
code 2; an :class:`Interrupted` run exits with 128 + the signal's number."""

import signal


class ConfigError(ValueError):
    """An invalid input: the message says what is wrong and what would be valid."""


class Interrupted(Exception):
    """The launcher got ``signum`` (Ctrl-C is SIGINT) and stopped the ranks; exit ``128 + signum``."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
