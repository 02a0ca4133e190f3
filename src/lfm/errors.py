"""Errors a user can act on.

Every error lfm raises on purpose is an `LfmError` whose message is one line that says what went
wrong and what to do. The CLI prints that line alone; library users catch the class.
"""


class LfmError(Exception):
    """Base class: a one-line, actionable message (whitespace and line breaks are collapsed)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class AssetError(LfmError):
    """A model or data set could not be found, read or understood."""


class AccessError(LfmError):
    """A method asked a model handle for more than its access level gives."""


class ConfigError(LfmError):
    """A configuration was rejected (unknown key, wrong type, out of range)."""


class BudgetExceeded(LfmError):
    """A query budget given to a black-box model (a remote one, or a counted handle) is spent."""
