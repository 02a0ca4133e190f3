"""Prefix tuning's real-word init: at step 0 the model reads the sampled tokens before its input."""

from __future__ import annotations

import pytest
import torch

from lfm.errors import ConfigError
from lfm.tuning.peft_methods import PrefixTuningConfig, adapter

from conftest import make_lm

N = 4


def _tuned(seed: int, **cfg) -> torch.nn.Module:
    return adapter(
        make_lm("llama")[0],
        "prefix_tuning",
        PrefixTuningConfig(num_virtual_tokens=N, **cfg),
        seed=seed,
    ).eval()


def test_words_init_equals_the_model_reading_the_sampled_tokens_first():
    base = make_lm("llama")[0].eval()
    vocab = base.config.vocab_size
    # the prefix tokens are drawn under the seed, from their own generator
    prefix = torch.randint(0, vocab, (N,), generator=torch.Generator().manual_seed(7))
    x = torch.randint(3, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    state = torch.get_rng_state()
    got = _tuned(7)(input_ids=x, attention_mask=torch.ones_like(x)).logits  # (B, T, V)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is untouched
    full = torch.cat([prefix.expand(2, N), x], dim=1)
    want = base(input_ids=full).logits[:, N:]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_random_init_is_not_a_real_context_and_projection_needs_random():
    x = torch.randint(3, 320, (2, 6), generator=torch.Generator().manual_seed(1))
    words = _tuned(7)(input_ids=x, attention_mask=torch.ones_like(x)).logits
    rand = _tuned(7, init="random")(input_ids=x, attention_mask=torch.ones_like(x)).logits
    assert (words - rand).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="init='random'"):
        _tuned(7, projection=True)
    _tuned(7, projection=True, init="random")  # the paper's MLP, from PEFT's init


def test_an_encoder_keeps_the_random_init():
    model = adapter(make_lm("bert")[0], "prefix_tuning", PrefixTuningConfig(num_virtual_tokens=N))
    weight = model.prompt_encoder["default"].embedding.weight
    assert weight.shape[0] == N and 0.5 < float(weight.detach().std()) < 1.5  # PEFT's N(0, 1)


def test_generate_reads_the_prefix_as_a_forward_pass_does():
    # transformers 5 passes its own empty cache beside PEFT's prefix; without the fix in
    # `keep_prefix_in_generate`, generate gave the base model's tokens
    base = make_lm("llama")[0].eval()
    tuned = _tuned(7)
    x = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    with torch.no_grad():
        out = tuned.generate(input_ids=x, attention_mask=mask, max_new_tokens=3, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)  # fmt: skip
        for step, scores in enumerate(out.scores):  # each step against a forward pass
            seen = out.sequences[:, : x.shape[1] + step]
            want = tuned(input_ids=seen, attention_mask=torch.ones_like(seen)).logits[:, -1]
            torch.testing.assert_close(scores, want, rtol=1e-4, atol=1e-5)
        bare = base(input_ids=x, attention_mask=mask).logits[:, -1]
    assert (out.scores[0] - bare).abs().max() > 1e-2  # the prefix changes what comes next
