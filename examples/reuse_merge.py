"""Merge three tiny fine-tuned Llama models with TIES, streamed from sharded safetensors.

    .venv/bin/python examples/reuse_merge.py

Builds the models in code (`lfm.core.tiny`, no downloads), saves them as sharded Hugging Face
folders, merges them with `lfm.reuse.merge_models`, loads the result with transformers and checks
it against the same method run by name in memory (`lfm.registry.run("reuse/ties", ...)`).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lfm.core.tiny import tiny_lm
from lfm.registry import run
from lfm.reuse import merge_models


def finetuned(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of `base` with small seeded changes (a stand-in for a fine-tune)."""
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, _ = tiny_lm("llama", seed=0)
        base.save_pretrained(root / "base", max_shard_size="50KB")
        tuned = [finetuned(base, i) for i in (1, 2, 3)]
        for i, m in enumerate(tuned):
            m.save_pretrained(root / f"ft{i}", max_shard_size="50KB")
        cfg = {"density": 0.2, "scale": 1.0}
        out = merge_models(
            "ties", [root / f"ft{i}" for i in range(3)], root / "merged",
            base=root / "base", cfg=cfg, max_shard_size="60KB",
        )  # fmt: skip
        merged = AutoModelForCausalLM.from_pretrained(out)
        ref = run("reuse/ties", tuned, base=base, cfg=cfg)  # the modules, in memory
        diff = max((merged.state_dict()[k] - v).abs().max().item() for k, v in ref.items())
        print(f"wrote {sorted(p.name for p in out.iterdir())}")
        print(f"max |streamed - in-memory| = {diff:.2e}")


if __name__ == "__main__":
    main()
