"""A language model that writes instructions, for the instruction searches (APE, OPRO) and the
phrase pool of prompt search.

The proposer is any handle with `generate` (TEXT access or more). A local model whose tokenizer
has a chat template gets the meta-prompt as a user turn (`tokenizer.apply_chat_template`); any
other handle (narrowed, served) gets it as plain text to continue. APE's forward-generation
meta-prompt (Zhou et al. 2022, arXiv 2211.01910) shows input-output demonstrations and asks what
the instruction was; OPRO's texts (Yang et al. 2023, arXiv 2309.03409) are here too, and the
meta-prompt itself is built in `lfm.tuning.opro`.

Each output is parsed into at most one instruction (`parse`): the text in square brackets when
there is one (the meta-prompts ask for them, as OPRO's does), else the first non-empty line;
control characters and undecodable bytes become spaces, quotes and a leading "Instruction:" are
stripped and whitespace collapsed; a text longer than the limit is cut at the last word that
fits. An output with no usable text (empty, no letter, shorter than three characters, the `<INS>`
placeholder, or words copied from the meta-prompts' own text) is None: the caller skips it and
counts it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from lfm.access import Access, require

DEFAULT_PROPOSER = "smollm2-135m"  # the offline asset that proposes when none is given
MIN_CHARS = 3  # a shorter proposal is no instruction

_BRACKETS = re.compile(r"\[([^\[\]]+)\]")
_LEAD = re.compile(r"^(?:the\s+)?(?:new\s+)?(?:instruction|text|prompt)(?:\s+(?:was|is))?\s*:\s*",
                   re.IGNORECASE)  # fmt: skip
_QUOTES = "\"'`“”‘’ "

APE_HEAD = (
    "I gave a friend an instruction and {n} inputs. The friend read the instruction and wrote an "
    "output for every one of the inputs. Here are the input-output pairs:"
)
APE_TAIL = "The instruction was (write it in square brackets):"
OPRO_HEAD = (
    "I have some texts along with their corresponding scores. The texts are arranged in "
    "ascending order based on their scores, where higher scores indicate better quality."
)
OPRO_EXEMPLARS = (
    "The following exemplars show how to apply your text: you replace <INS> in each input with "
    "your text, then read the input and give an output. We say your output is wrong if your "
    "output is different from the given output, and we say your output is correct if they are "
    "the same."
)
OPRO_TAIL = (
    "Write your new text that is different from the old ones and has a score as high as "
    "possible. Write the text in square brackets."
)


def load_proposer(proposer: Any = None) -> Any:
    """A proposer handle: None loads `DEFAULT_PROPOSER` locally, a name or folder is loaded, a
    handle is used as it is (it must give `generate`: TEXT access or more)."""
    if proposer is None or isinstance(proposer, str):
        from lfm.assets import load_model

        return load_model(proposer or DEFAULT_PROPOSER, kind="causal-lm")
    require(proposer, Access.TEXT, "the proposer")
    return proposer


def chat(handle: Any, text: str) -> str:
    """`text` as a user turn of the handle's chat template, when it is a local model whose
    tokenizer has one; else `text` itself."""
    tok = getattr(handle, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        return text
    return str(
        tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    )


def propose(
    handle: Any, meta_prompt: str, n: int, tokens: int, temperature: float, seed: int
) -> list[str]:
    """`n` sampled continuations of one meta-prompt (one `generate` call; the raw outputs)."""
    prompt = chat(handle, meta_prompt)
    kw: dict[str, Any] = {"temperature": temperature, "seed": seed} if temperature > 0 else {}
    return list(handle.generate([prompt] * n, max_new_tokens=tokens, **kw))


def parse(raw: str, max_chars: int) -> str | None:
    """One instruction from a proposer's output, or None when it holds no usable one."""
    m = _BRACKETS.search(raw)
    line = m.group(1) if m else next((ln for ln in raw.splitlines() if ln.strip()), "")
    line = "".join(c if c.isprintable() and c != "\ufffd" else " " for c in line)
    text = _LEAD.sub("", " ".join(line.split())).strip(_QUOTES)
    text = _LEAD.sub("", text).strip(_QUOTES)  # a quoted "Instruction: ..." too
    if len(text) > max_chars:
        cut = text[: max_chars + 1].rsplit(" ", 1)[0]
        text = (cut if len(cut) <= max_chars else text[:max_chars]).rstrip(_QUOTES)
    if len(text) < MIN_CHARS or "<INS>" in text or not any(c.isalpha() for c in text):
        return None
    return None if key(text.rstrip(".:")) in _BOILERPLATE else text


def key(instruction: str) -> str:
    """What two instructions share when they are the same one (case and spacing aside)."""
    return " ".join(instruction.lower().split())


# the meta-prompts' own words: a proposal copied from them is an echo, not an instruction
_BOILERPLATE = key(" ".join((APE_HEAD, APE_TAIL, OPRO_HEAD, OPRO_EXEMPLARS, OPRO_TAIL)))


def interleaved(labels: torch.Tensor, n: int, rng: random.Random) -> list[int]:
    """`n` example indices drawn by `rng`, taking each class in turn (so demonstrations show
    the labels' variety)."""
    by_class: dict[int, list[int]] = {}
    for i in rng.sample(range(len(labels)), len(labels)):
        by_class.setdefault(int(labels[i]), []).append(i)
    order = [by_class[c] for c in sorted(by_class)]
    out = [col[r] for r in range(max(map(len, order), default=0)) for col in order if r < len(col)]
    return out[:n]


def ape_prompt(pairs: Sequence[tuple[str, str]]) -> str:
    """APE's forward-generation meta-prompt over (input, output) demonstrations."""
    demos = "\n\n".join(f"Input: {x}\nOutput: {y}" for x, y in pairs)
    return f"{APE_HEAD.format(n=len(pairs))}\n\n{demos}\n\n{APE_TAIL}"


def ape_proposals(
    handle: Any, texts: Sequence[str], labels: torch.Tensor, words: Sequence[str], *, n: int,
    demos: int, chars: int, tokens: int, temperature: float, max_chars: int, seed: int,
) -> tuple[list[str | None], str]:  # fmt: skip
    """APE's proposals: `n` instructions (None where an output held none) written from `demos`
    demonstrations (texts cut to `chars`, label words as outputs), and the meta-prompt sent."""
    rng = random.Random(seed)
    idx = interleaved(labels, demos, rng)
    meta = ape_prompt([(" ".join(texts[i][:chars].split()), words[int(labels[i])]) for i in idx])
    raw = propose(handle, meta, n, tokens, temperature, rng.randrange(2**31))
    return [parse(r, max_chars) for r in raw], meta
