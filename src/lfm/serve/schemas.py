"""Request bodies of the served-model API (OpenAI-compatible, plus two `lfm` extensions).

Pydantic validates every body at the edge, so a malformed request is a 422 with a message and never
reaches the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

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
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class CompletionRequest(_Body):
    model: str | None = None
    prompt: Text | Annotated[list[Text], Field(min_length=1)]
    max_tokens: int = Field(16, ge=0)  # 0 with echo: score the prompt only
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    echo: bool = False  # return the prompt (and its token log-probabilities with `logprobs`)
    logprobs: int | None = Field(None, ge=0)  # top alternatives per token; -1 (lfm): full vocab
    seed: Seed = 0


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: Seed = 0


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


class NextTokenRequest(_Body):
    model: str | None = None
    prompt: list[Text] = Field(min_length=1)
