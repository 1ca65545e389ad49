"""The one exception type for problems the user can fix (bad input, bad config, missing file).

A ``LeptonError`` is printed as one line, without a traceback, and the command exits with
``EXIT_USAGE``; anything else is a bug and is reported with its traceback and rank.
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a bug or an unexpected failure on some rank
EXIT_USAGE = 2  # bad input, bad config, missing file: the message says what to fix
EXIT_STOPPED = (
    75  # stopped by a signal after writing a checkpoint: requeue and resume (EX_TEMPFAIL)
)
EXIT_WATCHDOG = 76  # the progress watchdog ended a job whose step stopped advancing


class LeptonError(Exception):
    """An error the user can act on; its message names the file, data set, key or value."""

    exit_code = EXIT_USAGE
    collective = False  # True when every rank raises it together (then rank 0 reports it once)


class ConfigError(LeptonError):
    """A config key that is unknown, of the wrong type, or has an impossible value."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key '{key}': {message}")
        self.key = key


class DataError(LeptonError):
    """A data file or data set that is missing, malformed, or does not fit the model."""
