"""Exceptions that mean "the user gave bad input": scripts print the message and exit 2."""


class UserError(Exception):
    """Bad input from the user (flags, files, data). The message says what and what to do."""


class DataError(UserError):
    """A dataset on disk is missing, empty, mis-paired or unreadable."""


class CheckpointError(UserError):
    """A checkpoint file is unreadable, unsafe, or does not fit the model."""
