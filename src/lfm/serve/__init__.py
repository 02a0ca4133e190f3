"""Serve a model over HTTP at one access level, and speak to it: `build_app`, `RemoteModel`.

See docs/serve.md for the endpoints and the guarantees (403 above the level, dynamic batching,
bounded queue, API key required off loopback).
"""

from lfm.serve.app import ServeSettings, build_app
from lfm.serve.backend import Backend
from lfm.serve.client import Budget, BudgetExceeded, RemoteModel

__all__ = ["Backend", "Budget", "BudgetExceeded", "RemoteModel", "ServeSettings", "build_app"]
