"""Errors that teach: each names the cause and the fix in one line.

The CLI turns these into a single `error: ...` line and exit code 2.
"""


class MmdistillError(Exception):
    """Base class for user-facing errors (bad config, missing checkpoint, mismatch)."""


class ConfigError(MmdistillError):
    """A config key, type or value is wrong; the message names the key path."""


class CompatibilityError(MmdistillError):
    """Teacher and student cannot be paired (tokenizer, chat template, action space...)."""


class CheckpointError(MmdistillError):
    """A checkpoint is missing, incomplete or corrupt."""


class Interrupted(MmdistillError):
    """The run was stopped by SIGTERM / Ctrl-C after saving a checkpoint; the CLI exits 128 + the signal number."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum
