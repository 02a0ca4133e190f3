"""The access levels of the survey's interfaces, on their own so that reading them imports no torch.

`lfm.access` gives them with the handles; the catalogue commands (`lfm methods --access`) read them
from here.
"""

from __future__ import annotations

from enum import IntEnum

from lfm.errors import AccessError


class Access(IntEnum):
    """What a model interface exposes, from least to most."""

    TEXT = 1  # text in, text out (labels for a classifier)
    SCORES = 2  # log-probabilities of given inputs
    EMBEDDINGS = 3  # scores for given input embeddings
    HIDDEN = 4  # activations at named modules
    WEIGHTS = 5  # parameters, gradients, writes

    @classmethod
    def parse(cls, value: str | int | Access) -> Access:
        """Read a level from its name (any case) or number; a clear error otherwise."""
        if isinstance(value, Access):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            names = ", ".join(level.name.lower() for level in cls)
            raise AccessError(f"unknown access level {value!r}; choose one of: {names}") from None

    def __str__(self) -> str:
        return self.name
