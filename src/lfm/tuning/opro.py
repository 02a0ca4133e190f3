"""Instruction optimisation through TEXT access: APE's proposals, then OPRO's loop.

An instruction ι goes before each example's prompt, and the target model answers by generation
alone (TEXT access: `generate`, greedy, `answer_tokens` tokens):

    a_i = generate(ι + "\\n\\n" + template(x_i)),   ŷ_i = the class whose label word a_i names first,
    score(ι) = (1/N) Σ_i [ŷ_i = y_i]                 (an answer naming no label word is wrong)

A second model, the proposer (any handle with `generate`; `lfm.tuning.proposer`), writes the
instructions:

- step 0 is APE (Zhou et al. 2022, arXiv 2211.01910): the proposer sees `demos` input-output
  demonstrations of the few-shot set and writes `candidates` instructions ("The instruction
  was ..."); each is scored;
- steps 1 … K are OPRO (Yang et al. 2023, arXiv 2309.03409): the meta-prompt holds the best `keep`
  instructions scored so far with their scores (accuracy in percent) sorted ascending, so that
  the best come last, then `examples` exemplars drawn from the few-shot set with `<INS>` where the
  instruction goes; the proposer writes `candidates` new instructions (sampled at
  `temperature`), each scored.

The starting instruction (`instruction`; OPRO's empty one by default) is scored first. The best
is kept: the highest score; of equal scores the shorter instruction (every later query pays for
its tokens), then the one scored first. A proposal already scored (case and spacing aside) or
with no usable text is skipped and counted, not scored again.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from lfm.access import Access, TextModel, narrow, require
from lfm.config import Config
from lfm.core.io import write_json
from lfm.errors import BudgetExceeded, LfmError
from lfm.registry import Example, register
from lfm.tuning.contract import TUNER
from lfm.tuning.proposer import (
    OPRO_EXEMPLARS,
    OPRO_HEAD,
    OPRO_TAIL,
    ape_proposals,
    interleaved,
    key,
    load_proposer,
    parse,
    propose,
)
from lfm.tuning.replay import ReplayLog, json_hash
from lfm.tuning.results import TuneResult
from lfm.tuning.tasks import TextClassification, Verbalizer
from lfm.tuning.tiny import tiny_news_lm, tiny_task
from lfm.tuning.trainer import data_kind


class OproConfig(Config):
    instruction: str = ""  # the starting instruction, scored first (OPRO: the empty one)
    steps: int = Field(4, ge=0)  # OPRO steps after APE's proposals (OPRO: up to 200)
    candidates: int = Field(4, ge=1)  # instructions proposed per step (OPRO: 8)
    demos: int = Field(5, ge=1)  # demonstrations APE's proposer sees (APE: 5)
    examples: int = Field(3, ge=0)  # exemplars in each OPRO meta-prompt (OPRO: 3)
    keep: int = Field(20, ge=1)  # best past instructions in the meta-prompt (OPRO: 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # proposer's sampling (OPRO: 1.0; 0: greedy)
    proposal_tokens: int = Field(48, ge=1)  # tokens the proposer writes per instruction
    answer_tokens: int = Field(3, ge=1)  # tokens the target answers with (greedy)
    max_instruction_chars: int = Field(300, ge=1)  # a longer proposal is cut at a word
    example_chars: int = Field(200, ge=1)  # each demonstration or exemplar is cut to this


INSTRUCTION_FILE = "instruction.json"


def answer_label(answer: str, words: Sequence[str]) -> int:
    """The class whose label word the answer names first, -1 when it names none.

    Case-insensitive; a label word counts where a word starts ("sports" names sport, "transport"
    does not); of two label words starting at one place, the longer.
    """
    low = answer.lower()
    best = (len(low) + 1, 0, -1)
    for c, w in enumerate(words):
        m = re.search(r"(?<!\w)" + re.escape(w.lower()), low)
        if m and (m.start(), -len(w)) < best[:2]:
            best = (m.start(), -len(w), c)
    return best[2]


@dataclass(frozen=True)
class InstructionPrompt:
    """An instruction before a verbaliser's template, and how many tokens the answer gets."""

    instruction: str
    verbalizer: Verbalizer
    answer_tokens: int = 3

    def prompt(self, text: str) -> str:
        head = f"{self.instruction}\n\n" if self.instruction else ""
        return head + self.verbalizer.prompt(text)

    def to_dict(self) -> dict[str, Any]:
        return {"instruction": self.instruction, "verbalizer": self.verbalizer.to_dict(),
                "answer_tokens": self.answer_tokens}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InstructionPrompt:
        return cls(str(d["instruction"]), Verbalizer.from_dict(d["verbalizer"]),
                   int(d["answer_tokens"]))  # fmt: skip


def generate_labels(handle: TextModel, p: InstructionPrompt, texts: Sequence[str]) -> torch.Tensor:
    """The class each text's generated answer names (N,), -1 where it names none (TEXT)."""
    require(handle, Access.TEXT, "classification by generation")
    answers = handle.generate([p.prompt(t) for t in texts], max_new_tokens=p.answer_tokens)
    words = p.verbalizer.label_words
    return torch.tensor([answer_label(a, words) for a in answers], dtype=torch.long)


def one_hot_scores(pred: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, C) scores of generated labels: 0 for the class named, -inf elsewhere (a row that
    names none is all -inf)."""
    s = torch.full((len(pred), classes), float("-inf"))
    named = pred >= 0
    s[named.nonzero().flatten(), pred[named]] = 0.0
    return s


@dataclass(kw_only=True)
class OproResult(TuneResult):
    """The best instruction found, every instruction scored, and the run's record.

    `history` holds the best score after each step (APE's, then each OPRO step).
    """

    best: InstructionPrompt
    start_score: float
    best_score: float
    instructions: list[dict[str, Any]] = field(default_factory=list)  # {step, instruction, score}
    evaluations: int = 0  # instructions scored (a resumed search's include the replayed ones)
    score_calls: int = 0  # instructions scored through the handle (a resumed search: this attempt)
    skipped: dict[str, int] = field(default_factory=lambda: {"unusable": 0, "duplicate": 0})
    stopped: str = "steps"

    def predict(self, handle: TextModel, texts: Sequence[str]) -> torch.Tensor:
        """The class each text's answer names under the best instruction, -1 for none (TEXT)."""
        return generate_labels(handle, self.best, texts)

    def scores(self, handle: TextModel, texts: Sequence[str]) -> torch.Tensor:
        """`one_hot_scores` of `predict` (N, C)."""
        return one_hot_scores(self.predict(handle, texts), len(self.best.verbalizer.label_words))

    def record(self) -> dict[str, Any]:
        return {**super().record(), "start_score": self.start_score, "best_score": self.best_score,
                "instruction": self.best.instruction, "evaluations": self.evaluations,
                "skipped": dict(self.skipped), "stopped": self.stopped,
                "instructions": self.instructions, "verbalizer": self.best.verbalizer.to_dict()}  # fmt: skip

    def _save_parts(self, folder: Path) -> None:
        write_json(folder / INSTRUCTION_FILE, {**self.best.to_dict(), "score": self.best_score,
                                               "history": self.instructions})  # fmt: skip


def load_instruction(folder: str | Path) -> InstructionPrompt:
    """The instruction, verbaliser and answer length saved by `OproResult.save`."""
    path = Path(folder) / INSTRUCTION_FILE
    try:
        return InstructionPrompt.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LfmError(f"cannot read an instruction from {path}: {e}") from None


def meta_prompt(
    tried: Sequence[Mapping[str, Any]], exemplars: Sequence[tuple[str, str]], keep: int
) -> str:
    """OPRO's meta-prompt: the best `keep` instructions with their scores in percent, sorted
    ascending (the best last), then the exemplars (prompt with `<INS>`, label word)."""
    top = sorted(tried, key=_rank, reverse=True)[:keep]
    texts = "\n\n".join(f"text:\n{t['instruction']}\nscore:\n{round(100 * t['score'])}"
                        for t in sorted(top, key=_rank))  # fmt: skip
    parts = [OPRO_HEAD, texts]
    if exemplars:
        shown = "\n\n".join(f"input:\n<INS>\n{x}\noutput:\n{y}" for x, y in exemplars)
        parts += [OPRO_EXEMPLARS, shown]
    return "\n\n".join([*parts, OPRO_TAIL])


def _rank(t: Mapping[str, Any]) -> tuple[float, int, int]:
    """Higher is better: the score, then the shorter instruction, then the one scored first."""
    return (t["score"], -len(t["instruction"]), -t["order"])


class _Search:
    """The instructions scored so far, the proposals skipped, and the best."""

    def __init__(self, evaluate: Callable[[str], float]):
        self.evaluate, self.tried, self.seen = evaluate, [], set()
        self.skipped = {"unusable": 0, "duplicate": 0}

    def offer(self, step: int, proposals: Sequence[str | None]) -> None:
        """Score each new usable proposal; skip and count the others."""
        for ins in proposals:
            if ins is None:
                self.skipped["unusable"] += 1
            elif key(ins) in self.seen:
                self.skipped["duplicate"] += 1
            else:
                self.seen.add(key(ins))
                score = self.evaluate(ins)
                self.tried.append({"step": step, "instruction": ins, "score": score,
                                   "order": len(self.tried)})  # fmt: skip

    @property
    def best(self) -> Mapping[str, Any]:
        return max(self.tried, key=_rank)


def _exemplars(
    data: TextClassification, verb: Verbalizer, n: int, chars: int, rng: random.Random
) -> list[tuple[str, str]]:
    idx = interleaved(data.labels, n, rng)
    return [(verb.prompt(" ".join(data.texts[i][:chars].split())),
             verb.label_words[int(data.labels[i])]) for i in idx]  # fmt: skip


# pragma: no mutate start (a registry example's inputs: test data, not the method's code)
def _example(level: Access, seed: int) -> Example:
    cfg = OproConfig(
        steps=1, candidates=2, demos=2, examples=1, proposal_tokens=8, example_chars=40
    )
    summary = lambda r: {"start": r.start_score, "best": r.best_score, "evaluations": r.evaluations,  # noqa: E731
                         "instruction": r.best.instruction, "skipped": r.skipped}  # fmt: skip
    proposer = tiny_news_lm(seed + 1)  # a local model: only the target is narrowed
    return Example((narrow(tiny_news_lm(seed), level), tiny_task()),
                   {"proposer": proposer, "seed": seed}, cfg, summary)  # fmt: skip


# pragma: no mutate end


def opro(
    handle: TextModel,
    data: TextClassification,
    cfg: OproConfig | None = None,
    *,
    proposer: Any = None,
    seed: int = 0,
    progress: bool = False,
    log: ReplayLog | None = None,
) -> OproResult:
    """Search an instruction for a TEXT handle with a proposer model: APE's step, then OPRO's.

    Args:
        handle: the target; only `generate` is called (local, narrowed or remote).
        data: the few-shot set with its verbaliser (template and label words): every example is
            scored, and the demonstrations and exemplars are drawn from it.
        cfg: search settings. A client `Budget` running out stops the search with its best so far.
        proposer: the model that writes the instructions: a handle with `generate` (a local
            model uses its chat template when its tokenizer has one), a model name or folder
            (loaded here), or None for `lfm.tuning.proposer.DEFAULT_PROPOSER`.
        seed: seeds the demonstrations, the exemplars and the proposer's sampling.
        progress: print one line per step (stderr): the best score and the instructions so far.
        log: log every scored instruction into a run directory (once per step), and replay
            those it already holds instead of calling the target: a resumed search ends as an
            uninterrupted one (the proposer, seeded, writes the same proposals again).
    """
    data_kind(data, "opro", {TextClassification: "a TextClassification"})
    verb = data.needs_verbalizer("opro")
    proposer = load_proposer(proposer)
    log = log or ReplayLog()

    def score(ins: str) -> float:
        pred = generate_labels(handle, InstructionPrompt(ins, verb, cfg.answer_tokens), data.texts)
        return float((pred == data.labels).float().mean())

    search = _Search(log.wrap(score, json_hash))
    search.offer(0, [cfg.instruction])
    start = search.tried[0]["score"]
    res = OproResult(method="opro", config=cfg, best=InstructionPrompt(cfg.instruction, verb,
                     cfg.answer_tokens), start_score=start, best_score=start)  # fmt: skip
    try:
        _steps(search, res, data, verb, cfg, proposer, seed, progress, log.flush)
    finally:
        log.flush()
    best = search.best
    res.best = InstructionPrompt(best["instruction"], verb, cfg.answer_tokens)
    res.best_score, res.evaluations, res.score_calls = best["score"], len(search.tried), log.calls
    res.instructions = [{k: t[k] for k in ("step", "instruction", "score")} for t in search.tried]
    res.skipped = dict(search.skipped)
    return res


opro = register(
    "tuning", "opro", shape=TUNER, branch="input engineering", access=Access.TEXT,
    config=OproConfig,
    paper="Yang et al. 2023, OPRO, arXiv 2309.03409; Zhou et al. 2022, APE, arXiv 2211.01910",
    example=_example, cli="lfm tuning opro", models=("causal-lm",),
)(opro)  # fmt: skip


def _steps(
    search: _Search, res: OproResult, data: TextClassification, verb: Verbalizer,
    cfg: OproConfig, proposer: Any, seed: int, progress: bool, flush: Callable[[], None],
) -> None:  # fmt: skip
    """APE's step (0), then `cfg.steps` OPRO steps; one log write and one line per step."""
    rng = random.Random(seed)
    for step in range(cfg.steps + 1):
        try:
            search.offer(step, _proposals(step, search, data, verb, cfg, proposer, rng))
        except BudgetExceeded:
            res.stopped = "api-budget"
            return
        flush()  # one write per step: a killed run loses at most this one
        res.history.append(search.best["score"])
        if progress:
            b = search.best
            print(f"[lfm] opro step {step}/{cfg.steps}: best score {b['score']:.4f} (start "
                  f"{res.start_score:.4f}), {len(search.tried)} instructions scored, "
                  f"{sum(search.skipped.values())} proposals skipped", file=sys.stderr, flush=True)  # fmt: skip


def _proposals(
    step: int, search: _Search, data: TextClassification, verb: Verbalizer, cfg: OproConfig,
    proposer: Any, rng: random.Random,
) -> list[str | None]:  # fmt: skip
    """This step's proposals: APE's from demonstrations (step 0), else OPRO's from the scores."""
    step_seed = rng.randrange(2**31)
    if step == 0:
        return ape_proposals(proposer, data.texts, data.labels, verb.label_words,
                             n=cfg.candidates, demos=cfg.demos, chars=cfg.example_chars,
                             tokens=cfg.proposal_tokens, temperature=cfg.temperature,
                             max_chars=cfg.max_instruction_chars, seed=step_seed)[0]  # fmt: skip
    shown = _exemplars(data, verb, cfg.examples, cfg.example_chars, rng)
    meta = meta_prompt(search.tried, shown, cfg.keep)
    raw = propose(proposer, meta, cfg.candidates, cfg.proposal_tokens, cfg.temperature, step_seed)
    return [parse(r, cfg.max_instruction_chars) for r in raw]
