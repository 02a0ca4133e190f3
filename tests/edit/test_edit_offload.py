"""Editing a model whose other blocks stay on disk (`load_offloaded`, `lfm edit apply --offload`):
the same patch as the model loaded whole, the blocks on disk rerun in the backward pass, and one
line for a method or module that needs weights left on disk."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lfm.assets import load_model, load_offloaded
from lfm.cli import app
from lfm.edit import common, rome
from lfm.edit.memit import AlphaEditConfig, alphaedit
from lfm.edit.patch import linear_weight
from lfm.edit.rome import RomeConfig
from lfm.errors import AssetError, LfmError

REQ = common.SMOKE_REQUEST
CFG = RomeConfig(layer=0, v_steps=6, n_prefixes=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("smoke")
    lm = common.smoke_model("llama", 0)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def whole(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def offloaded(folder, tmp_path_factory):
    return load_offloaded(folder, [0], tmp_path_factory.mktemp("offload"))


def test_only_the_kept_block_is_in_memory(offloaded):
    on_disk = {n for n, p in offloaded.model.named_parameters() if p.is_meta}
    assert on_disk and all(n.startswith("model.layers.1.") for n in on_disk)
    assert not any(p.is_meta for p in offloaded.model.model.layers[0].parameters())
    assert offloaded.model.hf_device_map["model.layers.1"] == "disk"


def test_rome_through_a_block_on_disk_gives_the_whole_models_patch(whole, offloaded):
    """The edit at block 0 backpropagates through block 1, which waits on disk."""
    cov = common.smoke_cov(whole.model, whole.tokenizer, 0)
    a, b = rome(whole, REQ, CFG, cov=cov), rome(offloaded, REQ, CFG, cov=cov)
    assert a.base == b.base
    assert torch.equal(a.deltas[0].u, b.deltas[0].u) and torch.equal(a.deltas[0].v, b.deltas[0].v)
    assert a.deltas[0].matrix().abs().max() > 0


def test_alphaedit_on_an_offloaded_model_gives_the_whole_models_patch(whole, offloaded):
    cfg = AlphaEditConfig(layers=(0,), v_steps=6, n_prefixes=3, null_threshold=1e9)
    cov = {0: common.smoke_cov(whole.model, whole.tokenizer, 0)}
    a, b = alphaedit(whole, REQ, cfg, cov=cov), alphaedit(offloaded, REQ, cfg, cov=cov)
    assert torch.equal(a.deltas[0].matrix(), b.deltas[0].matrix())


def test_a_block_on_disk_runs_again_in_the_backward_pass(offloaded):
    """Its weights are not held between the two passes: the forward pass is recomputed (as a
    checkpoint) when the gradient reaches it, and only under autograd."""
    runs = []
    mlp = offloaded.model.model.layers[1].mlp
    # a pre-hook: the recomputation stops once the last tensor it must give back is made
    handle = mlp.register_forward_pre_hook(lambda *_: runs.append(torch.is_grad_enabled()))
    try:
        ids = offloaded.tokenizer(["The city of the Eiffel Tower"], return_tensors="pt").input_ids
        emb = offloaded.model.model.embed_tokens(ids).detach().requires_grad_(True)
        out = offloaded.model(inputs_embeds=emb).logits[0, -1].sum()
        assert len(runs) == 1
        out.backward()
        assert len(runs) == 2 and emb.grad is not None and emb.grad.abs().sum() > 0
        with torch.no_grad():
            offloaded.model(input_ids=ids)
        assert len(runs) == 3
    finally:
        handle.remove()


def test_a_block_on_disk_keeps_no_weight_after_the_backward_pass(offloaded):
    """The recomputation runs the whole block: stopped early, right after the down projection
    (the last output the gradient needs), it left that weight in memory, one per block on disk."""
    block = offloaded.model.model.layers[1]
    ids = offloaded.tokenizer(["The city of the Eiffel Tower"], return_tensors="pt").input_ids
    frozen = [p for p in offloaded.model.parameters() if p.requires_grad]
    for p in frozen:  # as an edit runs it: the weights do not take gradients
        p.requires_grad_(False)
    try:
        emb = offloaded.model.model.embed_tokens(ids).detach().requires_grad_(True)
        offloaded.model(inputs_embeds=emb, use_cache=False).logits[0, -1].sum().backward()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    held = [n for n, p in block.named_parameters() if not p.is_meta]
    assert held == [], held


def test_reading_a_weight_left_on_disk_is_one_line(offloaded):
    with pytest.raises(LfmError, match=r"^model\.layers\.1\.mlp\.down_proj is offloaded") as e:
        linear_weight(offloaded.model, "model.layers.1.mlp.down_proj")
    assert "\n" not in str(e.value)
    assert linear_weight(offloaded.model, "model.layers.0.mlp.down_proj").shape == (32, 64)


def test_keeping_a_block_the_model_lacks_is_refused(folder, tmp_path):
    with pytest.raises(AssetError, match=r"has blocks 0-1; cannot keep block 2"):
        load_offloaded(folder, [2], tmp_path)


def test_the_cli_offload_writes_the_same_patch(folder, tmp_path):
    cfg = _cfg(tmp_path)
    base = ["edit", "apply", "--model", str(folder), "-m", "rome", "--prompt", REQ.prompt,
            "--subject", REQ.subject, "--target", REQ.target, "--config", str(cfg),
            "--root", str(tmp_path / "runs"), "--threads", "1"]  # fmt: skip
    runner = CliRunner()
    plain = runner.invoke(app, [*base, "-o", str(tmp_path / "a.safetensors")])
    assert plain.exit_code == 0, plain.output
    off = runner.invoke(
        app, [*base, "-o", str(tmp_path / "b.safetensors"), "--offload", str(tmp_path / "o")]
    )
    assert off.exit_code == 0, off.output
    assert "blocks 0 in memory, the others on disk" in off.output
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_offload_refuses_a_method_that_needs_the_whole_model(folder, tmp_path):
    out = CliRunner().invoke(
        app,
        ["edit", "apply", "--model", str(folder), "-m", "ft_l", "--prompt", REQ.prompt,
         "--subject", REQ.subject, "--target", REQ.target, "-o", str(tmp_path / "p.safetensors"),
         "--offload", str(tmp_path / "o"), "--root", str(tmp_path / "runs")],
    )  # fmt: skip
    assert out.exit_code == 2
    assert out.output.startswith("error: --offload is for the methods that edit a few blocks")
    assert "alphaedit, memit, rome" in out.output and "ft_l needs the model in memory" in out.output


def test_eval_offload_gives_the_completions_and_scores_of_the_whole_model(folder, tmp_path):
    runner = CliRunner()
    patch = tmp_path / "p.safetensors"
    made = runner.invoke(
        app,
        ["edit", "apply", "--model", str(folder), "-m", "rome", "--prompt", REQ.prompt,
         "--subject", REQ.subject, "--target", REQ.target, "--config", str(_cfg(tmp_path)),
         "-o", str(patch), "--root", str(tmp_path / "runs"), "--threads", "1"],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    base = ["edit", "eval", str(patch), "--model", str(folder), "--prompt", "The Eiffel Tower",
            "--max-new-tokens", "4", "--threads", "1"]  # fmt: skip
    plain = runner.invoke(app, base)
    off = runner.invoke(app, [*base, "--offload", str(tmp_path / "o")])
    assert plain.exit_code == 0 and off.exit_code == 0, off.output
    assert "blocks 0 in memory, the others on disk" in off.output

    def answers(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith(("{", "log P"))]

    assert len(answers(plain.output)) == 2 and answers(plain.output) == answers(off.output)
    bad = runner.invoke(app, [*base, "--offload", str(tmp_path / "o"), "--method", "ike"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --offload evaluates a patch")


def _cfg(tmp_path):
    cfg = tmp_path / "rome.yaml"
    cfg.write_text("layer: 0\nv_steps: 4\nn_prefixes: 2\nstats_tokens: 200\nstats_max_len: 32\n")
    return cfg


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("smollm2-13m", r"^unknown model 'smollm2-13m': .* did you mean 'smollm2-135m'\?$"),
        ("minilm-l6", r"^minilm-l6 is a encoder model, not a causal-lm"),
        ("model.safetensors", r"model\.safetensors is not a model folder with a config\.json"),
    ],
)
def test_what_cannot_be_offloaded_is_one_line(folder, tmp_path, model, message):
    name = str(folder / model) if model.endswith(".safetensors") else model
    with pytest.raises(AssetError, match=message) as e:
        load_offloaded(name, [0], tmp_path)
    assert "\n" not in str(e.value)


def test_blocks_on_disk_are_read_by_offset_one_read_a_weight(folder, tmp_path, monkeypatch):
    """The hooks read a weight on disk with one positioned read (`read_tensor`), not a
    `safe_open` of the whole file, and get the whole model's values."""
    import accelerate.utils.offload

    from lfm.core import shards

    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        want = load_model(folder).model(ids).logits
    handle = load_offloaded(folder, [0], tmp_path / "off")
    reads = []
    real = shards.read_tensor
    monkeypatch.setattr(shards, "read_tensor", lambda f, k: reads.append(k) or real(f, k))
    monkeypatch.setattr(accelerate.utils.offload, "safe_open", None)  # its own reads would fail
    with torch.no_grad():
        got = handle.model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    on_disk = {n for n, p in handle.model.named_parameters() if p.is_meta}
    assert sorted(reads) == sorted(on_disk)  # each weight on disk read once, nothing else
