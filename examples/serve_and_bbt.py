"""Serve a model at EMBEDDINGS access on loopback, then tune a soft prompt through the API (BBT).

    .venv/bin/python examples/serve_and_bbt.py                 # a tiny model built in code, seconds
    .venv/bin/python examples/serve_and_bbt.py --real          # SmolLM2-135M on BBC News, minutes

The same `bbt(...)` call runs on `narrow(model, "embeddings")`; here it runs on a `RemoteModel`,
so every model access crosses HTTP and is counted against a query budget.
"""

from __future__ import annotations

import argparse

import torch

from lfm.serve import Backend, Budget, RemoteModel, ServeSettings, build_app
from lfm.serve.thread import running
from lfm.tuning.bbt import BBTConfig, bbt
from lfm.tuning.tasks import TextClassification, accuracy


def task(real: bool):
    """(model, few-shot task) for the tiny or the real setting."""
    if not real:
        from lfm.tuning.tiny import tiny_news_lm, tiny_task

        return tiny_news_lm(0), tiny_task()
    from lfm.assets import load_dataset, load_model
    from lfm.tuning.tasks import bbc_verbalizer, few_shot

    data = load_dataset("bbc-news")
    verb = bbc_verbalizer(data.classes, max_chars=200)
    return load_model("smollm2-135m"), TextClassification(*few_shot(data, 2, seed=0), verb)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--real", action="store_true", help="SmolLM2-135M on BBC News (slow on a CPU)")
    p.add_argument("--calls", type=int, default=60, help="HTTP call budget")
    a = p.parse_args()
    torch.set_num_threads(1)
    model, train = task(a.real)
    app = build_app(Backend(model, "embeddings"), ServeSettings(api_key="demo-key"))
    with running(app) as url:
        remote = RemoteModel(
            url, api_key="demo-key", access="embeddings", budget=Budget(calls=a.calls)
        )
        cfg = BBTConfig(n_tokens=5, intrinsic_dim=50, popsize=10, budget=41)
        res = bbt(remote, train, cfg, seed=0)
        print(f"BBT loss {res.start_loss:.4f} -> {res.best_loss:.4f} in {res.evaluations} evaluations"
              f" ({remote.calls} HTTP calls, stopped: {res.stopped})")  # fmt: skip
        acc = accuracy(res.scores(remote, list(train.texts)), train.labels)
        print(f"train accuracy with the tuned soft prompt: {acc:.3f}")


if __name__ == "__main__":
    main()
