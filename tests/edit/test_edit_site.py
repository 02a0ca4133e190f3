"""The edit site: one block's MLP output projection, resolved once per edit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lfm.edit.site import default_layer, edit_site, edit_sites
from lfm.errors import LfmError

from conftest import make_lm


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_site_names_shape_orientation_and_norm(kind):
    model, _ = make_lm(kind)
    site = edit_site(model, None)  # the default layer: 0 of 2
    assert site.layer == default_layer(model) == 0
    proj = model.get_submodule(site.module)
    assert site.conv1d == (kind == "gpt2")  # by the module's type: GPT-2's Conv1D is (in, out)
    w = site.weight(model)
    assert tuple(w.shape) == site.shape == (32, 64 if kind != "gpt2" else 128)
    assert w.data_ptr() == proj.weight.data_ptr()  # a view: writes reach the model
    assert site.normed == (kind == "gemma3") and (site.norm_module(model) is None) != site.normed
    assert site.block == site.module.rsplit(".", 2)[0] and model.get_submodule(site.block)
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.layer = 1  # type: ignore[misc]


def test_layers_wrap_from_the_top_and_out_of_range_is_refused():
    model, _ = make_lm("llama")
    assert [s.layer for s in edit_sites(model, [0, -1])] == [0, 1]
    with pytest.raises(LfmError, match="layer 2 is out of range for a 2-layer model"):
        edit_site(model, 2)
    x = torch.randn(3, 64)
    site = edit_site(model, 1)
    assert torch.allclose(site.projection(model)(x), x @ site.weight(model).T)
