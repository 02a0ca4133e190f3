"""Resuming a black-box search by replaying the evaluations it logged.

A search whose state cannot be saved without pickling it (CMA-ES's) is resumed by running it
again from its seed: its own arithmetic is deterministic, and the expensive part, the model calls,
is replaced by the values logged the first time. `ReplayLog.wrap` wraps the objective: the k-th
evaluation of a resumed search returns the k-th logged value when its candidate hashes to the
logged hash, and calls the model only past the end of the log; a candidate that differs (other
options, another version of the search) is a one-line `LfmError`. The log is `evaluations.json`
in the run directory, one `{"hash", "value"}` per evaluation in order, rewritten atomically by
`flush()` once per CMA-ES generation or search step, so a killed run loses at most the
evaluations of one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from lfm.errors import LfmError
from lfm.runs import Run

LOG = "evaluations.json"
T = TypeVar("T")


def vector_hash(x: Any) -> str:
    """A short hash of a vector's float64 bytes (a CMA-ES candidate)."""
    data = np.ascontiguousarray(x, dtype=np.float64).tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def json_hash(x: Any) -> str:
    """A short hash of a value's JSON text (a discrete candidate: phrases and demonstrations)."""
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


class ReplayLog:
    """The evaluations of a search in `run`'s directory: replayed when it holds some, extended as
    the search goes on (no run: nothing is read or written, every evaluation calls the model).

    Attributes:
        calls: the evaluations this process made on the model (past the end of the log).
    """

    def __init__(self, run: Run | None = None):
        self.run = run
        self.logged = self._read() if run is not None else []
        self.done: list[dict[str, Any]] = []
        self.calls = 0
        self._written = len(self.logged)

    def _read(self) -> list[dict[str, Any]]:
        file = self.run.path / LOG
        if not file.is_file():
            return []
        try:
            rows = json.loads(file.read_text())
            return [{"hash": str(r["hash"]), "value": float(r["value"])} for r in rows]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise LfmError(f"cannot read the logged evaluations {file}: {e}") from None

    def wrap(self, f: Callable[[T], float], key: Callable[[T], str]) -> Callable[[T], float]:
        """`f` replayed from the log while it lasts, then called (and logged); `key` hashes a
        candidate."""

        def replayed(x: T) -> float:
            i, h = len(self.done), key(x)
            if i < len(self.logged):
                if self.logged[i]["hash"] != h:
                    raise LfmError(
                        f"cannot resume {self.run.path if self.run else 'the search'}: evaluation "
                        f"{i + 1} asks another candidate than the one it logged, so the run "
                        "cannot be replayed; resume it with the options and version it ran with"
                    )
                value = self.logged[i]["value"]
            else:
                value = float(f(x))
                self.calls += 1
            self.done.append({"hash": h, "value": value})
            return value

        return replayed

    def flush(self) -> None:
        """Write the log with the evaluations made since the last write (atomically)."""
        if self.run is None or len(self.done) <= self._written:
            return
        with self.run.output(LOG) as tmp:
            tmp.write_text(json.dumps(self.done) + "\n")
        self._written = len(self.done)
