"""What a tuner returns: what was learnt, in a form the next step can load, and its record.

Every tuner returns a `TuneResult`: the method, its resolved config, the history (loss or
objective per step) and metrics, and `save(folder)`, which writes `result.json` and the learnt
part beside it, atomically:

| result | learnt part | saved as |
|---|---|---|
| `TunedModel` (weight engineering, SFT, MeZO) | the tuned model | `adapter/` (PEFT's format) or `model/` (+ `head.safetensors`) |
| `BBTResult` (`lfm.tuning.bbt`) | a soft prompt and its projection seed | `prompt.safetensors` |
| `SearchResult` (`lfm.tuning.prompt_search`) | a prompt template | `template.json` |
| `OproResult` (`lfm.tuning.opro`) | an instruction and every one scored | `instruction.json` |
| `RetrievalResult` (`lfm.tuning.retrieval`) | a retrieval-augmented handle | `datastore.safetensors` / `documents.safetensors` |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from lfm.access import LocalModel
from lfm.config import Config
from lfm.core.io import atomic_path, save_tensors, write_json
from lfm.tuning.adapters import save_adapter
from lfm.tuning.classify import HeadClassifier, VerbalizerLM, encode, predict
from lfm.tuning.tasks import Verbalizer

RESULT_FILE = "result.json"
HEAD_FILE, HEAD_FORMAT = "head.safetensors", "lfm.tuning.head/1"  # an encoder's new head


@dataclass(kw_only=True)
class TuneResult:
    """The record every tuner returns; subclasses add what was learnt and how to save it."""

    method: str  # the registry name (`lora`, `bbt` ...)
    config: Config  # the resolved method config
    history: list[float] = field(default_factory=list)  # loss or objective per step
    metrics: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON-ready part of the result (what `result.json` holds)."""
        return {"method": self.method, "kind": type(self).__name__,
                "config": self.config.to_dict(), "history": self.history, "metrics": self.metrics}  # fmt: skip

    def save(self, folder: str | Path) -> Path:
        """Write `result.json` and the learnt part into `folder` (replaced as a whole, atomically)."""
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            self._save_parts(tmp)
            write_json(tmp / RESULT_FILE, self.record())
        return Path(folder)

    def _save_parts(self, folder: Path) -> None:
        """Write what was learnt (each kind of result its own)."""


@dataclass(kw_only=True)
class TunedModel(TuneResult):
    """A model whose weights (or adapter, or soft prompt inside PEFT) were trained.

    `model` is what was trained: a `VerbalizerLM` (label words of a causal LM), a
    `HeadClassifier` (a new head on an encoder) or the causal LM itself (SFT).
    """

    model: nn.Module
    tokenizer: Any
    verbalizer: Verbalizer | None = None
    evals: list[dict[str, float]] = field(default_factory=list)  # evaluations during training

    @property
    def backbone(self) -> nn.Module:
        """The language model or encoder (a `PeftModel` when an adapter was trained)."""
        m = self.model.lm if isinstance(self.model, VerbalizerLM) else self.model
        return m.encoder if isinstance(m, HeadClassifier) else m

    def handle(self, name: str | None = None) -> LocalModel:
        """A white-box handle over the tuned backbone, for the next step (generate, score ...)."""
        return LocalModel(self.backbone.eval(), self.tokenizer, name=name or f"tuned-{self.method}")

    def scores(self, texts: list[str], batch_size: int = 8) -> torch.Tensor:
        """Class logits (N, C) of raw texts (through the verbaliser's template, if any)."""
        prompts = [self.verbalizer.prompt(t) for t in texts] if self.verbalizer else list(texts)
        chunks = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
        return predict(self.model, [encode(self.tokenizer, c) for c in chunks])

    def record(self) -> dict[str, Any]:
        verb = self.verbalizer.to_dict() if self.verbalizer else None
        return {**super().record(), "verbalizer": verb, "evals": self.evals}

    def _save_parts(self, folder: Path) -> None:
        save_model(self.model, folder, self.tokenizer)


def save_model(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> Path:
    """Save a tuned classifier or LM: a PEFT adapter (checked non-empty) or the full weights.

    Writes `adapter/` (PEFT's format: `PeftModel.from_pretrained(base, folder / "adapter")`) or
    `model/` (with the tokenizer when given, so that `lfm.assets.load_model` reads it), and a new
    head's weights as `head.safetensors`.
    """
    folder = Path(folder)
    backbone = model.lm if isinstance(model, VerbalizerLM) else model
    backbone = backbone.encoder if isinstance(backbone, HeadClassifier) else backbone
    if isinstance(backbone, PeftModel):
        save_adapter(backbone, folder / "adapter")
    else:
        backbone.save_pretrained(str(folder / "model"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder / "model"))
    if isinstance(model, HeadClassifier):
        save_tensors(folder / HEAD_FILE, model.head.state_dict(), HEAD_FORMAT)
    return folder
