"""Edit one fact in SmolLM2 with ROME, check it, save the patch, and revert.

    .venv/bin/python examples/edit_rome.py

The first run builds the key statistics C = E[k kᵀ] at the edited layer from BBC News articles
(about a minute on two CPU cores) and caches them; later runs read the cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lfm.assets import load_model
from lfm.edit import Patch, Request, RomeConfig, rome


def top(handle, prompt: str) -> str:
    return handle.generate([prompt], max_new_tokens=6)[0]


def main() -> None:
    torch.set_num_threads(2)
    handle = load_model("smollm2-135m")
    req = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    check = ["The Eiffel Tower is located in the city of", "Berlin is the capital of"]
    print("before:", [top(handle, p) for p in check])

    patch = rome(handle, req, RomeConfig())  # computes a patch; the model is unchanged
    undo = patch.apply(handle.model)  # the one call that writes weights
    print("after: ", [top(handle, p) for p in check])

    path = patch.save(Path(tempfile.mkdtemp()) / "eiffel-rome.safetensors")
    print("saved", path, "edits", Patch.load(path).modules)
    undo.revert(handle.model)  # bit-exact
    print("reverted:", [top(handle, p) for p in check])


if __name__ == "__main__":
    main()
