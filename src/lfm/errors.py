"""Errors a user can act on.

Every error lfm raises on purpose is an `LfmError` whose message is one line that says what went
wrong and what to do. The CLI prints that line alone; library users catch the class.
"""

from collections.abc import Iterable


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """`; did you mean 'x'?` for the closest of `names` to a mistyped `name`, or "" if none is
    close (difflib's ratio of at least 0.6)."""
    import difflib

    hits = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.6)
    return f"; did you mean {hits[0]!r}?" if hits else ""


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
