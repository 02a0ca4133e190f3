"""The served-model API: OpenAI-compatible endpoints at a chosen access level, dynamically batched.

    GET  /v1/models                      TEXT
    POST /v1/completions                 TEXT (with `logprobs` or `echo`: SCORES)
    POST /v1/chat/completions            TEXT
    POST /v1/lfm/next_token_logprobs     SCORES      (lfm extension: the full next-token row)
    POST /v1/lfm/embed                   EMBEDDINGS  (lfm extension: input embeddings)
    POST /v1/lfm/logits_from_embeds      EMBEDDINGS  (lfm extension: logits for given embeddings)

An endpoint above the served level answers 403; a wrong or missing key 401; a malformed body 422;
a body or text over the limits 413; a full queue 429; a request past its time 504.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from lfm.access import Access
from lfm.errors import LfmError
from lfm.serve import schemas as S
from lfm.serve.backend import Backend
from lfm.serve.batcher import Batcher, QueueFull
from lfm.serve.wire import pack, unpack


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server."""

    api_key: str | None = None  # required from clients when set (Authorization: Bearer KEY)
    max_batch: int = 32  # items per forward pass
    max_wait_ms: float = 5.0  # how long a request waits for others to share its pass
    max_queue: int = 256  # requests waiting; more get 429
    max_body_bytes: int = 64 * 2**20  # larger bodies get 413
    max_input_tokens: int = 2048  # tokens per text or embedding row; more get 413
    max_items: int = 256  # texts per request; more get 413
    max_new_tokens: int = 256  # generation cap
    timeout_s: float = 60.0  # a request waiting longer gets 504


def build_app(backend: Backend, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """A FastAPI app serving `backend` under `settings` (run it with uvicorn)."""
    app = FastAPI(title="lfm served model", version="1",
                  description=f"{backend.name} at {backend.level.name} access")  # fmt: skip
    app.state.batcher = Batcher(backend.ops(), settings.max_batch, settings.max_wait_ms,
                                settings.max_queue)  # fmt: skip
    app.state.backend, app.state.settings = backend, settings
    _install_guards(app, settings)
    _add_routes(app, backend, settings)
    return app


def _install_guards(app: FastAPI, settings: ServeSettings) -> None:
    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > settings.max_body_bytes:
            return JSONResponse(
                {"detail": f"body of {size} bytes exceeds {settings.max_body_bytes}"}, 413
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_r: Request, e: RequestValidationError) -> JSONResponse:
        # without the offending input: it may not be valid JSON (NaN, a lone surrogate)
        errors = [{k: err[k] for k in ("type", "loc", "msg") if k in err} for err in e.errors()]
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(LfmError)
    async def lfm_error(_r: Request, e: LfmError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, 400)

    @app.exception_handler(ValueError)
    async def value_error(_r: Request, e: ValueError) -> JSONResponse:
        return JSONResponse({"detail": f"invalid request: {e}"}, 400)


def _auth(settings: ServeSettings) -> Any:
    def check(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):  # constant time
            raise HTTPException(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    return Depends(check)


def _need(backend: Backend, level: Access, what: str) -> None:
    if backend.level < level:
        raise HTTPException(
            403, f"{what} needs {level.name} access; this server gives only {backend.level.name}"
        )


def _max_tokens(backend: Backend, settings: ServeSettings) -> int:
    """Tokens per text or embedding row: the setting, capped at the model's context."""
    return min(settings.max_input_tokens, backend.max_positions or settings.max_input_tokens)


def _check_texts(
    backend: Backend, settings: ServeSettings, texts: list[str], new_tokens: int = 0
) -> list[int]:
    if len(texts) > settings.max_items:
        raise HTTPException(413, f"{len(texts)} texts exceed the limit of {settings.max_items}")
    counts = [backend.n_tokens(t) for t in texts]
    if counts and min(counts) == 0:
        raise HTTPException(422, "a text has no tokens; send at least one character")
    limit = _max_tokens(backend, settings)
    if counts and max(counts) > limit:
        raise HTTPException(413, f"a text of {max(counts)} tokens exceeds {limit}")
    if counts and backend.max_positions and max(counts) + new_tokens > backend.max_positions:
        raise HTTPException(413, f"{max(counts)} prompt tokens + max_tokens {new_tokens} exceed "
                                 f"the model's context of {backend.max_positions}")  # fmt: skip
    return counts


async def _run(app: FastAPI, op: str, items: list[Any], key: Any = None) -> list[Any]:
    try:
        return await asyncio.wait_for(app.state.batcher.submit(op, items, key),
                                      app.state.settings.timeout_s)  # fmt: skip
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": "1"}) from None
    except TimeoutError:
        raise HTTPException(504, "the request timed out in the server queue") from None


def _add_routes(app: FastAPI, b: Backend, s: ServeSettings) -> None:
    auth = _auth(s)
    _info_routes(app, b, auth)
    _text_routes(app, b, s, auth)
    _tensor_routes(app, b, s, auth)


def _info_routes(app: FastAPI, b: Backend, auth: Any) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "access": b.level.name.lower()}

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        card = {
            "id": b.name,
            "object": "model",
            "owned_by": "lfm",
            "lfm_access": b.level.name.lower(),
            "lfm_vocab_size": b.vocab_size,
        }
        return {"object": "list", "data": [card]}


def _text_routes(app: FastAPI, b: Backend, s: ServeSettings, auth: Any) -> None:
    @app.post("/v1/completions", dependencies=[auth])
    async def completions(req: S.CompletionRequest) -> dict[str, Any]:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if req.logprobs is not None or req.echo:
            _need(b, Access.SCORES, "echo or logprobs")
        if req.max_tokens > s.max_new_tokens:
            raise HTTPException(413, f"max_tokens {req.max_tokens} exceeds {s.max_new_tokens}")
        counts = _check_texts(b, s, prompts, req.max_tokens)
        outs = await _generate(app, prompts, req.max_tokens, req.temperature, req.seed)
        logprobs = await _logprobs(app, req, prompts, outs) if req.logprobs is not None else None
        choices = [_choice(i, (p if req.echo else "") + o, logprobs, req.max_tokens)
                   for i, (p, o) in enumerate(zip(prompts, outs, strict=True))]  # fmt: skip
        return _envelope("text_completion", b.name, choices, counts, outs, b)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(req: S.ChatRequest) -> dict[str, Any]:
        if req.max_tokens > s.max_new_tokens:
            raise HTTPException(413, f"max_tokens {req.max_tokens} exceeds {s.max_new_tokens}")
        prompt = _chat_prompt(b, req.messages)
        counts = _check_texts(b, s, [prompt], req.max_tokens)
        outs = await _generate(app, [prompt], req.max_tokens, req.temperature, req.seed)
        msg = {
            "index": 0,
            "message": {"role": "assistant", "content": outs[0]},
            "finish_reason": "length",
        }
        return _envelope("chat.completion", b.name, [msg], counts, outs, b)


def _tensor_routes(app: FastAPI, b: Backend, s: ServeSettings, auth: Any) -> None:
    @app.post("/v1/lfm/next_token_logprobs", dependencies=[auth])
    async def next_token(req: S.NextTokenRequest) -> dict[str, Any]:
        _need(b, Access.SCORES, "next_token_logprobs")
        counts = _check_texts(b, s, req.prompt)
        rows = await _run(app, "next", req.prompt)
        return {"logprobs": [pack(r) for r in rows], "usage": _usage(counts, 0)}

    @app.post("/v1/lfm/embed", dependencies=[auth])
    async def embed(req: S.EmbedRequest) -> dict[str, Any]:
        _need(b, Access.EMBEDDINGS, "embed")
        counts = _check_texts(b, s, req.input)
        rows = await _run(app, "embed", req.input)
        return {"embeddings": [pack(r) for r in rows], "usage": _usage(counts, 0)}

    @app.post("/v1/lfm/logits_from_embeds", dependencies=[auth])
    async def logits_from_embeds(req: S.LogitsFromEmbedsRequest) -> dict[str, Any]:
        _need(b, Access.EMBEDDINGS, "logits_from_embeds")
        rows = _embed_rows(req, _max_tokens(b, s), s.max_items, b.dim)
        key = "last" if req.positions is not None else "all"
        out = await _run(app, "lfe", rows, key)
        return {"logits": [pack(r) for r in out], "usage": _usage([len(m) for _, m, _ in rows], 0)}


GREEDY_BELOW = 1e-3  # a lower temperature samples as greedy; a subnormal one made logits inf


async def _generate(app: FastAPI, prompts: list[str], n: int, temp: float, seed: int) -> list[str]:
    if n == 0:
        return ["" for _ in prompts]
    temp = temp if temp >= GREEDY_BELOW else 0.0
    return await _run(app, "generate", prompts, (n, temp, seed))


async def _logprobs(
    app: FastAPI, req: S.CompletionRequest, prompts: list[str], outs: list[str]
) -> list[dict]:
    top = int(req.logprobs or 0)
    if top > 20:
        raise HTTPException(400, f"logprobs {top} exceeds 20 alternatives per token")
    res = await _run(app, "tokens", [p + o for p, o in zip(prompts, outs, strict=True)], top)
    return res if req.echo else [_after(r, len(p)) for r, p in zip(res, prompts, strict=True)]


def _after(lp: dict[str, Any], start: int) -> dict[str, Any]:
    """Only the tokens that end after character `start` (the generated ones)."""
    keep = [i for i, e in enumerate(lp["text_end"]) if e > start]
    return {k: (None if v is None else [v[i] for i in keep]) for k, v in lp.items()}


def _choice(i: int, text: str, logprobs: list[dict] | None, max_tokens: int) -> dict[str, Any]:
    return {"index": i, "text": text, "logprobs": logprobs[i] if logprobs else None,
            "finish_reason": "length"}  # fmt: skip


def _usage(prompt_counts: list[int], completion: int) -> dict[str, int]:
    p = sum(prompt_counts)
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}


def _envelope(
    obj: str, name: str, choices: list, counts: list[int], outs: list[str], b: Backend
) -> dict:
    done = sum(b.n_tokens(o) - b.n_tokens("") for o in outs if o)
    return {"id": f"lfm-{time.time_ns()}", "object": obj, "created": int(time.time()),
            "model": name, "choices": choices, "usage": _usage(counts, done)}  # fmt: skip


def _chat_prompt(b: Backend, messages: list[S.ChatMessage]) -> str:
    """The model's chat template when its tokenizer has one; plain `role: content` lines otherwise."""
    msgs = [m.model_dump() for m in messages]
    if getattr(b.tokenizer, "chat_template", None):
        return str(
            b.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        )
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"


def _embed_rows(
    req: S.LogitsFromEmbedsRequest, max_tokens: int, max_items: int, dim: int
) -> list[tuple]:
    emb = unpack(req.embeds.model_dump())
    if emb.dim() != 3 or emb.shape[0] != len(req.attention_mask) or emb.shape[2] != dim:
        raise HTTPException(
            422, f"embeds must be (B, T, {dim}) with B = {len(req.attention_mask)} mask rows"
        )
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise HTTPException(422, "embeds must have at least one row and one position")
    if emb.shape[0] > max_items or emb.shape[1] > max_tokens:
        raise HTTPException(413, f"embeds {list(emb.shape)} exceed the limits "
                                 f"({max_items} rows, {max_tokens} tokens)")  # fmt: skip
    if any(len(m) != emb.shape[1] for m in req.attention_mask):
        raise HTTPException(422, "every attention_mask row must have T entries")
    pos = req.positions or [None] * emb.shape[0]
    if len(pos) != emb.shape[0] or any(p is not None and not 0 <= p < emb.shape[1] for p in pos):
        raise HTTPException(422, "positions must give one index in [0, T) per row")
    import torch

    return [(emb[i], torch.tensor(req.attention_mask[i]), pos[i]) for i in range(emb.shape[0])]
