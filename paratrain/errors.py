"""Error types users see. The CLI prints them without a traceback and exits with code 2."""


class ConfigError(ValueError):
    """An invalid input: the message says what is wrong and what would be valid."""
