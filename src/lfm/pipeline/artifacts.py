"""What pipeline steps hand each other: artifacts, each a file or folder of a known kind.

| kind | what | on disk |
|---|---|---|
| `lm` | a language model or encoder | an asset name, or a Hugging Face folder |
| `tuned` | what a tuner learnt (an adapter, weights, a prompt) | a `TuneResult` folder |
| `classifier` | a small image or feature classifier | `classifier.json` + `model.safetensors` |
| `patch` | an edit patch | a patch file |
| `stats` | statistics of a model on data (Gram, Fisher) | a statistics file |
| `learner` | a meta-trained model and the task family it learnt | `learner.json` + `model.safetensors` |
| `url` | a served model | its URL (the level probed) |
| `metrics` | an evaluation | `metrics.json` |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lfm.access import Access, LocalClassifier
from lfm.core.io import load_tensors, save_tensors, write_json
from lfm.core.runs import path_sha256
from lfm.core.tiny import TinyCNN, TinyMLP
from lfm.errors import LfmError

CLASSIFIER_FORMAT = "lfm.classifier/1"
# Classifier architectures a pipeline can build by name: name -> (class, its option names).
ARCHS: dict[str, type[nn.Module]] = {"tiny_cnn": TinyCNN, "tiny_mlp": TinyMLP}


@dataclass(frozen=True)
class Artifact:
    kind: str
    path: str  # a file or folder, an asset name or a URL
    access: Access = Access.WEIGHTS

    def digest(self) -> str:
        """What identifies the artifact's content: its files' hash, else its name."""
        p = Path(self.path)
        return path_sha256(p) if self.kind not in ("url",) and p.exists() else self.path


def build_classifier(arch: dict[str, Any]) -> nn.Module:
    """A classifier from `{arch: tiny_cnn, n_out: 10, width: 16}` (options of its class)."""
    options = {k: v for k, v in arch.items() if k != "arch"}
    name = arch.get("arch")
    if name not in ARCHS:
        raise LfmError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    try:
        return ARCHS[name](**options)
    except TypeError as e:
        raise LfmError(f"architecture {name}: {e}") from None


def save_classifier(folder: Path, model: nn.Module, arch: dict[str, Any]) -> Path:
    """Write a classifier artifact (the caller writes into a temporary folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "classifier.json", arch)
    save_tensors(folder / "model.safetensors", dict(model.state_dict()), CLASSIFIER_FORMAT)
    return folder


def load_classifier(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A classifier artifact's module (eval mode) and its architecture."""
    folder = Path(folder)
    try:
        arch = json.loads((folder / "classifier.json").read_text())
    except (OSError, ValueError) as e:
        raise LfmError(f"{folder} is not a classifier ({e})") from None
    model = build_classifier(arch)
    tensors, _ = load_tensors(folder / "model.safetensors", CLASSIFIER_FORMAT)
    model.load_state_dict(tensors)
    return model.eval(), arch


def classifier_handle(artifact: Artifact) -> LocalClassifier:
    model, _ = load_classifier(artifact.path)
    return LocalClassifier(model, name=Path(artifact.path).name)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
