"""What interface a target exposes: an offline asset, a local model, an adapter, or a served URL.

Nothing is loaded: a local target is read from its files (a model on disk gives WEIGHTS), and a
URL is asked what it answers, with a handful of one-token requests:

- lfm's own server says its level (`GET /v1/models` → `lfm_access`, `lfm_top_k`);
- any OpenAI-compatible server is probed: a completion (TEXT), the prompt's log-probabilities
  with `echo` and `logprobs` (SCORES), how many alternatives `logprobs` returns (top-k), and the
  `/v1/embeddings` route (vectors of texts, which no method here reads as input embeddings).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lfm.access import Access
from lfm.core.io import model_files
from lfm.errors import LfmError, did_you_mean

PROBE_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class Interface:
    """What a target gives.

    Args:
        target: as given (an asset name, a path or a URL).
        kind: `asset`, `model folder`, `weights file`, `adapter`, `lfm server` or `openai server`.
        access: the highest level found.
        model: `causal-lm`, `encoder`, `vision`, or `unknown`.
        facts: what the probe saw, one short entry each (`top_k: 5`, `base: <path>` ...).
    """

    target: str
    kind: str
    access: Access
    model: str = "unknown"
    facts: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "kind": self.kind, "access": self.access.name,
            "model": self.model, "facts": self.facts,
        }  # fmt: skip


def probe(target: str, api_key: str | None = None, timeout: float = 30.0) -> Interface:
    """Find out what `target` exposes (see the module docstring); one-line `LfmError` if nothing."""
    if target.startswith(("http://", "https://")):
        return _probe_url(target.rstrip("/"), api_key, timeout)
    return _probe_local(target)


# ------------------------------------------------------------------------------------------
# Local targets: read from files, never loaded.


def _probe_local(target: str) -> Interface:
    from lfm.assets.models import MODELS

    if target in MODELS:
        info = MODELS[target]
        return Interface(target, "asset", Access.WEIGHTS, info.kind, {"package": info.package})
    path = Path(target)
    if not path.exists():
        names = ", ".join(sorted(MODELS))
        raise LfmError(
            f"{target} is neither an asset ({names}), a path nor a URL{did_you_mean(target, MODELS)}"
        )
    if path.is_dir() and (path / "adapter_config.json").exists():
        cfg = _read_json(path / "adapter_config.json")
        facts = {"adapter": cfg.get("peft_type", "?"), "base": cfg.get("base_model_name_or_path")}
        return Interface(target, "adapter", Access.WEIGHTS, _task_model(cfg), facts)
    if path.is_dir() and (path / "adapter" / "adapter_config.json").exists():
        return _probe_local(str(path / "adapter"))
    if path.is_dir() and (path / "config.json").exists():
        cfg = _read_json(path / "config.json")
        facts = {"model_type": cfg.get("model_type"), "layers": cfg.get("num_hidden_layers"),
                 "params": count_params(path)}  # fmt: skip
        return Interface(target, "model folder", Access.WEIGHTS, _kind(cfg), facts)
    if path.is_file() and path.suffix in (".safetensors", ".gguf", ".pth", ".pt"):
        facts = {"file": path.name, "params": count_params(path)}
        return Interface(target, "weights file", Access.WEIGHTS, "unknown", facts)
    raise LfmError(f"{target}: no config.json, adapter_config.json or weights file there")


def count_params(path: Path) -> int | None:
    """Floating-point parameters in a safetensors file or folder, read from the headers only
    (None for other formats, or when a header cannot be read)."""
    files = model_files(path) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    total = 0
    for f in files:
        try:
            with f.open("rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size)) if 0 < size < 2**27 else None
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict):
            return None
        for name, info in header.items():
            if name != "__metadata__" and str(info.get("dtype", "")).startswith(("F", "BF")):
                total += math.prod(info.get("shape") or [1])
    return total


def asset_params(name: str) -> int | None:
    """Floating-point parameters of an offline asset, counted from safetensors headers: its own
    folder, or its fp32 conversion in the cache (a GGUF model once loaded); None otherwise."""
    from lfm.assets.models import MODELS, gguf_cache_path

    try:
        path = MODELS[name].locate()
        if path.suffix == ".gguf":
            path = gguf_cache_path(path)
    except (LfmError, OSError, KeyError):
        return None
    return count_params(path) if path.exists() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LfmError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _kind(cfg: dict[str, Any]) -> str:
    archs = " ".join(cfg.get("architectures") or [])
    if "CausalLM" in archs or "LMHead" in archs:
        return "causal-lm"
    if cfg.get("model_type") in ("bert", "roberta", "distilbert", "deberta-v2"):
        return "encoder"
    return "unknown"


def _task_model(cfg: dict[str, Any]) -> str:
    return "causal-lm" if cfg.get("task_type") == "CAUSAL_LM" else "unknown"


# ------------------------------------------------------------------------------------------
# Served targets.


def _probe_url(url: str, api_key: str | None, timeout: float) -> Interface:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as http:
        try:
            res = http.get("/v1/models")
        except httpx.HTTPError as e:
            raise LfmError(f"cannot reach {url}: {type(e).__name__}") from None
        if res.status_code in (401, 403):
            raise LfmError(f"{url} refused the key (HTTP {res.status_code}); pass --api-key")
        cards = _cards(res)
        if cards and "lfm_access" in cards[0]:
            card = cards[0]
            facts = {"model": card.get("id"), "vocab_size": card.get("lfm_vocab_size")}
            if card.get("lfm_top_k"):
                facts["top_k"] = card["lfm_top_k"]
            return Interface(
                url, "lfm server", Access.parse(card["lfm_access"]), "causal-lm", facts
            )
        return _probe_openai(http, url, cards[0]["id"] if cards else None)


def _cards(res: Any) -> list[dict[str, Any]]:
    if res.status_code != 200:
        return []
    try:
        data = res.json().get("data") or []
    except ValueError:
        return []
    return [c for c in data if isinstance(c, dict) and "id" in c]


def _probe_openai(http: Any, url: str, model: str | None) -> Interface:
    """An OpenAI-compatible server: text, then prompt log-probabilities and their width."""
    base = {"model": model, "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0}
    text = _post(http, "/v1/completions", base)
    if text is None:
        raise LfmError(f"{url} answers no /v1/completions request: nothing to learn from")
    facts: dict[str, Any] = {"model": model}
    scored = _post(http, "/v1/completions", {**base, "echo": True, "logprobs": 20})
    lp = _logprobs(scored)
    level = Access.TEXT
    if lp is not None and any(x is not None for x in lp.get("token_logprobs", [])):
        level = Access.SCORES
        tops = [t for t in lp.get("top_logprobs") or [] if t]
        facts["prompt_logprobs"] = True
        facts["top_k"] = max((len(t) for t in tops), default=0)
    vectors = _post(http, "/v1/embeddings", {"model": model, "input": "x"})
    facts["embeddings_route"] = vectors is not None
    return Interface(url, "openai server", level, "causal-lm", facts)


def _post(http: Any, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    import httpx

    try:
        res = http.post(path, json={k: v for k, v in body.items() if v is not None})
    except httpx.HTTPError:
        return None
    if res.status_code != 200:
        return None
    try:
        out = res.json()
    except ValueError:
        return None
    return out if isinstance(out, dict) else None


def _logprobs(out: dict[str, Any] | None) -> dict[str, Any] | None:
    if not out or not out.get("choices"):
        return None
    lp = out["choices"][0].get("logprobs")
    return lp if isinstance(lp, dict) else None
