"""What a request costs in memory, estimated in bytes before it runs.

Two numbers bound a request (`ServeSettings.max_pass_bytes`, `max_request_bytes`):
- a *pass* (one forward call over a batch of items padded to a width W) holds activations, the
  attention scores of one layer, and the logits it makes: (n, W, V) floats for the operations
  that need every position (echo log-probabilities, next-token rows through the handle), so the
  batcher sizes each pass to stay within the budget, and one item over it is refused (413);
- an *answer* (what the request returns, as Python objects and then JSON) grows with its items:
  V floats per next-token row, a few hundred bytes per echoed token and per top alternative.

The constants are upper estimates for float32 models (each float 4 bytes; a float in a Python
list about 32; base64 plus JSON of packed floats about 3 × 4 bytes).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

FLOAT = 4
NORM_ROWS = 256  # rows of the logits normalised at once (`lfm.serve.backend.token_logprobs`)
ACTIVATION_FLOATS = 16  # floats per position and model width alive in one layer's forward
PACKED = 4 * FLOAT  # a returned float: the tensor, its bytes, base64 and the JSON string
HIDDEN_WIDTH = 4  # a served module's output is taken to be at most this many times d wide
TOKEN_BYTES = (
    600  # one echoed token: its text, offsets, id and log-probability, as objects and JSON
)
ALTERNATIVE_BYTES = 300  # one top-logprobs entry: its decoded text and value, a dict slot, JSON


@dataclass(frozen=True)
class Shape:
    """The sizes of a model that set the memory of a pass."""

    vocab: int
    dim: int
    heads: int
    keeps_logits: bool  # the forward takes `logits_to_keep` (logits of chosen positions only)


def pass_bytes(shape: Shape, op: str, key: Hashable, n: int, width: int) -> int:
    """Peak bytes of one pass of `op` over `n` items padded to `width` tokens (an estimate)."""
    if op == "generate":
        width += int(key[0])  # type: ignore[index]  # the prompt and every new token
    body = n * width * (ACTIVATION_FLOATS * shape.dim + shape.heads * width) * FLOAT
    rows = n * _logit_rows(shape, op, key, n, width) + (NORM_ROWS if op == "tokens" else 0)
    return body + rows * shape.vocab * FLOAT


def _logit_rows(shape: Shape, op: str, key: Hashable, n: int, width: int) -> int:
    """(·, V) rows of logits one item of the pass holds."""
    if op == "embed":
        return 0
    if op == "lfe" and key == "last" and shape.keeps_logits:
        return min(n, width)  # one column per distinct position asked for in the batch
    return width  # echo, next-token rows and generation: every position's logits


def answer_bytes(shape: Shape, op: str, key: Hashable, sizes: Sequence[int]) -> int:
    """Bytes of a request's answer (Python objects and its JSON) for items of `sizes` tokens."""
    tokens = sum(sizes)
    if op == "tokens":
        return tokens * (TOKEN_BYTES + int(key or 0) * ALTERNATIVE_BYTES)
    if op == "next" or (op == "lfe" and key == "last"):
        return len(sizes) * shape.vocab * PACKED
    if op == "lfe":
        return tokens * shape.vocab * PACKED
    if op == "embed":
        return tokens * shape.dim * PACKED
    # hidden states: per module, a width of at most 4 d (an MLP's inner layer) assumed
    if op in ("hidden", "hidden_ids"):
        return tokens * len(key) * HIDDEN_WIDTH * shape.dim * PACKED  # type: ignore[arg-type]
    return len(sizes) * int(key[0]) * TOKEN_BYTES  # type: ignore[index]  # generated text


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"
