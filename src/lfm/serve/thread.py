"""Run a served app on loopback in a background thread (tests, benchmarks, examples), or wait for
one started in a child process."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi import FastAPI

from lfm.errors import LfmError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` at the time of asking."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
            startup_s: float = 10.0) -> Iterator[str]:  # fmt: skip
    """Serve `app` with uvicorn in a thread; yields its URL and stops it on exit.

    Args:
        app: the FastAPI app (`build_app`; another app is served with the default limits).
        host: a loopback address (this helper is for local use; `lfm serve` binds elsewhere).
        port: a port, or a free one.
        startup_s: how long to wait for the server to accept connections.
    """
    import uvicorn

    from lfm.serve.app import ServeSettings
    from lfm.serve.cli import is_loopback
    from lfm.serve.limits import uvicorn_config

    if not is_loopback(host):
        raise LfmError(f"running() serves on loopback only, not {host}")
    port = port or free_port(host)
    settings = getattr(app.state, "settings", None) or ServeSettings()
    server = uvicorn.Server(uvicorn_config(app, host, port, settings, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.02)
    if not server.started:
        raise LfmError(f"server on {host}:{port} did not start within {startup_s} s")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_healthy(
    url: str, proc: subprocess.Popen | None = None, log: Path | None = None,
    timeout_s: float = 300.0,
) -> None:  # fmt: skip
    """Wait until `url/health` answers 200. A `proc` (the server's child process) that exits
    first, or no answer within `timeout_s`, is an `LfmError` quoting the end of `log`."""
    import httpx

    def tail() -> str:
        return f":\n{log.read_text()[-2000:]}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc is not None and proc.poll() is not None:
            raise LfmError(f"the server at {url} exited with {proc.returncode}{tail()}")
        time.sleep(0.5)
    if proc is not None:
        proc.kill()
    raise LfmError(f"the server at {url} did not answer within {timeout_s:.0f} s{tail()}")
