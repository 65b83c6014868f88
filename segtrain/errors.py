"""Errors a user can fix: each prints one message and exits with code 2, no traceback."""

import click


class SegtrainError(click.ClickException):
    """Base for bad usage, config or data. Click prints `Error: <message>` and exits 2."""

    exit_code = 2


class ConfigError(SegtrainError):
    """A config key or value is wrong; the message names the dotted key and the fix."""


class DataError(SegtrainError):
    """A data file or folder is wrong; the message names the file and the fix."""


class CheckpointError(SegtrainError):
    """A run folder or model file cannot be used; the message says why and what to do."""


class TrainingDiverged(click.ClickException):
    """The loss became NaN or Inf; the last good checkpoint is kept. Exit code 1: not a usage error."""

    exit_code = 1


class Interrupted(click.ClickException):
    """SIGINT/SIGTERM during training: a checkpoint was saved; exit code 130."""

    exit_code = 130
