"""The callable shape of model tuning.

`Tuner`: `(handle, data, cfg) -> TuneResult`. `data` is the task (`TextClassification`, a list of
instruction rows, a corpus for a datastore ...); the result is something the next step can load:
an adapter, full weights, a soft prompt, a prompt template or a retrieval-augmented handle, saved
by `result.save(folder)`.
"""

from __future__ import annotations

from typing import Any, Protocol

from lfm.registry import shape


class Tuner(Protocol):
    def __call__(self, handle: Any, data: Any, cfg: Any = None) -> Any: ...


TUNER = shape("tuning", "tuner", Tuner, handles="handle")
