"""`seed` makes a tuning run reproducible: the adapter's initial values, the data order and dropout
are all drawn from it, whatever the global random state was before the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lfm.tuning import recipes


def _tuned(method: str, model: str, root: Path, seed: int, noise: int):
    torch.manual_seed(noise)  # another global random state before each run
    torch.rand(noise + 1)
    out = recipes.classify(method, model, shots=1, steps=3, eval_per_class=1, max_chars=60,
                           lr=1e-2, seed=seed, threads=1, root=root)  # fmt: skip
    assert out is not None
    tuned = Path(out["run"]) / "tuned"
    losses = json.loads((tuned / "result.json").read_text())["history"]
    return load_file(str(tuned / "adapter" / "adapter_model.safetensors")), losses


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_two_runs_with_one_seed_are_identical_and_another_seed_differs(bbc_lm, tmp_path, method):
    w0, losses0 = _tuned(method, bbc_lm, tmp_path, seed=0, noise=1)
    w1, losses1 = _tuned(method, bbc_lm, tmp_path, seed=0, noise=2)
    assert losses0 == losses1 and w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    w2, losses2 = _tuned(method, bbc_lm, tmp_path, seed=1, noise=1)
    assert losses2 != losses0 and any(not torch.equal(w0[k], w2[k]) for k in w0)
