"""The callable shape of model editing.

`Editor`: `(handle, requests, cfg) -> patch`. A parameter editor returns a `Patch` of weight
deltas (saved, applied, reverted bit for bit, composed with merging); a memory editor returns a
patch of its own kind, which wraps a handle instead of changing weights. Nothing changes the
caller's model until a patch is applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from lfm.edit.requests import Request
from lfm.registry import shape


class Editor(Protocol):
    def __call__(
        self, handle: Any, requests: Request | Sequence[Request], cfg: Any = None
    ) -> Any: ...


EDITOR = shape("edit", "editor", Editor, handles="handle")
