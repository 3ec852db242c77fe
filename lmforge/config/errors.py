"""The error every config check raises: its message names the key and the problem."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""
