"""Memory editing of SmolLM2 through black-box handles: IKE's demonstrations and the new fact go
in the context.

    .venv/bin/python examples/edit_ike.py

No weight changes and none is reachable: the handles are narrowed to TEXT and SCORES, the patch
is the request itself (saved as JSON), and applying it wraps a handle. Every query is preceded by
32 copy, update and retain demonstrations retrieved from the fact set with `minilm-l6`, then the
new fact (docs/edit.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lfm.access import narrow
from lfm.assets import load_model
from lfm.edit import MemoryPatch, Request, ike


def main() -> None:
    torch.set_num_threads(2)
    model = load_model("smollm2-135m")
    text, scores = narrow(model, "text"), narrow(model, "scores")
    req = Request("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    check = [req.prompt, "The Louvre is located in the city of"]

    patch = ike(text, req)  # a MemoryPatch: the request and the config
    path = patch.save(Path(tempfile.mkdtemp()) / "eiffel-rome.json")
    patch = MemoryPatch.load(path)
    edited = patch.apply(text)  # wraps the handle, still TEXT
    print("context of the first query:", repr(edited.context(check[0])))
    print("before:", text.generate(check, max_new_tokens=6))
    print("after: ", edited.generate(check, max_new_tokens=6))
    for name, handle in (("before", scores), ("after", patch.apply(scores))):
        logp = handle.score([req.prompt] * 2, [" Rome", " Paris"])
        print(f"{name}: log P(' Rome') {logp[0]:.2f}, log P(' Paris') {logp[1]:.2f}")
    print("saved", path)


if __name__ == "__main__":
    main()
