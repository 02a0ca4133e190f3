"""Benchmark: lfm's ROME against EasyEdit's ROME, the same facts in one run, interleaved.

    .venv/bin/python bench/edit_peer.py --n 20 --threads 1 --easyedit-prefixes 20 10

Without `--easyedit-wheel` the wheel is fetched once with `pip download --no-deps
easyeditor==0.0.1.dev0` into `$LFM_CACHE/peers` (default /tmp/peers).

EasyEdit 0.0.1.dev0 is the one release on PyPI. Its package `__init__` imports every editor
(MEND, SERAC, the multimodal datasets...), so the bench loads only its ROME modules
(`easyeditor.models.rome` and the `easyeditor.util` modules they import) from the wheel, without
running the package `__init__`s. One change is made to its code as it is read: its device
strings `f"cuda:{hparams.device}"` read `"cpu"` (it has no CPU path). Its hyperparameters are
its shipped ones for the Llama family (`hparams/ROME/llama3.2-1b.yaml`: layer 5, 25 Adam steps
at lr 0.5, weight decay 1e-3, KL factor 0.0625, clamp 4, 20 generated prefixes, covariance off as
it ships), with the loss layer set to the model's last block. `--easyedit-prefixes 20 10` adds
a second EasyEdit side with 10 generated prefixes, as many as lfm's ROME uses (fixed ones), so
that the two can also be compared on the same number of prompts.

lfm's ROME runs with its defaults, the covariance ON (C built once and cached before timing,
its time reported apart). Each fact is edited by both (the order alternating fact by fact), each
edit timed in process CPU seconds and wall seconds from the request to the edited weights in the
model, scored by `lfm.edit.facts.evaluate_fact` and reverted. One untimed edit each warms the
caches first (EasyEdit caches its generated prefixes on its first edit). Medians over facts;
the ratio is the median of the per-fact ratios lfm / EasyEdit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import torch

ROME_MODULES = (
    "util.hparams",
    "util.nethook",
    "util.logit_lens",
    "util.generate",
    "util.globals",
    "util.runningstats",
    "models.rome.tok_dataset",
    "models.rome.layer_stats",
    "models.rome.repr_tools",
    "models.rome.rome_hparams",
    "models.rome.compute_u",
    "models.rome.compute_v",
    "models.rome.rome_main",
)
PACKAGES = ("easyeditor", "easyeditor.util", "easyeditor.models", "easyeditor.models.rome")
DEVICE = 'f"cuda:{hparams.device}"'
EASYEDIT = "0.0.1.dev0"


def load_easyedit_rome(wheel: str) -> types.ModuleType:
    """EasyEdit's `rome_main` module, read from the wheel (see the module docstring)."""
    root = Path(tempfile.mkdtemp(prefix="easyedit-")) / "site"
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
    except (OSError, zipfile.BadZipFile) as e:
        raise SystemExit(f"cannot read {wheel} as a wheel ({e})") from None
    for name in PACKAGES:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = pkg
    if importlib.util.find_spec("datasets") is None:  # only its statistics pass uses it (off here)
        sys.modules["datasets"] = types.ModuleType("datasets")
        sys.modules["datasets"].load_dataset = None  # type: ignore[attr-defined]
    changed = 0
    for short in ROME_MODULES:
        name = f"easyeditor.{short}"
        path = root / "easyeditor" / (short.replace(".", "/") + ".py")
        source = path.read_text()
        changed += source.count(DEVICE)
        spec = importlib.util.spec_from_loader(name, loader=None, origin=str(path))
        mod = importlib.util.module_from_spec(spec)
        mod.__file__ = str(path)
        mod.__package__ = name.rpartition(".")[0]
        sys.modules[name] = mod
        exec(compile(source.replace(DEVICE, '"cpu"'), str(path), "exec"), mod.__dict__)
    if changed == 0:
        raise SystemExit(f"{wheel}: no device strings found; is this EasyEdit 0.0.1.dev0?")
    return sys.modules["easyeditor.models.rome.rome_main"]


def easyedit_wheel() -> str:
    """EasyEdit's wheel, downloaded once (no dependencies) into the cache's `peers` folder."""
    folder = Path(os.environ.get("LFM_CACHE", "/tmp")) / "peers"
    found = sorted(folder.glob(f"easyeditor-{EASYEDIT}-*.whl"))
    if not found:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder)]
        got = subprocess.run([*pip, f"easyeditor=={EASYEDIT}"], capture_output=True, text=True)
        found = sorted(folder.glob(f"easyeditor-{EASYEDIT}-*.whl"))
        if got.returncode or not found:
            why = (got.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise SystemExit(f"EasyEdit {EASYEDIT} could not be downloaded ({why}); "
                             "give one with --easyedit-wheel")  # fmt: skip
    return str(found[0])


def easyedit_hparams(rome_main: types.ModuleType, model, layer: int, prefixes: int = 20):
    """Its shipped Llama-family ROME settings; `prefixes` generated prefixes, half of 5 tokens,
    half of 10 (its shipped 20: `[[5, 10], [10, 10]]`)."""
    n = model.config.num_hidden_layers
    return rome_main.ROMEHyperParams(
        alg_name="ROME",
        model_name=str(getattr(model.config, "_name_or_path", "model")),
        stats_dir="unused",
        device=0,
        layers=[layer],
        fact_token="subject_last",
        v_num_grad_steps=25,
        v_lr=0.5,
        v_loss_layer=n - 1,
        v_weight_decay=1e-3,
        clamp_norm_factor=4,
        kl_factor=0.0625,
        mom2_adjustment=False,
        context_template_length_params=[[5, prefixes // 2], [10, prefixes - prefixes // 2]],
        rewrite_module_tmp="model.layers.{}.mlp.down_proj",
        layer_module_tmp="model.layers.{}",
        mlp_module_tmp="model.layers.{}.mlp",
        attn_module_tmp="model.layers.{}.self_attn",
        ln_f_module="model.norm",
        lm_head_module="lm_head",
        mom2_dataset="wikipedia",
        mom2_n_samples=100000,
        mom2_dtype="float32",
    )


class Timed:
    def __enter__(self) -> Timed:
        self._t = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._t[0]
        self.cpu = time.process_time() - self._t[1]


def lfm_edit(handle, fact, cfg, fn):
    """Edit with lfm's ROME; returns (the undo, the time)."""
    with Timed() as t:
        undo = fn(handle, fact.request, cfg).apply(handle.model)
    return lambda: undo.revert(handle.model), t


class EasyEditSide:
    """EasyEdit's ROME with its own cache of generated prefixes (its module keeps one, global)."""

    def __init__(self, rome_main: types.ModuleType, hparams) -> None:
        self.rome_main, self.hparams, self.templates = rome_main, hparams, None

    def __call__(self, handle, fact):
        """Edit; returns (a function restoring the weights, the time)."""
        rm = self.rome_main
        request = {"prompt": fact.prompt, "subject": fact.subject, "target_new": fact.new}
        rm.CONTEXT_TEMPLATES_CACHE = self.templates
        with Timed() as t, contextlib.redirect_stdout(io.StringIO()):
            _, old = rm.apply_rome_to_model(
                handle.model,
                handle.tokenizer,
                [request],
                self.hparams,
                return_orig_weights=True,
                keep_original_weight=True,
            )
        self.templates = rm.CONTEXT_TEMPLATES_CACHE

        def restore() -> None:
            with torch.no_grad():
                for name, w in old.items():
                    rm.nethook.get_parameter(handle.model, name)[...] = w

        return restore, t


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def tens(text: str) -> int:
    """EasyEdit generates n // 5 prefixes from each of 5 words, for each of two lengths."""
    if not text.isdigit() or int(text) < 10 or int(text) % 10:
        raise argparse.ArgumentTypeError(f"{text!r}: give a multiple of 10 (EasyEdit ships 20)")
    return int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--easyedit-wheel",
        default=None,
        help="easyeditor-0.0.1.dev0-py3-none-any.whl (default: `pip download` it once into "
        "$LFM_CACHE/peers, or /tmp/peers)",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=positive, default=20, help="known facts edited by each")
    p.add_argument("--stats-tokens", type=int, default=100_000, help="lfm's token budget for C")
    p.add_argument("--threads", type=positive, default=1)
    p.add_argument(
        "--easyedit-prefixes",
        type=tens,
        nargs="+",
        default=[20],
        help="EasyEdit runs with these numbers of generated prefixes (shipped: 20; lfm uses 10)",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from lfm.assets import load_model
    from lfm.edit.facts import evaluate_fact, known_facts, load_facts, summarise
    from lfm.edit.site import default_layer
    from lfm.edit.stats import second_moments
    from lfm.registry import get

    rome_main = load_easyedit_rome(a.easyedit_wheel or easyedit_wheel())
    handle = load_model(a.model)
    if handle.tokenizer.pad_token is None:  # EasyEdit pads its batches (its editor does the same)
        handle.tokenizer.pad_token = handle.tokenizer.eos_token
    handle.tokenizer.padding_side = "right"  # EasyEdit's δ targets assume right padding
    layer = default_layer(handle.model)
    method = get("edit/rome")
    cfg = method.config()
    with Timed() as t:
        second_moments(handle.model, handle.tokenizer, [layer], tokens=a.stats_tokens)
    print(f"lfm's C at layer {layer} ({a.stats_tokens} tokens; cached): {t.cpu:.1f} CPU s")
    facts = known_facts(handle, load_facts())[: a.n + 1]
    warm, facts = facts[0], facts[1:]
    sides = {"lfm": lambda f: lfm_edit(handle, f, cfg, method.fn)}
    for k in a.easyedit_prefixes:
        side = EasyEditSide(rome_main, easyedit_hparams(rome_main, handle.model, layer, k))
        sides[f"EasyEdit {k}"] = lambda f, side=side: side(handle, f)
    for side in sides.values():  # warm: C read, prefixes generated
        side(warm)[0]()
    times: dict[str, list[Timed]] = {k: [] for k in sides}
    rows: dict[str, list[dict]] = {k: [] for k in sides}
    for i, fact in enumerate(facts):
        order = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in order:
            undo, t = sides[name](fact)
            rows[name].append(evaluate_fact(handle, fact, gen_tokens=0))
            undo()
            times[name].append(t)
        print(
            f"  {i + 1}/{len(facts)} {fact.subject}: "
            + ", ".join(f"{k} {times[k][-1].cpu:.2f} CPU s" for k in sides),
            flush=True,
        )
    print(f"\n{a.model}, layer {layer}, {len(facts)} facts, {a.threads} thread(s)")
    print(
        f"{'':12} {'CPU s/edit':>11} {'wall s/edit':>12} {'efficacy':>9} {'paraphr':>8} "
        f"{'neighb':>7}"
    )
    for name in sides:
        s = summarise(rows[name])
        cpu = statistics.median(t.cpu for t in times[name])
        wall = statistics.median(t.wall for t in times[name])
        print(
            f"{name:12} {cpu:11.2f} {wall:12.2f} {s['efficacy']:9.1f} {s['paraphrase']:8.1f} "
            f"{s['neighbourhood']:7.1f}"
        )
    for name in list(sides)[1:]:
        cpu = [x.cpu / y.cpu for x, y in zip(times["lfm"], times[name], strict=True)]
        wall = [x.wall / y.wall for x, y in zip(times["lfm"], times[name], strict=True)]
        print(
            f"lfm / {name}, median of per-fact ratios: {statistics.median(cpu):.2f}× CPU "
            f"(range {min(cpu):.2f}–{max(cpu):.2f}), {statistics.median(wall):.2f}× wall"
        )


if __name__ == "__main__":
    main()
