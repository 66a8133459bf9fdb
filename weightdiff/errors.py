"""One error type for everything a user can fix: the CLI prints its message instead of a traceback."""


class WeightdiffError(Exception):
    """A problem with the inputs, the configuration or the environment, stated so a user can act on it."""
