"""What one request or one connection may cost the server: bytes read, time, memory.

- `BodyLimit`: an ASGI middleware that counts the body bytes actually received (chunked bodies
  too) and answers 413 as soon as the count passes the limit, without reading the rest; and 408
  when the body takes longer than its deadline to arrive.
- `guarded_h11`: uvicorn's h11 protocol with a deadline on the request line and headers, so a
  client trickling them cannot hold a connection (uvicorn only times out idle keep-alives).
- `uvicorn_config`: the server's connection limit, keep-alive and header limits in one place.
- `chars_per_token`: a bound on the characters one token covers, so a text can be refused on its
  length before it is tokenised.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.exceptions import HTTPException

ASGI = Any  # an ASGI callable (scope, receive, send)


class BodyLimit:
    """Refuse bodies over `max_bytes` as they arrive, and bodies slower than `timeout_s`.

    The count is of the bytes received, not of `Content-Length` (which a chunked request does
    not send), so no body larger than the limit is ever held. A declared `Content-Length` over
    the limit is refused before any byte is read.
    """

    def __init__(self, app: ASGI, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _answer(send, 413, f"body of {int(declared)} bytes exceeds {self.max_bytes}")
            return
        started = False

        async def send_seen(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._counting(receive), send_seen)
        except HTTPException as e:  # raised while reading, outside a route's handlers
            if started:
                raise
            await _answer(send, e.status_code, str(e.detail))

    def _counting(self, receive: Any) -> Any:
        received, deadline = 0, time.monotonic() + self.timeout_s

        async def counted() -> dict:
            nonlocal received
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(
                    408, f"the body did not arrive within {self.timeout_s} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # the rest is never read; the connection closes
                    raise HTTPException(413, f"body exceeds {self.max_bytes} bytes")
            return message

        return counted


async def _answer(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded_h11(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose next request's headers are late.

    The deadline runs from the connection's start, and again from the end of each response, until
    the request line and headers of the next request have arrived.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _waiting_for: Any = None  # the cycle in place when the deadline was set

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not self._waiting_for:  # the headers of a new request arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._waiting_for = self.cycle
            self._timer = self.loop.call_later(header_timeout_s, self._late)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _late(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self.cycle is self._waiting_for and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11


def uvicorn_config(
    app: Any, host: str, port: int, settings: Any, log_level: str = "warning"
) -> Any:
    """A `uvicorn.Config` for `app` under the connection limits of `settings` (`ServeSettings`)."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False,
        http=guarded_h11(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,  # more connections or requests get 503
        timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
    )  # fmt: skip


def chars_per_token(tokenizer: Any, floor: int = 16) -> int:
    """The most characters one token of `tokenizer` covers: its longest vocabulary entry, at least
    `floor`. A text of more than `n` × this many characters has more than `n` tokens for the
    tokenizers served here (byte-level BPE, SentencePiece), so it can be refused untokenised."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max([floor] + [len(t) for t in vocab if isinstance(t, str)])
