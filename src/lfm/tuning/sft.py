"""Supervised fine-tuning (instruction tuning) of a causal LM on prompt/response pairs.

Instruction tuning (Wei et al. 2021, FLAN, arXiv 2109.01652; Ouyang et al. 2022, arXiv 2203.02155)
minimises the negative log-likelihood of the response given the prompt, rendered with the model's
chat template:

    L = − Σ_{t ∈ response} log p(x_t | x_<t),   labels = −100 on every prompt and padding token

The small instruction set in `data/instructions.jsonl` is written by `make_instructions` from
templates over facts, arithmetic and formatting (regenerate it with `write_instructions`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfm.errors import ConfigError

IGNORE = -100
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)  # for tokenizers without a chat template (the tiny test models)
CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Portugal": "Lisbon", "Poland": "Warsaw", "Austria": "Vienna", "Chile": "Santiago",
}  # fmt: skip
WORDS = (
    "river",
    "garden",
    "model",
    "signal",
    "winter",
    "pencil",
    "orange",
    "castle",
    "planet",
    "ladder",
)


def _fact(rng: random.Random) -> dict[str, str]:
    country = rng.choice(list(CAPITALS))
    if rng.random() < 0.5:
        return {
            "prompt": f"What is the capital of {country}?",
            "response": f"The capital of {country} is {CAPITALS[country]}.",
        }
    return {
        "prompt": f"Which country has {CAPITALS[country]} as its capital?",
        "response": f"{CAPITALS[country]} is the capital of {country}.",
    }


def _arith(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(2, 49), rng.randint(2, 49)
    if rng.random() < 0.5:
        return {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
    return {"prompt": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."}


def _format(rng: random.Random) -> dict[str, str]:
    w = rng.sample(WORDS, 3)
    if rng.random() < 0.5:
        return {"prompt": f"Write the word '{w[0]}' in capital letters.", "response": w[0].upper()}
    return {
        "prompt": f"Sort these words alphabetically: {', '.join(w)}.",
        "response": ", ".join(sorted(w)),
    }


def make_instructions(n: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct prompt/response pairs from the three template families, in turn (n ≤ 90)."""
    if n > 90:
        raise ConfigError(
            f"the templates give about 30 distinct facts; ask for at most 90, not {n}"
        )
    rng, makers = random.Random(seed), (_fact, _arith, _format)
    out: dict[str, dict[str, str]] = {}
    for i in range(100 * n):
        ex = makers[i % 3](rng)
        out.setdefault(ex["prompt"], ex)
        if len(out) == n:
            break
    return list(out.values())


def write_instructions(path: str | Path, n: int = 60, seed: int = 0) -> None:
    lines = [json.dumps(ex) for ex in make_instructions(n, seed)]
    Path(path).write_text("\n".join(lines) + "\n")


def load_instructions(path: str | Path | None = None) -> list[dict[str, str]]:
    """The packaged instruction set (or a JSONL file of {"prompt", "response"} objects)."""
    try:
        text = (
            Path(path).read_text()
            if path
            else resources.files("lfm.tuning").joinpath("data/instructions.jsonl").read_text()
        )
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read instruction rows from {path}: {e}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path}: every line must be a JSON object with 'prompt' and 'response'")
    if not rows:
        raise ConfigError(f"{path} holds no instruction rows (one JSON object per line)")
    bad = [i for i, r in enumerate(rows) if not {"prompt", "response"} <= set(r)]
    if bad:
        raise ConfigError(f"instruction rows {bad[:5]} lack a 'prompt' or 'response' field")
    bad = [i for i, r in enumerate(rows) if not all(isinstance(r[k], str) and r[k].strip()
                                                    for k in ("prompt", "response"))]  # fmt: skip
    if bad:
        raise ConfigError(f"instruction rows {bad[:5]}: 'prompt' and 'response' must be text")
    return rows


def _template(tokenizer: Any) -> str | None:
    return None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE


def render(tokenizer: Any, prompt: str, response: str | None = None) -> str:
    """The chat-template text of a user turn, and of the assistant's reply when given."""
    msgs = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True, chat_template=_template(tokenizer)
        )
    msgs.append({"role": "assistant", "content": response})
    return tokenizer.apply_chat_template(msgs, tokenize=False, chat_template=_template(tokenizer))


def sft_example(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole exchange and labels that are −100 on the prompt's tokens."""
    head_text, full_text = render(tokenizer, prompt), render(tokenizer, prompt, response)
    if not full_text.startswith(head_text):
        raise ConfigError(
            "the chat template does not render the prompt as a prefix of the exchange"
        )
    # tokenised apart, so that no token straddles the prompt/response boundary
    head = tokenizer(head_text, add_special_tokens=False)["input_ids"]
    full = head + tokenizer(full_text[len(head_text) :], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and full[-1] != tokenizer.eos_token_id:
        full = [*full, tokenizer.eos_token_id]  # teach the model to stop
    return full, [IGNORE] * len(head) + full[len(head) :]


def sft_batches(
    tokenizer: Any, rows: Sequence[dict[str, str]], batch_size: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of (input_ids, attention_mask, labels), shuffled once by `seed`."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(order), batch_size):
        pairs = [
            sft_example(tokenizer, rows[j]["prompt"], rows[j]["response"])
            for j in order[i : i + batch_size]
        ]
        width = max(len(ids) for ids, _ in pairs)
        ids = torch.full((len(pairs), width), pad)
        labels = torch.full((len(pairs), width), IGNORE)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for k, (x, y) in enumerate(pairs):
            ids[k, : len(x)], labels[k, : len(y)], mask[k, : len(x)] = (
                torch.tensor(x),
                torch.tensor(y),
                1,
            )
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL over the response tokens (the model shifts the labels)."""
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
