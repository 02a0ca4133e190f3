"""Classifying again with what a tuning run saved, found from the run directory alone.

    clf = load_classifier("runs/20261203-153410-tune-lora")   # the model the run used
    clf.scores(["A lovely film."])                              # (N, C) class scores
    clf.classes[int(clf.scores(texts)[0].argmax())]

| run | saved (`<run>/…`) | scores |
|---|---|---|
| `lfm tuning bbt` | `result/prompt.safetensors` | label-word logits after the soft prompt (EMBEDDINGS) |
| `lfm tuning prompt-search` | `result/template.json` | label-word log-probabilities after the template (SCORES) |
| `lfm tuning opro` | `result/instruction.json` | 0 for the label word the generated answer names first, −inf for the others; all −inf when it names none (TEXT) |
| `lfm tuning train`, a causal LM | `tuned/adapter/` or `tuned/model/`, label words in `result.json` | the label words' next-token logits (`VerbalizerLM`) |
| `lfm tuning train`, an encoder | the same and `tuned/head.safetensors` | the new head's logits (`HeadClassifier`) |

A trained classifier scores in the batches the run's evaluation used for its held-out set
(`lfm.tuning.trainer.class_logits`), so the run's held-out examples give the accuracy it
reported. The black-box ones score through the access their method needs: a model name is loaded
and narrowed to it, a handle (a served model) is used as it is. The class names are those the run
recorded (`classes` among its metrics), else the label words, else the head's indices.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lfm.access import Access, LocalModel, narrow
from lfm.assets import load_model
from lfm.core.io import load_tensors
from lfm.core.runs import read_manifest
from lfm.errors import ConfigError
from lfm.tuning.adapters import keep_prefix_in_generate
from lfm.tuning.bbt import PROMPT_FILE, class_scores_bbt, load_prompt
from lfm.tuning.classify import HeadClassifier, VerbalizerLM, label_token_ids
from lfm.tuning.opro import INSTRUCTION_FILE, generate_labels, load_instruction, one_hot_scores
from lfm.tuning.prompt_search import TEMPLATE_FILE, load_template
from lfm.tuning.results import HEAD_FILE, HEAD_FORMAT, RESULT_FILE
from lfm.tuning.tasks import TextClassification, Verbalizer, class_scores
from lfm.tuning.trainer import class_logits

CHUNK = 16  # texts per black-box call: a local handle's own batch, so its batches stay the same
Scorer = Callable[[Sequence[str], "str | None"], torch.Tensor]


@dataclass(frozen=True)
class SavedClassifier:
    """A classifier rebuilt from a run: the method, its class names and its scores."""

    method: str  # the registry name of the method the run used (`lora`, `bbt` ...)
    classes: tuple[str, ...]
    access: Access  # what it needs of the model
    score: Scorer
    words: tuple[str, ...] = ()  # the label words, when it scores through them

    def index(self, label: str) -> int | None:
        """The class a label names (a class name, else a label word), or None."""
        for names in (self.classes, self.words):
            if label in names:
                return names.index(label)
        return None

    def scores(self, texts: Sequence[str], desc: str | None = None) -> torch.Tensor:
        """Class scores (N, C) of raw texts, in their order (`desc`: a progress bar)."""
        return self.score(list(texts), desc)


def black_box_handle(model: str | Any, level: Access) -> Any:
    """A handle at `level`: a model name is loaded and narrowed; a handle is used as it is."""
    if isinstance(model, str | Path):
        return narrow(load_model(str(model), kind="causal-lm"), level)
    return model


def _result_folder(path: Path) -> Path:
    return path / "result" if (path / "result").is_dir() else path


def saved_scores(folder: str | Path, model: str | Any, texts: Sequence[str]) -> torch.Tensor:
    """Label-word scores (N, C) of `texts` under a saved black-box result: a BBT soft prompt
    (`prompt.safetensors`, EMBEDDINGS), a prompt-search template (`template.json`, SCORES) or an
    OPRO instruction (`instruction.json`, TEXT: `lfm.tuning.opro.one_hot_scores`).

    `folder` is the result folder (`<run>/result`) or its run directory; `model` a model name
    (loaded and narrowed) or a handle. `scores.argmax(-1)` indexes the saved label words.
    """
    return _black_box_scorer(_result_folder(Path(folder)), model)[0](list(texts), None)


def _black_box_scorer(path: Path, model: str | Any) -> tuple[Scorer, Access, Verbalizer]:
    """The scores of a saved prompt or template, chunked with a progress bar; its access."""
    if (path / PROMPT_FILE).exists():
        prompt, meta = load_prompt(path)
        verb = Verbalizer.from_dict(meta["verbalizer"])
        level = Access.EMBEDDINGS
        handle = black_box_handle(model, level)
        one = lambda ts: class_scores_bbt(handle, prompt, ts, verb)  # noqa: E731
    elif (path / TEMPLATE_FILE).exists():
        verb, level = load_template(path), Access.SCORES
        handle = black_box_handle(model, level)
        one = lambda ts: class_scores(handle, ts, verb)  # noqa: E731
    elif (path / INSTRUCTION_FILE).exists():
        p, level = load_instruction(path), Access.TEXT
        verb, handle = p.verbalizer, black_box_handle(model, level)
        one = lambda ts: one_hot_scores(generate_labels(handle, p, ts), len(verb.label_words))  # noqa: E731
    else:
        raise ConfigError(
            f"{path} holds no saved prompt ({PROMPT_FILE}, {TEMPLATE_FILE} or {INSTRUCTION_FILE})"
        )

    def score(texts: Sequence[str], desc: str | None) -> torch.Tensor:
        chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
        bar = tqdm(chunks, desc=desc, disable=desc is None, leave=False, dynamic_ncols=True)
        return torch.cat([one(c) for c in bar]) if chunks else torch.zeros(0, len(verb.label_words))

    return score, level, verb


def saved_access(run: str | Path) -> Access:
    """The access a run's saved classifier needs of the model (WEIGHTS for a trained one)."""
    path = Path(run)
    method = _method(path, read_manifest(path))
    folder = _result_folder(path)
    if (folder / PROMPT_FILE).exists():
        return Access.EMBEDDINGS
    if (folder / TEMPLATE_FILE).exists():
        return Access.SCORES
    if (folder / INSTRUCTION_FILE).exists():
        return Access.TEXT
    _trained_record(path, method)  # refuses a run with nothing to classify with
    return Access.WEIGHTS


def _method(path: Path, manifest: dict[str, Any]) -> str:
    cfg = manifest.get("config") or {}
    return str(cfg.get("method") or manifest.get("name") or path.name)


def _trained_record(path: Path, method: str) -> dict[str, Any]:
    """The `result.json` of a `tuning train` run, or a one-line refusal naming what it holds."""
    file = path / "tuned" / RESULT_FILE
    if not file.exists():
        raise ConfigError(
            f"{path} saved nothing to classify with ({method}): give a run of `lfm tuning "
            "train`, `bbt`, `prompt-search` or `opro`"
        )
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {file}: {e}") from None
    if not record.get("verbalizer") and not (path / "tuned" / HEAD_FILE).exists():
        raise ConfigError(
            f"{path} holds an instruction-tuned model ({method}) with no label words or "
            "head to classify with; classify with a `tuning train` run"
        )
    return dict(record)


def load_classifier(run: str | Path, model: str | Any | None = None) -> SavedClassifier:
    """The classifier a run saved, over `model` (None: the model the run used).

    Args:
        run: a run directory of `lfm tuning train`, `bbt`, `prompt-search` or `opro`.
        model: a model name or folder (for a trained adapter, its base), or for a black-box run
            a handle such as a served model; None reads the run's `config.model`.
    """
    path = Path(run)
    manifest = read_manifest(path)
    method, config = _method(path, manifest), manifest.get("config") or {}
    recorded = (manifest.get("metrics") or {}).get("classes")
    chosen = config.get("model") if model is None else model
    folder = _result_folder(path)
    black_box = any((folder / f).exists() for f in (PROMPT_FILE, TEMPLATE_FILE, INSTRUCTION_FILE))
    record = None if black_box else _trained_record(path, method)  # refuses an unusable run
    if chosen is None:
        raise ConfigError(f"{path}/manifest.json names no model; give one (--model)")
    if record is None:
        score, level, verb = _black_box_scorer(folder, chosen)
        words = verb.label_words
        return SavedClassifier(method, _classes(recorded, words), level, score, words)
    if not isinstance(chosen, str | Path):
        raise ConfigError(
            f"{path} holds a model trained through its weights ({method}); classify with it "
            "locally (--model), not through a served model"
        )
    return _trained(path / "tuned", record, str(chosen), config, method, recorded)


def _classes(recorded: Any, fallback: Sequence[str]) -> tuple[str, ...]:
    if isinstance(recorded, list) and len(recorded) == len(fallback):
        return tuple(str(c) for c in recorded)
    return tuple(fallback)


def _backbone(folder: Path, model: str) -> tuple[torch.nn.Module, Any]:
    """The tuned backbone and its tokenizer: the base model under the saved adapter, or the
    saved weights."""
    if (folder / "adapter").is_dir():
        from peft import PeftModel

        base = load_model(model)
        if not isinstance(base, LocalModel):
            raise ConfigError(f"{model} is not a language model or text encoder")
        try:
            tuned = PeftModel.from_pretrained(base.model, str(folder / "adapter"))
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(
                f"the adapter in {folder} does not fit {model} ({type(e).__name__}); give the "
                "base model it was trained on (--model)"
            ) from None
        return keep_prefix_in_generate(tuned).eval(), base.tokenizer
    saved = load_model(str(folder / "model"))
    if not isinstance(saved, LocalModel):
        raise ConfigError(f"{folder / 'model'} is not a language model or text encoder")
    return saved.model.eval(), saved.tokenizer


def _trained(
    folder: Path, record: dict[str, Any], model: str, config: dict[str, Any], method: str,
    recorded: Any,
) -> SavedClassifier:  # fmt: skip
    """Label words of a causal LM (`VerbalizerLM`) or an encoder's new head, as trained."""
    backbone, tokenizer = _backbone(folder, model)
    if record.get("verbalizer"):
        verb = Verbalizer.from_dict(record["verbalizer"])
        clf: torch.nn.Module = VerbalizerLM(backbone, label_token_ids(tokenizer, verb.label_words))
        classes, cut = _classes(recorded, verb.label_words), None
    else:
        head, _ = load_tensors(folder / HEAD_FILE, HEAD_FORMAT)
        n = int(head["weight"].shape[0])
        clf = HeadClassifier(backbone, n)
        clf.head.load_state_dict(head)
        verb, cut = None, int(config.get("max_chars") or 0) or None
        classes = _classes(recorded, [str(i) for i in range(n)])
    clf.eval()

    def score(texts: Sequence[str], desc: str | None) -> torch.Tensor:
        cut_texts = [t[:cut] for t in texts] if cut else list(texts)
        data = TextClassification(cut_texts, torch.zeros(len(texts), dtype=torch.long), verb,
                                  n_classes=len(classes))  # fmt: skip
        return class_logits(clf, tokenizer, data, desc)

    return SavedClassifier(method, classes, Access.WEIGHTS, score, verb.label_words if verb else ())
