"""LM distillation from a teacher that sends only its top-k log-probabilities, at one budget.

    .venv/bin/python bench/distill_served.py --steps 30 --threads 1              # CPU, ~40 min

SmolLM2-135M teaches a student cut from it (10 of 30 blocks, `--every 3`), on BBC News training
blocks; every student starts from the same saved weights and sees the same blocks in the same
order (steps, lr, seed). Variants, each trained in its own process so that its peak memory (max
RSS) is its own:

- `lm_only`: the LM loss alone (no teacher);
- `full`: KD on the full next-token distribution + LM loss (weights 5 : 2, T = 1), teacher loaded;
- `topk5`: `distill/topk_lm` with the teacher's top 5 (the rest of its mass spread evenly over
  the other tokens: `tail="uniform"`, the default), teacher loaded locally;
- `served20`: `distill/topk_lm` with the top 20 from `lfm serve --access scores --top-k 20` in
  another process (token ids over HTTP); the training process never loads the teacher;
- `cache20`: the top 20 saved first by `lfm distill cache` (another process), then read from the
  file: no teacher anywhere while the student trains;
- `gkd20`: `distill/gkd` (λ = 0.5, β = `--beta`, 0: forward KL) against the same server;
- `gkd20_warm`: the first half of the steps as `served20`, the second half `gkd20` (GKD from a
  student that already writes text, as the paper starts from a supervised one); not in the
  default list;
- `fitnets`, `fitnets_served`: FitNets' hint (`distill/fitnets`, weight `--hint-weight`) from the
  teacher block the student's middle block was copied from, + the LM loss (weight 2), the
  teacher's hidden states from the local model narrowed to HIDDEN, or from
  `lfm serve --access hidden` in another process (token ids over HTTP); not in the default list.

Prints held-out perplexity (BBC test blocks), time, peak RSS and, for the served runs, the HTTP
calls; and the ratio of each perplexity to `full`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("lm_only", "full", "topk5", "served20", "cache20", "gkd20")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--beta", type=float, default=0.0, help="GKD's β (0: forward KL)")
    p.add_argument("--hint-weight", type=float, default=1e-3, help="fitnets: the hint's weight")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    return p.parse_args()


def _blocks(tok, a):
    from lfm.distill.recipes import lm_blocks

    return lm_blocks(tok, None, a.block_size, a.steps * a.batch_size, a.eval_blocks, a.batch_size)


def _one(a) -> dict:
    """One variant in this process: train, measure, return the figures."""
    import torch

    from lfm.access import narrow
    from lfm.assets import load_model
    from lfm.core.train import TrainConfig, shuffled_batches, train
    from lfm.distill.lm import LMStudentConfig, make_loss_fn, perplexity
    from lfm.distill.served import TopKCache
    from lfm.registry import run

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    student = load_model(str(work / "student0"), kind="causal-lm")
    train_blocks, test_blocks = _blocks(student.tokenizer, a)
    t_cfg = TrainConfig(steps=a.steps, lr=a.lr, seed=a.seed, progress=False)
    start, info = time.perf_counter(), {}
    teacher = None
    if a.one in ("full", "topk5", "fitnets"):
        teacher = load_model(a.model, kind="causal-lm")
    if a.one in ("lm_only", "full"):
        cfg = LMStudentConfig(temperature=1.0, batch_size=a.batch_size, block_size=a.block_size,
                              kd_weight=0.0 if a.one == "lm_only" else 5.0)  # fmt: skip
        batches = shuffled_batches(train_blocks, batch_size=a.batch_size, seed=a.seed)
        model = teacher.model if teacher is not None else None
        train(student.model, make_loss_fn(model, cfg), batches, t_cfg)
    elif a.one.startswith("fitnets"):
        from lfm.core.layouts import num_layers
        from lfm.distill import distill
        from lfm.distill.lm import kept_blocks

        middle = num_layers(student.model) // 2
        pair = (f"model.layers.{middle}", f"model.layers.{kept_blocks(30, a.every)[middle]}")
        if a.one == "fitnets":
            handle = narrow(teacher, "hidden")
        else:
            from lfm.serve import RemoteModel

            handle = RemoteModel(a.url, access="hidden")
        batches = shuffled_batches(train_blocks, batch_size=a.batch_size, seed=a.seed)
        distill(handle, student.model, batches, [("fitnets", a.hint_weight, None, *pair)],
                train_cfg=t_cfg, label_weight=2.0)  # fmt: skip
        if a.one == "fitnets_served":
            info = {"http_calls": handle.calls}
    elif a.one == "topk5":
        run("distill/topk_lm", narrow(teacher, "scores"), student.model, train_blocks,
            cfg={"k": 5, "batch_size": a.batch_size}, train_cfg=t_cfg)  # fmt: skip
    elif a.one == "cache20":
        cache = TopKCache(work / "top20.npz")
        run("distill/topk_lm", cache, student.model, train_blocks,
            cfg={"k": 20, "batch_size": a.batch_size}, train_cfg=t_cfg)  # fmt: skip
    else:
        from lfm.serve import RemoteModel

        remote = RemoteModel(a.url)
        cfg = {"k": 20, "batch_size": a.batch_size}
        if a.one == "gkd20_warm":  # topk_lm on the first half of the blocks, then GKD
            half = a.steps // 2
            warm = t_cfg.model_copy(update={"steps": half})
            run("distill/topk_lm", remote, student.model, train_blocks[: half * a.batch_size],
                cfg=cfg, train_cfg=warm)  # fmt: skip
            t_cfg = t_cfg.model_copy(update={"steps": a.steps - half})
            train_blocks = train_blocks[half * a.batch_size :]
        method = "distill/topk_lm" if a.one == "served20" else "distill/gkd"
        if method == "distill/gkd":  # forward KL: JSD(0.5) seeks modes and wrecks perplexity
            cfg["beta"] = a.beta
        res = run(method, remote, student.model, train_blocks, cfg=cfg, train_cfg=t_cfg)
        info = {"http_calls": remote.calls, **res.info}
    seconds = time.perf_counter() - start
    ppl = perplexity(student.model, test_blocks)
    out = {"variant": a.one, "student_ppl": ppl, "train_s": seconds,
           "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info}  # fmt: skip
    if teacher is not None:
        out["teacher_ppl"] = perplexity(teacher.model, test_blocks)
    return out


def _common(a) -> list[str]:
    return ["--model", a.model, "--every", str(a.every), "--steps", str(a.steps), "--block-size",
            str(a.block_size), "--batch-size", str(a.batch_size), "--lr", str(a.lr),
            "--eval-blocks", str(a.eval_blocks), "--seed", str(a.seed), "--threads",
            str(a.threads), "--beta", str(a.beta), "--hint-weight", str(a.hint_weight)]  # fmt: skip


def _prepare(a, work: Path) -> None:
    """The starting student (cut from the teacher, saved once) and the teacher's cache."""
    import torch

    from lfm.assets import load_model
    from lfm.distill.lm import student_from_teacher

    torch.set_num_threads(a.threads)
    teacher = load_model(a.model, kind="causal-lm")
    student = student_from_teacher(teacher.model, a.every)
    student.save_pretrained(work / "student0")
    teacher.tokenizer.save_pretrained(work / "student0")
    del teacher, student


def _serve(a, work: Path, access: str = "scores") -> tuple[subprocess.Popen, str]:
    from lfm.serve.thread import free_port, wait_healthy

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    with open(work / "serve.log", "w") as log:  # the child keeps its own copy of the handle
        proc = subprocess.Popen(
            [sys.executable, "-c", "import lfm.cli; lfm.cli.main()", "serve", "--model", a.model,
             "--access", access, *(["--top-k", "20"] if access == "scores" else []),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, work / "serve.log")
    return proc, url


def _run_variant(a, work: Path, name: str, url: str | None) -> dict:
    cmd = [sys.executable, __file__, *_common(a), "--one", name, "--work", str(work)]
    if url:
        cmd += ["--url", url]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    a = _args()
    if a.one:
        print(json.dumps(_one(a)))
        return
    wanted = [v for v in a.variants.split(",") if v]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _prepare(a, work)
        rows, server, url, hidden, hidden_url = [], None, None, None, None
        if "cache20" in wanted:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-c", "import lfm.cli; lfm.cli.main()", "distill", "cache",
                   "--model", a.model, "--top-k", "20", "--steps", str(a.steps), "--block-size",
                   str(a.block_size), "--batch-size", str(a.batch_size), "-o",
                   str(work / "top20.npz"), "--threads", str(a.threads)]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
            size = (work / "top20.npz").stat().st_size / 2**20
            print(f"cache: top 20 of {a.steps * a.batch_size} blocks, {size:.2f} MiB, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        try:
            if {"served20", "gkd20", "gkd20_warm"} & set(wanted):
                server, url = _serve(a, work)
            if "fitnets_served" in wanted:
                hidden, hidden_url = _serve(a, work, "hidden")
            for name in wanted:
                there = hidden_url if name == "fitnets_served" else url
                rows.append(_run_variant(a, work, name, there))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            for proc in (server, hidden):
                if proc is not None:
                    proc.terminate()
                    proc.wait()
    full = next((r["student_ppl"] for r in rows if r["variant"] == "full"), None)
    teacher = next((r["teacher_ppl"] for r in rows if "teacher_ppl" in r), None)
    print(f"\nSmolLM2-135M -> every {a.every}, {a.steps} steps x {a.batch_size} x {a.block_size} "
          f"tokens, lr {a.lr}; teacher perplexity {teacher}")  # fmt: skip
    print("| variant | student ppl | vs full | train s | peak RSS MiB | HTTP calls |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['student_ppl'] / full:.3f}" if full else "–"
        print(f"| {r['variant']} | {r['student_ppl']:.1f} | {ratio} | {r['train_s']:.0f} | "
              f"{r['max_rss_mib']:.0f} | {r.get('http_calls', '–')} |")  # fmt: skip


if __name__ == "__main__":
    main()
