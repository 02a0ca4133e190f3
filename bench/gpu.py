"""Benchmark: LoRA tuning, a ROME edit, a TIES merge and LM distillation on a GPU in bfloat16,
against the CPU in float32, on SmolLM2-135M and BBC News.

    python bench/gpu.py                                   # cpu:float32, cuda:bfloat16, cuda:float32
    python bench/gpu.py --placements cpu:float32 cpu:bfloat16 --lora-steps 4 --facts 1   # quick

Each job runs under `lfm.core.placement.placed(device, dtype)`, as `--device` and `--dtype` set
it on the CLI, once per placement, with the same seeds and data:

- lora: LoRA (paper config) on BBC News label words, `--shots` articles per class, `--lora-steps`
  AdamW steps; accuracy on a fixed held-out subset. Training keeps float32 master weights and
  autocasts to the dtype.
- rome: the covariance statistics at the edited layer (`--stats-tokens` BBC tokens, float64),
  then ROME on the first `--facts` facts the float32 model knows; efficacy, paraphrase and
  neighbourhood (CounterFact), seconds per edit. The weights are in the dtype.
- ties: TIES (density 0.2) of three task vectors on every weight of the model (Gaussian, 1 % of
  each tensor's scale, drawn on the CPU from fixed seeds), in the dtype on the device; seconds,
  and the held-out perplexity of the merged model.
- distill: `lm_student` (every 3rd block, KD + LM) for `--distill-steps` steps; the student's
  held-out perplexity.
- spread: the model loaded with `device_map="auto"` and half of its weights' bytes as the
  device's budget (`max_memory`; on the CPU the rest goes to disk, on a GPU to the CPU); the
  largest difference of its next-token log-probabilities on 16 held-out blocks from the model
  loaded whole on the device, the seconds of those 16 rows, and the share of modules placed off
  the device.
- maml: `lfm meta train` on the sinusoid job (`lfm.meta.recipes.train`, 5 shots, `--maml-steps`
  meta-updates), meta-tested on 200 held-out tasks: the mse. The parameters, meta-gradients and
  Adam stay float32; the dtype is the forward passes' autocast.

The table gives each figure per placement and each time with its speed-up over the first
placement. `--json F` writes everything.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from lfm.assets import load_dataset, load_model
from lfm.core import placement
from lfm.core.train import TrainConfig
from lfm.distill.lm import LMStudentConfig, lm_student, perplexity, token_blocks
from lfm.edit.facts import evaluate_fact, known_facts, load_facts, summarise
from lfm.edit.site import default_layer
from lfm.edit.stats import compute_second_moments
from lfm.registry import get
from lfm.reuse import merge_state_dicts
from lfm.tuning.tasks import TextClassification, bbc_verbalizer, few_shot, held_out


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--placements", nargs="+", default=["cpu:float32", "cuda:bfloat16", "cuda:float32"],
        help="DEVICE:DTYPE, in order; speed-ups are against the first",
    )  # fmt: skip
    p.add_argument(
        "--jobs", nargs="+", default=["lora", "rome", "ties", "distill", "spread", "maml"]
    )
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--lora-steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-per-class", type=int, default=10)
    p.add_argument("--max-chars", type=int, default=400)
    p.add_argument("--facts", type=int, default=5, help="ROME edits (facts the model knows)")
    p.add_argument("--stats-tokens", type=int, default=20_000)
    p.add_argument("--distill-steps", type=int, default=40)
    p.add_argument("--maml-steps", type=int, default=300, help="MAML meta-updates (sinusoid)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", default=None, help="write every figure to this file")
    return p.parse_args()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def lora(a, data, device: str, dtype: str) -> dict:
    verb = bbc_verbalizer(data.classes, a.max_chars)
    train = TextClassification(*few_shot(data, a.shots, 0), verb)
    ev = TextClassification(*held_out(data, a.eval_per_class), verb)
    with placement.placed(device, dtype, training=True):
        handle = load_model(a.model)
        spec = get("lora", area="tuning")
        cfg = spec.config()
        tcfg = TrainConfig(steps=a.lora_steps, lr=cfg.lr, seed=0, progress=False)
        res, secs = _timed(
            lambda: spec.fn(
                handle,
                train,
                cfg,
                train_cfg=tcfg,
                eval_data=ev,
                seed=0,
                batch_size=a.batch_size,
                inplace=True,
            )
        )
    hist = res.history
    return {"acc": 100 * res.metrics["acc"], "loss_first": hist[0], "loss_last": hist[-1],
            "s": secs}  # fmt: skip


def rome(a, facts, device: str, dtype: str) -> dict:
    with placement.placed(device, dtype):
        handle = load_model(a.model)
        layer = default_layer(handle.model)
        data = load_dataset("bbc-news")
        cov, stats_s = _timed(
            lambda: compute_second_moments(
                handle.model, handle.tokenizer, [layer], data.train_texts, a.stats_tokens, 256
            )[layer]
        )
        spec = get("edit/rome")
        cfg = spec.config(stats_tokens=a.stats_tokens)
        rows, secs = [], 0.0
        for f in facts:
            patch, s = _timed(lambda f=f: spec.fn(handle, f.request, cfg, cov=cov))
            secs += s
            undo = patch.apply(handle.model)
            rows.append(evaluate_fact(handle, f))
            undo.revert(handle.model)
    m = summarise(rows)
    return {"efficacy": m["efficacy"], "paraphrase": m["paraphrase"],
            "neighbourhood": m["neighbourhood"], "stats_s": stats_s,
            "s_per_edit": secs / len(facts)}  # fmt: skip


def _task_vectors(base: dict[str, torch.Tensor], n: int = 3) -> list[dict[str, torch.Tensor]]:
    out = []
    for seed in range(1, n + 1):
        g = torch.Generator().manual_seed(seed)
        out.append({k: v + 0.01 * v.float().std().nan_to_num(0.0) * torch.randn(v.shape, generator=g)
                    for k, v in base.items()})  # fmt: skip
    return out


def ties(a, test_blocks, device: str, dtype: str) -> dict:
    base_cpu = {k: v.float() for k, v in load_model(a.model).model.state_dict().items()}
    tvs = _task_vectors(base_cpu)
    with placement.placed(device, dtype):
        handle = load_model(a.model)
        at = placement.current()

        def put(sd):
            return {k: v.to(at.device, at.dtype) for k, v in sd.items()}

        base, sds = put(base_cpu), [put(sd) for sd in tvs]
        merged, secs = _timed(lambda: merge_state_dicts("ties", base, sds, {"density": 0.2}))
        handle.model.load_state_dict(merged)
        ppl = perplexity(handle.model, test_blocks)
    return {"ppl": ppl, "s": secs}


def distill(a, data, device: str, dtype: str) -> dict:
    with placement.placed(device, dtype, training=True):
        teacher = load_model(a.model)
        train = token_blocks(teacher.tokenizer, data.train_texts, a.block_size,
                             a.distill_steps * a.batch_size)  # fmt: skip
        test = token_blocks(teacher.tokenizer, data.test_texts, a.block_size, a.eval_blocks)
        cfg = LMStudentConfig(every=3, block_size=a.block_size, batch_size=a.batch_size)
        tcfg = TrainConfig(steps=a.distill_steps, lr=5e-4, seed=0, progress=False)
        res, secs = _timed(lambda: lm_student(teacher, None, train, cfg, train_cfg=tcfg))
        ppl = perplexity(res.student, test)
    return {"ppl": ppl, "s": secs}


def spread(a, test_blocks, device: str, dtype: str) -> dict:
    whole = load_model(a.model, device=device, dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    here: Any = "cpu"
    if device.startswith("cuda"):  # a GPU's budget is keyed by its index
        here = torch.device(device).index or 0
    budget = {here: size // 2} if here == "cpu" else {here: size // 2, "cpu": 4 * size}
    with tempfile.TemporaryDirectory() as off:
        spread = load_model(a.model, dtype=dtype, device_map="auto", max_memory=budget,
                            offload_folder=off)  # fmt: skip
        rows = [b.tolist() for b in test_blocks]
        texts = [whole.decode(r) for r in rows]
        want = whole.next_token_logprobs(texts)
        got, secs = _timed(lambda: spread.next_token_logprobs(texts))
    from lfm.access import _backend

    where = list(_backend(spread).model.hf_device_map.values())
    off_device = sum(w != here for w in where) / len(where)
    return {"max_abs_diff": float((want - got.to(want.device)).abs().max()), "s": secs,
            "share_off_device": off_device}  # fmt: skip


def maml(a, device: str, dtype: str) -> dict:
    from lfm.meta import recipes

    with placement.placed(device, dtype, training=True), tempfile.TemporaryDirectory() as root:
        done, secs = _timed(
            lambda: recipes.train(
                "maml", "sinusoid", steps=a.maml_steps, test_tasks=200, root=root, ckpt_every=0
            )
        )
    return {"mse": done.score["mean"], "s": secs}


def warm_up(a, device: str, dtype: str) -> float:
    """Untimed: the accelerator's context, its matmul libraries and the dtype's kernels are made
    by three forward and backward passes of the model, so that the first job's time is its own."""
    t0 = time.perf_counter()
    with placement.placed(device, dtype, training=True) as at:
        model = load_model(a.model).model
        ids = torch.randint(0, model.config.vocab_size, (a.batch_size, a.block_size)).to(at.device)
        for _ in range(3):
            with placement.autocast(at.device):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
    _sync()
    return time.perf_counter() - t0


def main() -> None:
    a = _args()
    if a.threads:
        torch.set_num_threads(a.threads)
    data, test_blocks, facts = None, None, []
    if set(a.jobs) - {"maml"}:  # MAML's sinusoid needs neither the model nor the articles
        data = load_dataset("bbc-news")
        tok = load_model(a.model).tokenizer
        test_blocks = token_blocks(tok, data.test_texts, a.block_size, a.eval_blocks)
    if "rome" in a.jobs:
        facts = known_facts(load_model(a.model), load_facts())[: a.facts]
    results: dict[str, dict[str, dict]] = {}
    labels = _labels(a.placements)
    for spec, label in zip(a.placements, labels, strict=True):
        device, _, dtype = spec.partition(":")
        results[label] = {}
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"{label}: skipped, this machine has no CUDA device", flush=True)
            continue
        if device.startswith("cuda") and set(a.jobs) - {"maml"}:
            print(f"{label} warm-up: {warm_up(a, device, dtype):.1f} s (not counted)", flush=True)
        for job in a.jobs:
            t0 = time.perf_counter()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            try:
                if job == "lora":
                    r = lora(a, data, device, dtype)
                elif job == "rome":
                    r = rome(a, facts, device, dtype)
                elif job == "ties":
                    r = ties(a, test_blocks, device, dtype)
                elif job == "maml":
                    r = maml(a, device, dtype)
                elif job == "spread":
                    r = spread(a, test_blocks, device, dtype)
                else:
                    r = distill(a, data, device, dtype)
            except Exception:  # one broken path must not hide the others' figures
                print(f"{label} {job} FAILED:\n{traceback.format_exc()}", flush=True)
                continue
            if device.startswith("cuda"):
                r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            results[label][job] = r
            shown = ", ".join(f"{k} {v:.4g}" for k, v in r.items())
            print(f"{label} {job}: {shown} ({time.perf_counter() - t0:.0f} s in all)", flush=True)
    _table(a.jobs, labels, results)
    if a.json:
        env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}  # fmt: skip
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "env": env, "results": results}, fh, indent=1)


def _labels(placements: list[str]) -> list[str]:
    """Each placement's name, a repeat numbered ("cuda:bfloat16 #2"): the first placement on a
    device pays its one-time costs (the context, lazy imports, kernel selection) inside its
    first jobs, so a placement given again shows the device's times without them."""
    seen: dict[str, int] = {}
    out = []
    for spec in placements:
        seen[spec] = seen.get(spec, 0) + 1
        out.append(spec if seen[spec] == 1 else f"{spec} #{seen[spec]}")
    return out


def _table(jobs: list[str], labels: list[str], results: dict[str, dict[str, dict]]) -> None:
    first = labels[0]
    print(f"\n| job | figure | {' | '.join(labels)} |")
    print("|---|---|" + "---|" * len(labels))
    for job in jobs:
        for key in results[first].get(job, {}):
            cells = []
            for label in labels:
                v = results[label].get(job, {}).get(key, float("nan"))
                if key == "s" or key.endswith("_s") or key.startswith("s_"):
                    ratio = results[first][job][key] / max(v, 1e-9)
                    cells.append(f"{v:.2f} ({ratio:.1f}×)")
                else:
                    cells.append(f"{v:.4g}")
            print(f"| {job} | {key} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
