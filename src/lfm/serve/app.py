"""The served-model API: OpenAI-compatible endpoints at a chosen access level, dynamically batched.

    GET  /v1/models                      TEXT
    POST /v1/completions                 TEXT (with `logprobs` or `echo`: SCORES)
    POST /v1/chat/completions            TEXT
    POST /v1/lfm/next_token_logprobs     SCORES      (lfm extension: the full next-token row)
    POST /v1/lfm/embed                   EMBEDDINGS  (lfm extension: input embeddings)
    POST /v1/lfm/logits_from_embeds      EMBEDDINGS  (lfm extension: logits for given embeddings)
    POST /v1/lfm/hidden                  HIDDEN      (lfm extension: named modules' outputs)

An endpoint above the served level answers 403; a wrong or missing key 401; a malformed body 422;
a body, text or memory estimate over the limits 413; a body slower than its deadline 408; a full
queue 429; a request past its time 504. Tokenisation, the model and the rendering of large answers
run in worker threads, so the event loop (and `/health`) stays responsive while they work.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse

from lfm.access import Access
from lfm.errors import LfmError, did_you_mean
from lfm.serve import schemas as S
from lfm.serve.backend import Backend
from lfm.serve.batcher import Batcher, QueueFull
from lfm.serve.budget import answer_bytes, mib
from lfm.serve.limits import BodyLimit
from lfm.serve.wire import pack, unpack


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of one server."""

    api_key: str | None = None  # required from clients when set (Authorization: Bearer KEY)
    max_batch: int = 32  # items per forward pass
    max_wait_ms: float = 5.0  # how long a request waits for others to share its pass
    max_queue: int = 256  # requests waiting; more get 429
    max_body_bytes: int = 64 * 2**20  # bodies larger (counted as they arrive) get 413
    max_input_tokens: int = 2048  # tokens per text or embedding row; more get 413
    max_items: int = 256  # texts per request; more get 413
    max_new_tokens: int = 256  # generation cap
    timeout_s: float = 60.0  # a request waiting and running longer gets 504 (and is dropped)
    max_pass_bytes: int = 2**30  # estimated peak of one forward pass; one item over it gets 413
    max_request_bytes: int = 2**30  # estimated size of one answer; more gets 413
    body_timeout_s: float = 30.0  # a body still arriving after this gets 408
    header_timeout_s: float = 10.0  # a connection whose request headers are later is closed
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_connections: int = 64  # open connections (or requests in flight); more get 503
    max_header_bytes: int = 16 * 2**10  # request line and headers larger are refused (400)
    # the top-k tier of hosted APIs: at most this many alternatives per token (`logprobs` ≤ K)
    # and no full next-token row; None: no limit below the served level
    top_k: int | None = None


def build_app(backend: Backend, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """A FastAPI app serving `backend` under `settings` (run it with uvicorn)."""
    app = FastAPI(title="lfm served model", version="1", openapi_url=None, docs_url=None,
                  redoc_url=None, description=f"{backend.name} at {backend.level.name} access")  # fmt: skip
    app.state.batcher = Batcher(backend.ops(), settings.max_batch, settings.max_wait_ms,
                                settings.max_queue, backend.pass_bytes,
                                settings.max_pass_bytes)  # fmt: skip
    app.state.backend, app.state.settings = backend, settings
    _install_guards(app, settings)
    _add_routes(app, backend, settings)
    return app


def _install_guards(app: FastAPI, settings: ServeSettings) -> None:
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )

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


def bearer_key(header: str) -> str | None:
    """The key of an `Authorization: Bearer KEY` header (scheme in any case), else None."""
    scheme, _, key = header.strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _auth(settings: ServeSettings) -> Any:
    def check(request: Request) -> None:
        if settings.api_key is None:
            return
        given = bearer_key(request.headers.get("authorization", "")) or ""
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


async def _check_texts(
    b: Backend, s: ServeSettings, texts: list[str], new_tokens: int = 0
) -> list[int]:
    """Token counts of `texts`, refused (413) past the limits; long texts before tokenising."""
    if len(texts) > s.max_items:
        raise HTTPException(413, f"{len(texts)} texts exceed the limit of {s.max_items}")
    limit = _max_tokens(b, s)
    chars = limit * b.chars_per_token  # no text of more characters has `limit` tokens or fewer
    longest = max((len(t) for t in texts), default=0)
    if longest > chars:
        raise HTTPException(413, f"a text of {longest} characters exceeds {chars} "
                                 f"({limit} tokens of at most {b.chars_per_token})")  # fmt: skip
    counts = await asyncio.to_thread(lambda: [b.n_tokens(t) for t in texts])
    if counts and min(counts) == 0:
        raise HTTPException(422, "a text has no tokens; send at least one character")
    if counts and max(counts) > limit:
        raise HTTPException(413, f"a text of {max(counts)} tokens exceeds {limit}")
    if counts and b.max_positions and max(counts) + new_tokens > b.max_positions:
        raise HTTPException(413, f"{max(counts)} prompt tokens + max_tokens {new_tokens} exceed "
                                 f"the model's context of {b.max_positions}")  # fmt: skip
    return counts


def _afford(b: Backend, s: ServeSettings, op: str, key: Hashable, sizes: list[int]) -> None:
    """Refuse (413) a request whose estimated memory is over the budgets, before it runs."""
    one = b.pass_bytes(op, key, 1, max(sizes))
    if one > s.max_pass_bytes:
        raise HTTPException(413, f"an item of {max(sizes)} tokens needs about {mib(one)} in one "
                                 f"pass; this server allows {mib(s.max_pass_bytes)}")  # fmt: skip
    answer = answer_bytes(b.shape, op, key, sizes)
    if answer > s.max_request_bytes:
        raise HTTPException(413, f"the answer needs about {mib(answer)}; this server allows "
                                 f"{mib(s.max_request_bytes)} per request: send fewer or shorter "
                                 "items, or fewer alternatives")  # fmt: skip


async def _run(app: FastAPI, op: str, items: list[Any], key: Any = None,
               sizes: list[int] | None = None) -> list[Any]:  # fmt: skip
    """Items through the batcher, within the memory budgets and the request's time."""
    b, s = app.state.backend, app.state.settings
    sizes = sizes or [1] * len(items)
    _afford(b, s, op, key, sizes)
    try:
        return await asyncio.wait_for(app.state.batcher.submit(op, items, key, sizes), s.timeout_s)
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": "1"}) from None
    except TimeoutError:
        raise HTTPException(504, f"the request took longer than {s.timeout_s} s") from None


async def _reply(make: Callable[..., dict], *args: Any) -> JSONResponse:
    """The answer built and rendered to JSON in a worker thread (large answers take a while)."""
    return await asyncio.to_thread(lambda: JSONResponse(make(*args)))


def _add_routes(app: FastAPI, b: Backend, s: ServeSettings) -> None:
    auth = _auth(s)
    _info_routes(app, b, s, auth)
    _spec_routes(app, auth)
    _text_routes(app, b, s, auth)
    _tensor_routes(app, b, s, auth)


def _info_routes(app: FastAPI, b: Backend, s: ServeSettings, auth: Any) -> None:
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "access": b.level.name.lower()}

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        card = {
            "id": b.name,  # the name only: never the folder it was loaded from
            "object": "model",
            "owned_by": "lfm",
            "lfm_access": b.level.name.lower(),
            "lfm_vocab_size": b.vocab_size,
            "lfm_batching": _batching(app),
            **_top_k(s),
        }
        return {"object": "list", "data": [card]}


def _batching(app: FastAPI) -> dict[str, int]:
    """The batcher's counters since the server started (read-only): forward passes, the items and
    requests they served, and requests dropped because their caller stopped waiting."""
    st = app.state.batcher.stats
    return {"passes": st.passes, "items": st.items, "requests": st.requests, "dropped": st.dropped}


def _spec_routes(app: FastAPI, auth: Any) -> None:
    """The OpenAPI spec and its viewers, behind the key like every endpoint but `/health`."""

    @app.get("/openapi.json", dependencies=[auth], include_in_schema=False)
    async def spec() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=[auth], include_in_schema=False)
    async def docs() -> Any:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/redoc", dependencies=[auth], include_in_schema=False)
    async def redoc() -> Any:
        return get_redoc_html(openapi_url="/openapi.json", title=app.title)


def _text_routes(app: FastAPI, b: Backend, s: ServeSettings, auth: Any) -> None:
    @app.post("/v1/completions", dependencies=[auth])
    async def completions(req: S.CompletionRequest) -> JSONResponse:
        prompts = _prompts(req.prompt)
        if req.logprobs is not None or req.echo:
            _need(b, Access.SCORES, "echo or logprobs")
        if req.max_tokens > s.max_new_tokens:
            raise HTTPException(413, f"max_tokens {req.max_tokens} exceeds {s.max_new_tokens}")
        if req.logprobs is not None and req.logprobs > 20:
            raise HTTPException(400, f"logprobs {req.logprobs} exceeds 20 alternatives per token")
        if req.logprobs is not None and s.top_k is not None and req.logprobs > s.top_k:
            raise HTTPException(403, f"logprobs {req.logprobs}: this server gives at most the "
                                     f"top {s.top_k} log-probabilities per token")  # fmt: skip
        if not isinstance(prompts[0], str):
            return await _score_ids(app, b, s, req, prompts)
        prompts = _times(prompts, req.n)  # n choices per prompt, each within the limits
        counts = await _check_texts(b, s, prompts, req.max_tokens)
        if req.logprobs is not None:  # refused before generating, not after
            _afford(b, s, "tokens", req.logprobs, [c + req.max_tokens for c in counts])
        outs, ends = _cut(await _generate(app, prompts, counts, req), req.stop)
        logprobs = None
        if req.logprobs is not None:
            logprobs = await _logprobs(app, req, prompts, outs, counts)
        choices = [_choice(i, (p if req.echo else "") + o, logprobs, e)
                   for i, (p, o, e) in enumerate(zip(prompts, outs, ends, strict=True))]  # fmt: skip
        return await _reply(_envelope, "text_completion", b.name, choices, counts, outs, b, s)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(req: S.ChatRequest) -> JSONResponse:
        if req.max_tokens > s.max_new_tokens:
            raise HTTPException(413, f"max_tokens {req.max_tokens} exceeds {s.max_new_tokens}")
        prompt = await asyncio.to_thread(_chat_prompt, b, req.messages)
        counts = await _check_texts(b, s, [prompt] * req.n, req.max_tokens)
        outs, ends = _cut(await _generate(app, [prompt] * req.n, counts, req), req.stop)
        msgs = [{"index": i, "message": {"role": "assistant", "content": o}, "finish_reason": e}
                for i, (o, e) in enumerate(zip(outs, ends, strict=True))]  # fmt: skip
        return await _reply(_envelope, "chat.completion", b.name, msgs, counts, outs, b, s)


def _tensor_routes(app: FastAPI, b: Backend, s: ServeSettings, auth: Any) -> None:
    @app.post("/v1/lfm/next_token_logprobs", dependencies=[auth])
    async def next_token(req: S.NextTokenRequest) -> JSONResponse:
        _need(b, Access.SCORES, "next_token_logprobs")
        if s.top_k is not None:
            raise HTTPException(403, f"next_token_logprobs is the full next-token row; this server "
                                     f"gives only the top {s.top_k} (completions with logprobs)")  # fmt: skip
        counts = await _check_texts(b, s, req.prompt)
        rows = await _run(app, "next", req.prompt, None, counts)
        return await _reply(lambda: {"logprobs": [pack(r) for r in rows],
                                     "usage": _usage(counts, 0)})  # fmt: skip

    @app.post("/v1/lfm/embed", dependencies=[auth])
    async def embed(req: S.EmbedRequest) -> JSONResponse:
        _need(b, Access.EMBEDDINGS, "embed")
        counts = await _check_texts(b, s, req.input)
        rows = await _run(app, "embed", req.input, None, counts)
        return await _reply(lambda: {"embeddings": [pack(r) for r in rows],
                                     "usage": _usage(counts, 0)})  # fmt: skip

    @app.post("/v1/lfm/hidden", dependencies=[auth])
    async def hidden(req: S.HiddenRequest) -> JSONResponse:
        _need(b, Access.HIDDEN, "hidden")
        unknown = [m for m in req.modules if m not in b.modules]
        if unknown:
            hint = did_you_mean(unknown[0], b.modules)
            raise HTTPException(422, f"no module {unknown[0]!r} in the served model{hint}")
        items: list[Any] = req.input
        text = isinstance(items[0], str)  # texts and token rows are never batched together
        counts = await _check_texts(b, s, items) if text else _check_ids(b, s, items)
        op = "hidden" if text else "hidden_ids"
        rows = await _run(app, op, items, tuple(req.modules), counts)
        return await _reply(lambda: {"hidden": [{m: pack(t) for m, t in r.items()} for r in rows],
                                     "usage": _usage(counts, 0)})  # fmt: skip

    @app.post("/v1/lfm/logits_from_embeds", dependencies=[auth])
    async def logits_from_embeds(req: S.LogitsFromEmbedsRequest) -> JSONResponse:
        _need(b, Access.EMBEDDINGS, "logits_from_embeds")
        rows = await asyncio.to_thread(_embed_rows, req, _max_tokens(b, s), s.max_items, b.dim)
        key = "last" if req.positions is not None else "all"
        sizes = [int(e.shape[0]) for e, _, _ in rows]
        out = await _run(app, "lfe", rows, key, sizes)
        return await _reply(lambda: {"logits": [pack(r) for r in out],
                                     "usage": _usage([len(m) for _, m, _ in rows], 0)})  # fmt: skip


GREEDY_BELOW = 1e-3  # a lower temperature samples as greedy; a subnormal one made logits inf


async def _generate(
    app: FastAPI, prompts: list[str], counts: list[int], req: S.CompletionRequest | S.ChatRequest
) -> list[str]:
    """The continuations: greedy, or sampled under the request's temperature, top_p and seed (the
    n copies of a prompt sit in one call under one seed, so they draw different samples)."""
    if req.max_tokens == 0:
        return ["" for _ in prompts]
    temp = req.temperature if req.temperature >= GREEDY_BELOW else 0.0
    key = (req.max_tokens, temp, req.seed, req.top_p)
    return await _run(app, "generate", prompts, key, counts)


def _prompts(prompt: Any) -> list[Any]:
    """The request's prompts: texts, or token-id rows (one row given alone is a list of ints)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


async def _score_ids(
    app: FastAPI, b: Backend, s: ServeSettings, req: S.CompletionRequest, rows: list[list[int]]
) -> JSONResponse:  # fmt: skip
    """Token-id prompts: scored as given (`echo`, `max_tokens` 0), within the same limits."""
    if not req.echo or req.max_tokens != 0 or req.n != 1:
        raise HTTPException(422, "token-id prompts are scored only: send echo true, max_tokens 0 "
                                 "and n 1, or send the prompt as text")  # fmt: skip
    counts = _check_ids(b, s, rows)
    logprobs = None
    if req.logprobs is not None:
        logprobs = await _run(app, "tokens", rows, int(req.logprobs), counts)
    texts = await asyncio.to_thread(lambda: [b.tokenizer.decode(r) for r in rows])
    choices = [_choice(i, t, logprobs, "length") for i, t in enumerate(texts)]
    return await _reply(_envelope, "text_completion", b.name, choices, counts, [], b, s)


def _check_ids(b: Backend, s: ServeSettings, rows: list[list[int]]) -> list[int]:
    """Lengths of token-id rows, refused past the limits or outside the vocabulary."""
    if len(rows) > s.max_items:
        raise HTTPException(413, f"{len(rows)} token rows exceed the limit of {s.max_items}")
    bad = max((i for r in rows for i in r), default=0)
    if bad >= (b.vocab_size or 0):
        raise HTTPException(422, f"token id {bad} is outside the vocabulary of {b.vocab_size}")
    counts, limit = [len(r) for r in rows], _max_tokens(b, s)
    if max(counts) > limit:
        raise HTTPException(413, f"a row of {max(counts)} tokens exceeds {limit}")
    return counts


def _times(items: list[Any], n: int) -> list[Any]:
    """Each item n times in a row (the n choices of one prompt are neighbours, as OpenAI's)."""
    return [x for x in items for _ in range(n)]


def _cut(outs: list[str], stops: list[str] | None) -> tuple[list[str], list[str]]:
    """Each text cut before the first stop sequence in it, and its finish reason: "stop" where
    one was found, else "length"."""
    texts, ends = [], []
    for o in outs:
        at = min((i for i in (o.find(st) for st in stops or []) if i >= 0), default=-1)
        texts.append(o if at < 0 else o[:at])
        ends.append("length" if at < 0 else "stop")
    return texts, ends


async def _logprobs(app: FastAPI, req: S.CompletionRequest, prompts: list[str], outs: list[str],
                    counts: list[int]) -> list[dict]:  # fmt: skip
    texts = [p + o for p, o in zip(prompts, outs, strict=True)]
    sizes = [c + req.max_tokens for c in counts]  # at most: the new tokens may merge
    res = await _run(app, "tokens", texts, int(req.logprobs or 0), sizes)
    return res if req.echo else [_after(r, len(p)) for r, p in zip(res, prompts, strict=True)]


def _after(lp: dict[str, Any], start: int) -> dict[str, Any]:
    """Only the tokens that end after character `start` (the generated ones)."""
    keep = [i for i, e in enumerate(lp["text_end"]) if e > start]
    return {k: (None if v is None else [v[i] for i in keep]) for k, v in lp.items()}


def _choice(i: int, text: str, logprobs: list[dict] | None, end: str) -> dict[str, Any]:
    return {"index": i, "text": text, "logprobs": logprobs[i] if logprobs else None,
            "finish_reason": end}  # fmt: skip


def _usage(prompt_counts: list[int], completion: int) -> dict[str, int]:
    p = sum(prompt_counts)
    return {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}


def _envelope(
    obj: str, name: str, choices: list, counts: list[int], outs: list[str], b: Backend,
    s: ServeSettings,
) -> dict:  # fmt: skip
    done = sum(b.n_tokens(o) - b.n_tokens("") for o in outs if o)
    return {"id": f"lfm-{time.time_ns()}", "object": obj, "created": int(time.time()),
            "model": name, "choices": choices, "usage": _usage(counts, done), **_top_k(s)}  # fmt: skip


def _top_k(s: ServeSettings) -> dict[str, int]:
    """`lfm_top_k: K` on a top-k server (in the model card and every completion), else nothing."""
    return {} if s.top_k is None else {"lfm_top_k": s.top_k}


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
