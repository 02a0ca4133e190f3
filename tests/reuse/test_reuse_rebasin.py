"""Git Re-Basin weight matching: known permutations are recovered exactly; paths and plots."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lfm import registry
from lfm.access import LocalClassifier, narrow
from lfm.errors import AccessError
from lfm.reuse import MergeError
from lfm.reuse.connect import (
    barrier,
    classification_eval,
    interpolation_path,
    plot_paths,
    save_paths,
)
from lfm.reuse.rebasin import RebasinConfig, align_pair, apply_permutation, chain_spec, rebasin


def _mlp():
    return nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)
    )


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3)))


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _known(model, seed=1):
    spec, sd = chain_spec(model), {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sizes = {p: sd[pairs[0][0]].shape[0] for p, pairs in spec.items()}
    perms = {p: torch.randperm(n, generator=gen) for p, n in sizes.items()}
    return spec, sd, perms, apply_permutation(spec, sd, perms)


@pytest.mark.parametrize("make, x", [(_mlp, torch.randn(7, 5)), (lambda: _randomise_bn(_CNN()), torch.randn(4, 1, 6, 6))],
                         ids=["mlp", "cnn-bn"])  # fmt: skip
def test_permutation_keeps_the_function_and_is_recovered_exactly(make, x):
    torch.manual_seed(0)
    model = make()
    spec, sd, perms, permuted = _known(model)
    assert any(not torch.equal(sd[k], permuted[k]) for k in sd)  # it did move units
    with torch.no_grad():
        want = model(x)
        model.load_state_dict(permuted)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    aligned, found = align_pair(sd, permuted, spec, RebasinConfig(seed=3))
    for k in sd:
        assert torch.equal(aligned[k], sd[k]), k
    back = {p: torch.argsort(perms[p]) for p in perms}  # the inverse permutation
    assert all(torch.equal(found[p], back[p]) for p in perms)


def test_the_aligner_aligns_every_model_to_the_first_by_name():
    torch.manual_seed(0)
    model = _randomise_bn(_CNN())
    _, sd, _, permuted = _known(model, seed=1)
    _, _, _, other = _known(model, seed=2)
    twin = _CNN()
    twin.load_state_dict(other)
    # the first model's module gives the spec; the others may be state dicts or modules
    out = registry.run("reuse/rebasin", [LocalClassifier(model), permuted, twin], cfg={"seed": 3})
    assert len(out) == 3 and all(torch.equal(o[k], sd[k]) for o in out for k in sd)
    from_sds = rebasin([sd, permuted])  # no module: the spec read from the state dict
    assert all(torch.equal(from_sds[1][k], sd[k]) for k in sd)
    with pytest.raises(AccessError, match=r"reuse/rebasin needs WEIGHTS.*only HIDDEN"):
        rebasin([narrow(LocalClassifier(model), "hidden"), permuted])
    with pytest.raises(MergeError, match="model 1 does not have the tensors"):
        rebasin([sd, {k: v for k, v in sd.items() if k != "head.bias"}])


def test_cnn_spec_covers_conv_channels_and_batchnorm():
    spec = chain_spec(_CNN())
    assert set(spec) == {"P0", "P1"}
    assert ("bn1.running_var", 0) in spec["P0"] and ("conv2.weight", 1) in spec["P0"]
    assert ("head.weight", 1) in spec["P1"] and ("head.weight", 0) not in [
        pair for pairs in spec.values() for pair in pairs
    ]


def test_barrier_by_hand():
    assert barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == pytest.approx(3.0 - 1.5)
    assert barrier([0, 0.5, 1], [1.0, 1.0, 1.0]) == 0


def test_interpolation_path_endpoints_plot_and_json(tmp_path):
    torch.manual_seed(0)
    a, b = _mlp(), _mlp()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    ev = classification_eval(x, y)
    path = interpolation_path(_mlp(), a.state_dict(), b.state_dict(), ev, n_points=3)
    assert path["t"] == [0.0, 0.5, 1.0]
    assert path["loss"][0] == pytest.approx(ev(a)[0]) and path["loss"][-1] == pytest.approx(
        ev(b)[0]
    )
    png = plot_paths({"naive": path}, tmp_path / "p.png", title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(save_paths({"naive": path}, tmp_path / "p.json").read_text())
    assert data["naive"]["barrier"] == [pytest.approx(barrier(path["t"], path["loss"]))]
