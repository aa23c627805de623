"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""


class SfsdError(Exception):
    """Base class: the message names what is wrong and how to fix it."""


class ConfigError(SfsdError):
    """A configuration value is invalid or inconsistent."""


class DataError(SfsdError):
    """An input file is missing, empty, corrupt or made from something else."""


class NumericalError(SfsdError):
    """Statistics or activations contain NaN/Inf or violate a mathematical property."""
