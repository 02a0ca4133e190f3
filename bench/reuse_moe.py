"""Benchmark: MoE upcycling of two SmolLM2-135M experts beside the base, the experts and task
arithmetic.

Two experts are fine-tuned from SmolLM2-135M (their MLPs only, full fine-tuning of those weights,
AdamW, `--steps` steps of 4 articles cut to 128 tokens) on BBC News topic groups: business +
politics (task A) and sports + entertainment (task B). Then, per task, the held-out perplexity
(`--n-eval` test articles per task, 128 tokens each) of the base, each expert, their task-arithmetic
merge (λ = 1, through `lfm.registry.run("reuse/task_arithmetic", ...)`) and the Mixtral MoE built
by `lfm.reuse.moe.upcycle_folder` (2 experts, top-2; routers from the first 8 training articles of
each task, cut to 400 characters: `hidden`, `random` and `train` gates). The routing accuracy is
the share of (token, layer) pairs of the held-out articles whose first expert is their task's.
The hidden-gate folder is loaded again with plain `transformers.AutoModelForCausalLM` and
generates a sentence.

    .venv/bin/python bench/reuse_moe.py [--threads 1] [--steps 12] [--seed 0] [--n-eval 6]
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

GROUPS = {"A (business+politics)": ("business", "politics"),
          "B (sports+entertainment)": ("sports", "entertainment")}  # fmt: skip
MAX_TOKENS = 128


def texts_of(data, split: str, classes: tuple[str, ...]) -> list[str]:
    """The articles of a split whose class is one of `classes`, classes interleaved."""
    texts, labels = (data.train_texts, data.y_train) if split == "train" else (data.test_texts,
                                                                               data.y_test)  # fmt: skip
    ids = [data.classes.index(c) for c in classes]
    per = [[t for t, y in zip(texts, labels.tolist(), strict=True) if y == i] for i in ids]
    return [t for row in zip(*per, strict=False) for t in row]


def batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    return tok(texts, return_tensors="pt", truncation=True, max_length=MAX_TOKENS, padding=True)


def fine_tune(base, tok, texts: list[str], steps: int, seed: int):
    """A copy of `base` whose MLP weights are trained on `texts` (next-token loss)."""
    model = copy.deepcopy(base).train()
    params = [p for n, p in model.named_parameters() if ".mlp." in n]
    for n, p in model.named_parameters():
        p.requires_grad_(".mlp." in n)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(len(texts), (4,), generator=g).tolist()
        b = batch(tok, [texts[i] for i in pick])
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model(**b, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def perplexity(model, tok, texts: list[str]) -> float:
    """exp of the mean next-token loss over every token of `texts` (one text per pass)."""
    total, count = 0.0, 0
    for t in texts:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)["input_ids"]
        n = ids.shape[1] - 1
        total += float(model(input_ids=ids, labels=ids).loss) * n
        count += n
    return math.exp(total / count)


def save(model, tok, folder: Path) -> Path:
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from lfm import registry
    from lfm.access import LocalModel
    from lfm.assets import load_dataset
    from lfm.assets.models import load_model
    from lfm.reuse.moe import MoePlan, model_folder, routing_accuracy, upcycle_folder

    clock = {"start": time.perf_counter()}
    handle = load_model("smollm2-135m")
    base, tok = handle.model, handle.tokenizer
    base_dir = model_folder("smollm2-135m", Path("."), "base")
    data = load_dataset("bbc-news")
    train = {k: texts_of(data, "train", v) for k, v in GROUPS.items()}
    test = {k: texts_of(data, "test", v)[: args.n_eval] for k, v in GROUPS.items()}
    clock["load"] = time.perf_counter()

    experts = [fine_tune(base, tok, train[k], args.steps, args.seed + i) for i, k in
               enumerate(GROUPS)]  # fmt: skip
    clock["fine-tune"] = time.perf_counter()

    work = Path(tempfile.mkdtemp(prefix="lfm-bench-moe-"))
    dirs = [save(m, tok, work / f"expert{i}") for i, m in enumerate(experts)]
    prompts = [[t[:400] for t in train[k][:8]] for k in GROUPS]
    plan = {"base_model": str(base_dir), "gate_mode": "hidden",
            "experts": [{"source_model": str(d), "positive_prompts": p}
                        for d, p in zip(dirs, prompts, strict=True)]}  # fmt: skip
    (work / "plan.yaml").write_text(yaml.safe_dump(plan))
    done = upcycle_folder(MoePlan.load(work / "plan.yaml"), work / "moe", progress=False)
    clock["upcycle (hidden, to disk)"] = time.perf_counter()

    merged = copy.deepcopy(base)
    ta = registry.run("reuse/task_arithmetic", experts, base=base, cfg={"scale": 1.0})
    merged.load_state_dict(ta)
    models = {"base": base, "expert A": experts[0], "expert B": experts[1],
              "task arithmetic": merged, "MoE hidden": load_model(done.out).model}  # fmt: skip
    for mode in ("random", "train"):
        moe = registry.run("reuse/moe_upcycle", LocalModel(base, tok), experts, prompts,
                           cfg={"gate_mode": mode, "seed": args.seed})  # fmt: skip
        models[f"MoE {mode}"] = moe.model
    clock["merge + random/train MoE"] = time.perf_counter()

    rows = {name: [perplexity(m, tok, test[k]) for k in GROUPS] for name, m in models.items()}
    held = [test[k] for k in GROUPS]
    routing = {n: routing_accuracy(LocalModel(m, tok), held) for n, m in models.items()
               if n.startswith("MoE")}  # fmt: skip
    clock["evaluate"] = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(done.out)
    ptok = AutoTokenizer.from_pretrained(done.out)
    ids = ptok("The prime minister said on Tuesday that", return_tensors="pt")
    gen = plain.generate(**ids, max_new_tokens=20, do_sample=False)
    sentence = ptok.decode(gen[0], skip_special_tokens=True)
    shutil.rmtree(work)  # the experts and the MoE: about 2.5 GB

    names = list(GROUPS)
    print(f"\nSmolLM2-135M, {args.steps} MLP fine-tuning steps per expert, seed {args.seed}, "
          f"{args.threads} thread(s); held-out perplexity, {args.n_eval} articles per task "
          f"({MAX_TOKENS} tokens)\n")  # fmt: skip
    print(f"| model | {names[0]} | {names[1]} | mean | routing accuracy |")
    print("|---|---|---|---|---|")
    for name, (a, b) in rows.items():
        r = f"{routing[name]:.2f}" if name in routing else ""
        print(f"| {name} | {a:.2f} | {b:.2f} | {(a + b) / 2:.2f} | {r} |")
    print(f"\n{type(plain).__name__} from {done.out.name}/ ({plain.config.num_local_experts} "
          f"experts, top-{plain.config.num_experts_per_tok}): {sentence!r}")  # fmt: skip
    stamps = list(clock.items())
    print("seconds: " + ", ".join(f"{k} {t - stamps[i][1]:.0f}" for i, (k, t) in
                                  enumerate(stamps[1:])))  # fmt: skip


if __name__ == "__main__":
    main()
