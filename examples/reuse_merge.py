"""Merge three tiny fine-tuned Llama models with TIES, streamed from sharded safetensors.

    .venv/bin/python examples/reuse_merge.py

Builds the models in code (no downloads), saves them as sharded Hugging Face folders, merges them
with `lfm.reuse.merge_models`, loads the result with transformers and checks it against the
in-memory merge.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lfm.reuse import merge_models, merge_state_dicts


def tiny_llama(seed: int, base: torch.nn.Module | None = None) -> torch.nn.Module:
    """A 2-layer Llama; with `base`, a copy of it with small seeded changes (a 'fine-tune')."""
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if base is not None:
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return model


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = tiny_llama(0)
        base.save_pretrained(root / "base", max_shard_size="50KB")
        tuned = [tiny_llama(i, base) for i in (1, 2, 3)]
        for i, m in enumerate(tuned):
            m.save_pretrained(root / f"ft{i}", max_shard_size="50KB")
        cfg = {"density": 0.2, "scale": 1.0}
        out = merge_models(
            "ties", [root / f"ft{i}" for i in range(3)], root / "merged",
            base=root / "base", cfg=cfg, max_shard_size="60KB",
        )  # fmt: skip
        merged = AutoModelForCausalLM.from_pretrained(out)
        ref = merge_state_dicts("ties", base.state_dict(), [m.state_dict() for m in tuned], cfg)
        diff = max((merged.state_dict()[k] - v).abs().max().item() for k, v in ref.items())
        print(f"wrote {sorted(p.name for p in out.iterdir())}")
        print(f"max |streamed - in-memory| = {diff:.2e}")


if __name__ == "__main__":
    main()
