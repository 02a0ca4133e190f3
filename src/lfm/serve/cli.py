"""`lfm serve MODEL --access LEVEL`: serve a model over HTTP at one access level.

Binding to anything but a loopback address needs an API key: a served model is a resource others
can spend, and a SCORES or EMBEDDINGS endpoint leaks more of the model than text does.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Any

import typer

from lfm.errors import LfmError


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse a non-loopback host without an API key (before anything binds)."""
    if not is_loopback(host) and not api_key:
        raise LfmError(f"refusing to serve on {host} without an API key; pass --api-key KEY "
                       "(or LFM_API_KEY), or bind to 127.0.0.1")  # fmt: skip


def make_server(model: Any, access: str, host: str, port: int, api_key: str | None,
                max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                timeout_s: float = 60.0, top_k: int | None = None,
                spread: dict[str, Any] | None = None):  # fmt: skip
    """A configured (not yet running) `uvicorn.Server` for a model asset, path or `LocalModel`,
    with the connection limits of `ServeSettings` (header and keep-alive timeouts, at most
    `max_connections` connections). `spread`: `device_map`, `max_memory` and `offload_folder`
    for a model larger than one device (`lfm.assets.models.load_local`); the server narrows
    it to the served level, at most HIDDEN."""
    import uvicorn

    from lfm.access import LocalModel
    from lfm.assets.models import load_local, placement_for
    from lfm.serve.app import ServeSettings, build_app
    from lfm.serve.backend import Backend
    from lfm.serve.limits import uvicorn_config

    check_bind(host, api_key)
    if isinstance(model, LocalModel):
        local = model
    else:
        at = placement_for(**(spread or {}))
        local = load_local(model, "causal-lm", at)  # type: ignore[assignment]
    settings = ServeSettings(api_key=api_key, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             max_queue=max_queue, timeout_s=timeout_s, top_k=top_k)  # fmt: skip
    app = build_app(Backend(local, access), settings)
    return uvicorn.Server(uvicorn_config(app, host, port, settings))


def serve(
    model: Annotated[
        str, typer.Option(help="model asset name (`lfm models`) or folder")
    ] = "smollm2-135m",
    access: Annotated[
        str, typer.Option(help="level served: text, scores, embeddings or hidden")
    ] = "scores",
    host: Annotated[
        str, typer.Option(help="address to bind; non-loopback needs --api-key")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help="key clients must send (default: $LFM_API_KEY)")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="items per forward pass")] = 32,
    max_wait_ms: Annotated[float, typer.Option(help="batching window in ms")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="queued requests before 429")] = 256,
    timeout_s: Annotated[
        float, typer.Option(help="seconds a request may wait and run before 504")
    ] = 60.0,
    top_k: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=20,
            help="with --access scores: give at most the top K "
            "log-probabilities per token and no full next-token row, as hosted APIs do",
        ),
    ] = None,
    device_map: Annotated[
        str | None,
        typer.Option(
            help="spread a model larger than one device instead of --device: auto, balanced, "
            "balanced_low_0 or sequential (transformers' device_map); what does not fit "
            "waits on disk",
        ),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(help="with --device-map: the budget per device, e.g. 0=20GiB,cpu=60GiB"),
    ] = None,
    offload_folder: Annotated[
        str | None,
        typer.Option(
            help="with --device-map: where weights not stored as safetensors are offloaded"
        ),
    ] = None,
) -> None:
    """Serve a model through an OpenAI-compatible API at one access level (docs/serve.md)."""
    key = api_key or os.environ.get("LFM_API_KEY") or None
    try:
        spread = _spread(device_map, max_memory, offload_folder)
        if access.strip().lower() not in ("text", "scores", "embeddings", "hidden"):
            raise LfmError(f"--access must be text, scores, embeddings or hidden, not {access!r}")
        if timeout_s <= 0:
            raise LfmError(f"--timeout-s must be positive, not {timeout_s}")
        if top_k is not None and access.strip().lower() != "scores":
            raise LfmError(f"--top-k limits SCORES access; it cannot be served at {access!r}")
        server = make_server(
            model, access, host, port, key, max_batch, max_wait_ms, max_queue, timeout_s, top_k,
            spread,
        )  # fmt: skip
    except LfmError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    tier = f" (top {top_k} log-probabilities)" if top_k is not None else ""
    typer.echo(
        f"serving {model} at {access.upper()} access{tier} on http://{host}:{port} (OpenAPI: /docs)"
    )
    server.run()


def _spread(
    device_map: str | None, max_memory: str | None, offload_folder: str | None
) -> dict[str, Any] | None:
    """`--device-map`, `--max-memory`, `--offload-folder` as `load_local`'s keywords."""
    from lfm.core import placement

    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise LfmError("--max-memory and --offload-folder go with --device-map")
        return None
    if placement.current().device_chosen:
        raise LfmError("give --device or --device-map, not both (a device map places the model)")
    memory = None if max_memory is None else placement.parse_max_memory(max_memory)
    return {"device_map": device_map, "max_memory": memory, "offload_folder": offload_folder}
