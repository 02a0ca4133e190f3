"""Request bodies of the served-model API (OpenAI-compatible, plus two `lfm` extensions).

Pydantic validates every body at the edge, so a malformed request is a 422 with a message and never
reaches the model. Every OpenAI parameter a completion or chat body may carry is either honoured
(`stop`, `n`, `top_p`, `temperature`, `seed`, `max_tokens`, and for completions `echo` and
`logprobs`) or, when set to anything but its no-op value, refused with a 422 that names it
(`stream`, `presence_penalty`, `frequency_penalty`, `logit_bias`, `best_of`, `suffix`, `tools`,
`response_format` ...); a field OpenAI does not define is refused too. `user` is metadata and
accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _utf8(text: str) -> str:
    """JSON may carry lone surrogates (`"\\ud800"`) that no tokenizer can encode: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (lone surrogate); send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # the range torch.manual_seed takes


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field lfm would not honour is a 422, not ignored


def _unsupported(name: str, why: str, noop: Any) -> Any:
    """A field that must keep its no-op value: any other is a 422 naming the field and why."""

    def check(value: Any) -> Any:
        if value is not None and value != noop:
            raise ValueError(f"{name} is not supported: {why}; leave it out")
        return value

    return Annotated[Any, AfterValidator(check)]


def _stops(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop takes at most 4 non-empty strings")
    return stops


Stop = Annotated[Text | list[Text] | None, AfterValidator(_stops)]


class _Sampling(_Body):
    """What a completion and a chat request share (OpenAI's names and defaults)."""

    model: str | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)  # nucleus sampling, when temperature > 0
    n: int = Field(1, ge=1, le=16)  # completions per prompt
    stop: Stop = None  # the text is cut before the first of these (finish_reason "stop")
    seed: Seed = 0
    user: str | None = None  # metadata, as OpenAI's
    stream: _unsupported("stream", "answers are sent whole", False) = None
    presence_penalty: _unsupported("presence_penalty", "no penalties are applied", 0) = None
    frequency_penalty: _unsupported("frequency_penalty", "no penalties are applied", 0) = None
    logit_bias: _unsupported("logit_bias", "logits are not biased", {}) = None
    stream_options: _unsupported("stream_options", "answers are sent whole", None) = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    # text, texts, or (as OpenAI's API allows) token ids: one row or several; token-id prompts
    # are scored only (`echo` with `max_tokens` 0)
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: int = Field(16, ge=0)  # 0 with echo: score the prompt only
    echo: bool = False  # return the prompt (and its token log-probabilities with `logprobs`)
    logprobs: int | None = Field(None, ge=0)  # top alternatives per token; -1 (lfm): full vocab
    best_of: _unsupported("best_of", "each of the n completions is returned", 1) = None
    suffix: _unsupported("suffix", "no insertion after the completion", None) = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(32, ge=1)
    logprobs: _unsupported("logprobs", "chat answers carry no log-probabilities here; use "
                           "/v1/completions with logprobs", False) = None  # fmt: skip
    top_logprobs: _unsupported("top_logprobs", "see logprobs", None) = None
    tools: _unsupported("tools", "no tool calling", None) = None
    tool_choice: _unsupported("tool_choice", "no tool calling", None) = None
    functions: _unsupported("functions", "no function calling", None) = None
    response_format: _unsupported("response_format", "output is not constrained", None) = None


class Tensor(_Body):
    data: str  # base64 of little-endian float32
    shape: list[Annotated[int, Field(ge=0)]]


class EmbedRequest(_Body):
    model: str | None = None
    input: list[Text] = Field(min_length=1)


class LogitsFromEmbedsRequest(_Body):
    model: str | None = None
    embeds: Tensor  # (B, T, D)
    attention_mask: list[list[Literal[0, 1]]]  # (B, T)
    positions: list[int] | None = None  # one position per row: return (B, V) instead of (B, T, V)


class HiddenRequest(_Body):
    model: str | None = None
    input: (  # texts, or token-id rows (the server's vocabulary)
        Annotated[list[Text], Field(min_length=1)] | Annotated[list[TokenIds], Field(min_length=1)]
    )
    modules: list[str] = Field(min_length=1, max_length=8)  # names as `named_modules()` gives them


class NextTokenRequest(_Body):
    model: str | None = None
    prompt: list[Text] = Field(min_length=1)
