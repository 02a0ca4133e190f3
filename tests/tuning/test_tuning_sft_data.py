"""SFT: the packaged instruction set, response-only labels, and a loss that goes down."""

from __future__ import annotations

import pytest
import torch

from lfm.access import LocalModel
from lfm.core.train import TrainConfig
from lfm.errors import ConfigError
from lfm.registry import run
from lfm.tuning.peft_methods import LoraConfig
from lfm.tuning.sft import (
    IGNORE,
    load_instructions,
    make_instructions,
    render,
    sft_batches,
    sft_example,
    sft_loss,
)
from lfm.tuning.tasks import Instructions

from conftest import make_lm


def test_packaged_set_is_what_the_generator_writes():
    rows = load_instructions()
    assert rows == make_instructions()
    assert 40 <= len(rows) <= 100 and len({r["prompt"] for r in rows}) == len(rows)
    assert any(r["prompt"].startswith("What is the capital of") for r in rows)


def test_labels_mask_the_prompt_tokens():
    _, tok = make_lm("llama")
    ids, labels = sft_example(tok, "What is 2 plus 3?", "2 plus 3 is 5.")
    n_prompt = len(tok(render(tok, "What is 2 plus 3?"), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert "2 plus 3 is 5." in tok.decode([t for t in labels if t != IGNORE])


def test_batches_pad_with_ignored_labels():
    _, tok = make_lm("llama")
    rows = make_instructions(6)
    batch = sft_batches(tok, rows, batch_size=6)[0]
    pads = batch["attention_mask"] == 0
    assert pads.any() and (batch["labels"][pads] == IGNORE).all()
    assert ((batch["labels"] != IGNORE).sum(1) > 0).all()


def test_sft_with_lora_lowers_the_loss_and_still_generates():
    model, tok = make_lm("llama")
    rows = Instructions(make_instructions(8))
    res = run("tuning/lora", LocalModel(model, tok), rows, cfg=LoraConfig(r=8), batch_size=8,
              train_cfg=TrainConfig(steps=10, lr=2e-2, progress=False, cpu=True))  # fmt: skip
    assert sum(res.history[-3:]) / 3 < res.history[0]
    lm = res.backbone
    enc = tok([render(tok, "What is 2 plus 3?")], return_tensors="pt", add_special_tokens=False)
    out = lm.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4 or out[0, -1] == tok.eos_token_id
    assert out.dtype == torch.long


def test_instruction_rows_are_checked_and_an_encoder_is_refused():
    with pytest.raises(ConfigError, match=r"rows \[1\] lack a 'prompt' or 'response'"):
        Instructions([{"prompt": "a", "response": "b"}, {"prompt": "c"}])
    bert, tok = make_lm("bert")
    with pytest.raises(ConfigError, match="instruction tuning trains a causal LM"):
        run("tuning/lora", LocalModel(bert, tok), Instructions(make_instructions(2)))


def test_sft_evaluates_the_response_loss_on_held_out_rows():
    model, tok = make_lm("llama")
    rows = Instructions(make_instructions(8))
    held = Instructions(make_instructions(12)[8:])
    res = run("tuning/full_ft", LocalModel(model, tok), rows, eval_data=held, batch_size=8,
              train_cfg=TrainConfig(steps=3, lr=1e-2, progress=False, cpu=True))  # fmt: skip
    batch = sft_batches(tok, held.rows, 8)[0]
    with torch.no_grad():
        want = float(sft_loss(res.backbone.eval(), batch))
    assert res.metrics["loss"] == pytest.approx(want, rel=1e-5)
