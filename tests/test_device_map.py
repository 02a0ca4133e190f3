"""`load_model(device_map=...)`: a model spread by Accelerate, partly on disk, answers as the same
model loaded whole, at HIDDEN access; its offloaded weights are still checked."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lfm import registry
from lfm.access import Access, LocalModel, _backend, access_of
from lfm.assets import load_model
from lfm.core import placement
from lfm.core.tiny import tiny_lm
from lfm.edit import common
from lfm.errors import AccessError, AssetError

TEXTS = ["The city of Paris is", "Rome"]
TARGETS = [" big", " of"]
# 70 % of the tiny model's 115 kB: the embeddings and the head stay, the blocks go to disk
SMALL = {"cpu": 80_000}
ON_DISK = {"cpu": 40_000}  # all of it on disk, the embeddings too: inputs go to their hook's device


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_lm("llama", 0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def whole(folder):
    return load_model(folder)


@pytest.fixture(scope="module")
def spread(folder):
    return load_model(folder, device_map="auto", max_memory=SMALL)


@pytest.mark.parametrize(("budget", "places"), [(SMALL, {"cpu", "disk"}), (ON_DISK, {"disk"})])
def test_a_model_on_disk_answers_bit_for_bit_as_the_whole_one(folder, whole, budget, places):
    spread = load_model(folder, device_map="auto", max_memory=budget)
    model = _backend(spread).model
    assert set(model.hf_device_map.values()) == places, model.hf_device_map
    assert any(p.is_meta for p in model.parameters())  # offloaded weights wait on "meta"
    assert placement.dispatched(model) and placement.device_of(model) == torch.device("cpu")
    assert torch.equal(whole.score(TEXTS, TARGETS), spread.score(TEXTS, TARGETS))
    assert torch.equal(whole.next_token_logprobs(TEXTS), spread.next_token_logprobs(TEXTS))
    names = ["model.layers.1.mlp.down_proj"]
    a, b = whole.hidden(TEXTS, names), spread.hidden(TEXTS, names)
    assert torch.equal(a[names[0]], b[names[0]])
    assert whole.generate(TEXTS, max_new_tokens=5) == spread.generate(TEXTS, max_new_tokens=5)
    rows = [whole.encode("The city of Paris is big")]  # what top-k distillation reads
    for a, b in zip(whole.top_logprobs(rows, 4), spread.top_logprobs(rows, 4), strict=True):
        assert torch.equal(a, b)


def test_a_spread_model_gives_hidden_access_and_weight_methods_refuse_it(spread):
    assert access_of(spread) == Access.HIDDEN
    with pytest.raises(AccessError, match=r"^edit/rome needs WEIGHTS access") as e:
        registry.run("edit", "rome", spread, common.SMOKE_REQUEST)
    assert "\n" not in str(e.value)


def test_a_device_map_that_keeps_the_model_whole_gives_weights_access(folder, whole):
    handle = load_model(folder, device_map={"": "cpu"})
    assert isinstance(handle, LocalModel) and handle.access == Access.WEIGHTS
    assert not placement.dispatched(handle.model)
    assert torch.equal(whole.score(TEXTS, TARGETS), handle.score(TEXTS, TARGETS))


def test_parameters_anywhere_reads_the_offloaded_weights(whole, spread):
    model = _backend(spread).model
    got = dict(placement.parameters_anywhere(model))
    want = dict(whole.model.named_parameters())
    assert set(want) <= set(got)  # tied weights may appear under both names
    assert all(torch.equal(got[k].cpu(), want[k].detach()) for k in want)
    assert any(p.is_meta for p in model.parameters())  # reading them kept them offloaded


def test_a_nan_in_an_offloaded_weight_is_refused(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        if f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), {"format": "pt"})
    with pytest.raises(AssetError, match=rf"has NaN or infinite values in {name}; the model"):
        load_model(bad, device_map="auto", max_memory=SMALL)
    loaded = load_model(bad, device_map="auto", max_memory=SMALL, allow_nonfinite=True)
    assert access_of(loaded) == Access.HIDDEN


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cpu", "device_map": "auto"}, "^give device or device_map, not both"),
        ({"max_memory": SMALL}, "^max_memory and offload_folder go with device_map"),
        ({"offload_folder": "off"}, "^max_memory and offload_folder go with device_map"),
        ({"device_map": "everywhere"}, "^unknown device_map 'everywhere'; use auto, balanced"),
        ({"device_map": 3}, "^device_map must be a name or a dict, not int"),
        ({"device_map": {"": "cuda:7"}}, r"^cannot load .* with device_map=\{'': 'cuda:7'\}"),
    ],
)
def test_bad_placements_are_one_line(folder, kwargs, message):
    with pytest.raises(AssetError, match=message) as e:
        load_model(folder, **kwargs)
    assert "\n" not in str(e.value)


def test_a_single_file_or_the_vision_model_is_refused_with_a_device_map(folder):
    with pytest.raises(AssetError, match="device_map needs a model folder, not a single file"):
        load_model(folder / "model.safetensors", device_map="auto")
    with pytest.raises(AssetError, match="MobileNetV2 loads on one device"):
        load_model("mobilenet-v2", device_map="auto")


def test_a_spread_model_is_served_and_answers_as_the_whole_one(folder, whole):
    import asyncio

    import httpx

    from lfm.serve import ServeSettings
    from lfm.serve.cli import make_server

    server = make_server(str(folder), "hidden", "127.0.0.1", 8125, None,
                         spread={"device_map": "auto", "max_memory": SMALL})  # fmt: skip
    backend = server.config.app.state.backend
    assert placement.dispatched(backend._model.model) and backend.level == Access.HIDDEN
    body = {"prompt": TEXTS[0], "max_tokens": 0, "echo": True, "logprobs": 0}

    async def ask(app):
        t = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=t, base_url="http://test") as c:
            return (await c.post("/v1/completions", json=body)).json()

    from lfm.serve import Backend, build_app

    want = asyncio.run(ask(build_app(Backend(whole, "hidden"), ServeSettings())))
    got = asyncio.run(ask(server.config.app))
    assert len(want["choices"][0]["logprobs"]["token_logprobs"]) == 7  # one per prompt token
    assert got["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]


def test_serve_takes_a_device_map_and_refuses_bad_ones_in_one_line(folder):
    import typer
    from typer.testing import CliRunner

    from lfm.cli.common import with_placement
    from lfm.serve.cli import serve

    app = typer.Typer()
    app.command()(with_placement(serve))
    cases = [
        (["--max-memory", "cpu=1GiB"], "--max-memory and --offload-folder go with --device-map"),
        (["--device-map", "auto", "--device", "cpu"], "give --device or --device-map, not both"),
        (["--device-map", "auto", "--max-memory", "cpu"], "entry 'cpu' is not DEVICE=SIZE"),
        (["--device-map", "auto", "--max-memory", "gpu=1GiB"], "device 'gpu': use a GPU index"),
        (["--device-map", "auto", "--max-memory", "0=lots"], "size 'lots': use bytes or a size"),
        (["--device-map", "everywhere"], "unknown device_map 'everywhere'"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(app, ["--model", str(folder), *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
        assert res.output.count("\n") == 1 and res.output.startswith("error: ")


def test_max_memory_is_parsed_as_from_pretrained_takes_it():
    got = placement.parse_max_memory("0=20GiB, 1=18GiB,cpu=60GiB,mps=8GB,CPU=1000")
    assert got == {0: "20GiB", 1: "18GiB", "cpu": 1000, "mps": "8GB"}
