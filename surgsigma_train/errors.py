"""Typed errors: user errors (bad config, bad data) must not be retried; the exit code says which."""


class UserError(Exception):
    exit_code = 1


class ConfigError(UserError, ValueError):
    """A recipe or override is invalid (exit code 2)."""

    exit_code = 2


class DataError(UserError, RuntimeError):
    """The data a recipe names is unusable (exit code 3)."""

    exit_code = 3
