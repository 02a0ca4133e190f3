"""Bad input to merging and to loaded weights: a one-line `LfmError` (exit 2 from the CLI), never
a silently wrong result, a traceback or an executed pickle."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lfm.assets import load_model
from lfm.cli.reuse import app
from lfm.core.tiny import tiny_lm
from lfm.errors import LfmError
from lfm.reuse import merge_state_dicts
from lfm.reuse.driver import MergeError
from lfm.reuse.plan import from_mergekit
from lfm.reuse.recipes import merge_plan, rebasin_files


@pytest.fixture
def files(tmp_path):
    gen = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b"):
        sd = {"w": torch.randn(3, 4, generator=gen), "pos": torch.arange(4)}
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    return tmp_path


def _plan(root, data, name="p.yaml"):
    path = root / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _refused(root, data, match):
    with pytest.raises(LfmError, match=match) as info:
        merge_plan(_plan(root, data), root / "m", progress=False, root=root / "runs")
    assert "\n" not in str(info.value) and not (root / "m").exists()
    assert not (root / "runs").exists()  # refused before any run directory (or weight) is made


LFM_TIES = "method: ties\nbase: base.safetensors\nparameters: {density: 0.5}\nmodels:\n"


@pytest.mark.parametrize(
    ("models", "match"),
    [
        ("  - {path: a.safetensors, weight: .nan}\n", "finite number, not nan"),
        ("  - {path: a.safetensors, weight: .inf}\n", "finite number, not inf"),
        ("  - {path: a.safetensors, weight: abc}\n", "must be a number, not 'abc'"),
        ("  - {path: a.safetensors, weight: true}\n", "must be a number"),
        ("  - {weight: 1.0}\n", "model 0 of the merge plan has no path"),
        ("  - {path: a.safetensors, wieght: 2}\n", "'wieght'.*did you mean 'weight'"),
        ("  - {path: p.yaml}\n", "is a file, not a model"),
        ("  - {path: nowhere}\n", "no such file or folder"),
        ("  - {path: [a, b]}\n", "must be a path"),
    ],
)
def test_lfm_plan_entries_are_checked_before_anything_is_read(files, models, match):
    _refused(files, LFM_TIES + models, match)


def test_lfm_plan_keys_and_values(files):
    a = "models: [a.safetensors]\n"
    _refused(
        files, "method: linear\nparamters: {normalize: true}\n" + a, "did you mean 'parameters'"
    )
    _refused(files, "method: ties\nbase: base.safetensors\nparameters: {densty: 0.1}\n" + a,
             "'densty' in the parameters of ties; did you mean 'density'")  # fmt: skip
    _refused(files, "method: linear\nmodels: a.safetensors\n", "non-empty list")  # not 1 model 'a'
    _refused(files, "method: linear\nmodels: []\n", "non-empty list")
    _refused(files, "method: linear\non_missing: ignore\n" + a, "error or skip")
    _refused(files, "method: linear\nmax_shard_size: lots\n" + a, "cannot read size")
    _refused(files, "method: ties\nbase: base.safetensors\nparameters: {density: 1.5}\n" + a,
             "density: Input should be less than or equal to 1")  # fmt: skip
    _refused(files, "method: slerp\nparameters: {t: 2}\nmodels: [a.safetensors, b.safetensors]\n",
             "t: Input should be less than or equal to 1")  # fmt: skip
    (files / "empty").mkdir()
    _refused(files, "method: linear\nmodels: [empty]\n", "holds no safetensors weights")


def test_weights_summing_to_zero_are_refused_where_the_method_divides_by_the_sum(files):
    two = "models: [{path: a.safetensors, weight: 1}, {path: b.safetensors, weight: -1}]\n"
    _refused(files, "method: linear\n" + two, "linear divides by the sum of the weights")
    # task arithmetic adds Σ w_i τ_i: weights that cancel are a legitimate (if odd) request
    _, out, _ = merge_plan(_plan(files, "method: task_arithmetic\nbase: base.safetensors\n" + two),
                              files / "ta", progress=False, root=files / "runs")  # fmt: skip
    got, sds = (
        load_file(out / "model.safetensors"),
        [load_file(files / f"{n}.safetensors") for n in "ab"],
    )
    base = load_file(files / "base.safetensors")
    torch.testing.assert_close(got["w"], base["w"] + sds[0]["w"] - sds[1]["w"])
    with pytest.raises(MergeError, match="sums to zero"):
        merge_state_dicts("linear", None, sds, weights=[2.0, -2.0])
    with pytest.raises(MergeError, match="finite numbers, got nan"):
        merge_state_dicts("ties", base, sds, weights=[float("nan"), 1.0])


def test_a_nan_weight_end_to_end_exits_2_and_writes_nothing(files):
    plan = _plan(
        files,
        "method: linear\nmodels:\n  - {path: a.safetensors, weight: .nan}\n  - b.safetensors\n",
    )
    res = CliRunner().invoke(
        app, ["merge", str(plan), "-o", str(files / "m"), "-q", "--root", str(files / "r")]
    )
    assert res.exit_code == 2 and res.output.strip().startswith("error:") and "nan" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (files / "m").exists()


MK = {"merge_method": "ties", "base_model": "base.safetensors",
      "models": [{"model": "a.safetensors", "parameters": {"weight": 0.5, "density": 0.5}},
                 {"model": "b.safetensors", "parameters": {"weight": 0.5, "density": 0.5}}]}  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            {"paramters": {"lambda": 2}},
            "unknown key 'paramters' in the mergekit file; did you mean 'parameters'",
        ),
        ({"base_modle": "x"}, "did you mean 'base_model'"),
        (
            {"parameters": {"lamda": 0.5}},
            "'lamda' in the parameters of ties; did you mean 'lambda'",
        ),
        ({"parameters": {"t": 0.5}}, "'t' is not supported with ties"),
        ({"parameters": {"rescale": True}}, "rescale: true is not supported with ties"),
        ({"parameters": {"lambda": [0.1, 0.9]}}, "gradients .* not supported"),
        ({"tokenizer_source": "union"}, "'tokenizer_source' is not supported"),
        ({"chat_template": "chatml"}, "'chat_template' is not supported"),
        ({"out_dtype": "int8"}, "out_dtype: a merge cannot write its output in 'int8'"),
        ({"slices": [{"sources": []}]}, "'slices' is not supported"),
        ({"parameters": {"density": 2.0}}, None),  # shared values yield to per-model ones
    ],
)
def test_mergekit_files_are_read_against_mergekit_keys(edit, match):
    data = {**MK, **edit}
    if match is None:
        assert from_mergekit(data).parameters["density"] == 0.5
        return
    with pytest.raises(MergeError, match=match) as info:
        from_mergekit(data)
    assert "\n" not in str(info.value)


def test_mergekit_per_model_keys_and_parameters():
    def entry(**params):
        return {**MK, "models": [{"model": "a", "parameters": params}, {"model": "b"}]}

    with pytest.raises(MergeError, match=r"'paramters' in model 0 .* did you mean 'parameters'"):
        from_mergekit({**MK, "models": [{"model": "a", "paramters": {"weight": 0.5}}]})
    with pytest.raises(MergeError, match="model 0 of the mergekit file has no model"):
        from_mergekit({**MK, "models": [{"parameters": {"weight": 1}}]})
    with pytest.raises(MergeError, match="density is set for some models only"):
        from_mergekit(entry(density=0.3))
    with pytest.raises(MergeError, match="'normalize' is read from the shared parameters"):
        from_mergekit(entry(normalize=False))
    with pytest.raises(MergeError, match="weight of a must be a finite number"):
        from_mergekit(entry(weight=float("nan")))
    with pytest.raises(MergeError, match="needs base_model"):
        from_mergekit({"merge_method": "slerp", "models": ["a", "b"], "parameters": {"t": 0.3}})


def test_mergekit_semantics_that_differ_from_lfm_defaults_are_translated():
    # a shared weight applies to every model without its own (mergekit's lookup order)
    ta = from_mergekit({"merge_method": "task_arithmetic", "base_model": "x", "models": ["y", "z"],
                        "parameters": {"weight": 0.5}})  # fmt: skip
    assert ta.weights == [0.5, 0.5]
    # task arithmetic with normalize: true divides Σ w_i τ_i by Σ w_i
    ta = from_mergekit({"merge_method": "task_arithmetic", "base_model": "x", "parameters": {"normalize": True},
                        "models": [{"model": "y", "parameters": {"weight": 3}}, {"model": "z", "parameters": {"weight": 1}}]})  # fmt: skip
    assert ta.weights == [0.75, 0.25] and ta.parameters == {}
    with pytest.raises(MergeError, match="sums to zero"):
        from_mergekit({"merge_method": "dare_linear", "base_model": "x", "parameters": {"normalize": True},
                       "models": [{"model": "y", "parameters": {"weight": 1}}, {"model": "z", "parameters": {"weight": -1}}]})  # fmt: skip
    # mergekit's dare_ties does not normalise (lfm's default does); its ties does
    assert from_mergekit({**MK, "merge_method": "dare_ties"}).parameters == {
        "drop_rate": 0.5,
        "normalize": False,
    }
    assert "normalize" not in from_mergekit(MK).parameters


def _nan_copy(src, dst, name="w"):
    sd = load_file(src)
    sd[name] = torch.full_like(sd[name], float("nan"))
    save_file(sd, str(dst))


def test_non_finite_or_integer_input_weights_are_refused_unless_allowed(files):
    _nan_copy(files / "a.safetensors", files / "nan.safetensors")
    plan = "method: linear\nmodels: [nan.safetensors, b.safetensors]\n"
    with pytest.raises(
        MergeError,
        match=r"model 0 \(.*nan.safetensors\) has NaN or infinite values in w; .*--allow-nonfinite",
    ):
        merge_plan(_plan(files, plan), files / "m", progress=False, root=files / "runs")
    assert not (files / "m").exists()
    out = merge_plan(_plan(files, plan), files / "m", progress=False, root=files / "runs",
                     allow_nonfinite=True)[1]  # fmt: skip
    assert torch.isnan(load_file(out / "model.safetensors")["w"]).all()
    sd = load_file(files / "b.safetensors")
    save_file({**sd, "w": sd["w"].to(torch.int32)}, str(files / "int.safetensors"))
    with pytest.raises(
        MergeError, match=r"stores w as torch.int32, where the template stores floats"
    ):
        merge_plan(_plan(files, "method: linear\nmodels: [a.safetensors, int.safetensors]\n"),
                   files / "m2", progress=False, root=files / "runs")  # fmt: skip
    # integer buffers (position ids) are copied, not checked as weights
    got = merge_state_dicts("linear", None, [load_file(files / "a.safetensors")] * 2)
    assert torch.equal(got["pos"], torch.arange(4))


def test_a_kernel_that_overflows_is_an_error_and_nothing_is_written(files):
    big = {"w": torch.full((3, 4), 3e38), "pos": torch.arange(4)}
    save_file(big, str(files / "big.safetensors"))
    plan = "method: linear\nparameters: {normalize: false}\nmodels: [big.safetensors, big.safetensors]\n"
    with pytest.raises(MergeError, match="the linear merge has NaN or infinite values in w"):
        merge_plan(_plan(files, plan), files / "m", progress=False, root=files / "runs")
    assert not (files / "m").exists() and not list(files.glob(".m.*"))  # no temporary left either


class _Boom:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_rebasin_never_unpickles_and_refuses_damaged_files(tmp_path, suffix):
    from lfm.core.tiny import tiny_mlp

    sd = {k: v.contiguous() for k, v in tiny_mlp(0).state_dict().items()}
    save_file(sd, str(tmp_path / "a.safetensors"))
    marker = tmp_path / "executed"
    with open(tmp_path / f"evil{suffix}", "wb") as f:
        pickle.dump({"w": _Boom(marker)}, f)
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.safetensors").write_text("just text\n")
    for bad in (f"evil{suffix}", "cut.safetensors", "text.safetensors", "nothere.safetensors"):
        res = CliRunner().invoke(app, ["rebasin", str(tmp_path / "a.safetensors"), str(tmp_path / bad),
                                       "-o", str(tmp_path / "o.safetensors"), "--root", str(tmp_path / "r")])  # fmt: skip
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.output
        assert not marker.exists() and not (tmp_path / "o.safetensors").exists()
    with pytest.raises(MergeError, match="cannot read"):
        rebasin_files(
            tmp_path / f"evil{suffix}",
            tmp_path / "a.safetensors",
            tmp_path / "o",
            root=tmp_path / "r",
        )
    assert not marker.exists()


def _save_lm(folder, seed=0):
    model, tok = tiny_lm("llama", seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_the_model_loader_refuses_nan_and_integer_weights(tmp_path):
    good = _save_lm(tmp_path / "good")
    assert load_model(good).model is not None
    sd = load_file(good / "model.safetensors")
    for name, change in (("nan", lambda v: torch.full_like(v, float("nan"))),
                         ("int", lambda v: (v * 100).to(torch.int32))):  # fmt: skip
        shutil.copytree(good, tmp_path / name)
        save_file({k: change(v) for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    with pytest.raises(LfmError, match=r"has NaN or infinite values in model.embed_tokens.weight"):
        load_model(tmp_path / "nan")
    assert torch.isnan(
        next(load_model(tmp_path / "nan", allow_nonfinite=True).model.parameters())
    ).all()
    with pytest.raises(LfmError, match=r"stores the weight .* as I32, not as floats"):
        load_model(tmp_path / "int", allow_nonfinite=True)
    with pytest.raises(
        LfmError, match="NaN or infinite"
    ):  # a single file with config.json beside it
        load_model(tmp_path / "nan" / "model.safetensors")


def _cli_cases(root):
    """(command line, what the one error line says) per command: a bad value, a bad type, a
    missing file."""
    a, texts = str(root / "a.safetensors"), str(root / "t.txt")
    out, runs = ["-o", str(root / "o")], ["--root", str(root / "r")]
    return [
        (["merge", str(root / "none.yaml"), *out, *runs], "cannot read merge plan"),
        (["merge", str(root / "t.txt"), *out, *runs], "must be a mapping"),
        (["merge", str(root / "t.txt"), *out, "--quiet=maybe"], None),
        (["stats", "gram", texts, "--model", a, *out, "--n", "0", *runs], None),
        (["stats", "gram", texts, "--model", a, *out, "--n", "many", *runs], None),
        (["stats", "variance", texts, "--model", a, *out, *runs], "unknown statistics"),
        (["stats", "gram", str(root / "none.txt"), "--model", a, *out, *runs], "cannot read texts"),
        (["rebasin", a, a, *out, "--max-iter", "0", *runs], "max_iter"),
        (["rebasin", a, a, *out, "--seed", "-1", *runs], "seed"),
        (["rebasin", a, a, *out, "--max-iter", "lots", *runs], None),
        (["rebasin", a, str(root / "none.safetensors"), *out, *runs], "no model at"),
        (["ensemble", a, "--texts", texts, "--labels", "x,y", "--n", "0"], None),
        (["ensemble", a, "--texts", texts, "--labels", "x,y", "--weights", "1,zwei"], "numbers"),
        (["ensemble", a, "--texts", texts, "--labels", "x,y", "--weights", "-1"], "non-negative"),
        (["ensemble", a, "--texts", str(root / "none.txt"), "--labels", "x"], "cannot read texts"),
    ]


def test_every_reuse_command_fails_in_one_line_with_exit_2(files):
    (files / "t.txt").write_text("one line\n")
    for args, says in _cli_cases(files):
        res = CliRunner().invoke(app, args)
        text = res.output
        errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
        assert res.exit_code == 2 and "Traceback" not in text and 1 <= len(errors) <= 2, (
            args,
            text,
        )
        if says is not None:  # an LfmError: exactly one line
            assert text.strip().startswith("error:") and says in text, (args, text)
            assert len(text.strip().splitlines()) == 1, (args, text)
        assert not (files / "o").exists()
