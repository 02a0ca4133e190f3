"""Request bodies of the served-model API (OpenAI-compatible, plus two `lfm` extensions).

Pydantic validates every body at the edge, so a malformed request is a 422 with a message and never
reaches the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)  # 0 with echo: score the prompt only
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    echo: bool = False  # return the prompt (and its token log-probabilities with `logprobs`)
    logprobs: int | None = Field(None, ge=0)  # top alternatives per token; -1 (lfm): full vocab
    seed: int = 0


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    seed: int = 0


class Tensor(_Body):
    data: str  # base64 of little-endian float32
    shape: list[int]


class EmbedRequest(_Body):
    model: str | None = None
    input: list[str] = Field(min_length=1)


class LogitsFromEmbedsRequest(_Body):
    model: str | None = None
    embeds: Tensor  # (B, T, D)
    attention_mask: list[list[int]]  # (B, T)
    positions: list[int] | None = None  # one position per row: return (B, V) instead of (B, T, V)


class NextTokenRequest(_Body):
    model: str | None = None
    prompt: list[str] = Field(min_length=1)
