"""`lfm tuning train` / `lfm tuning sft`: gradient-based tuning, a thin layer over `lfm.tuning`.

These are plain functions with typer options; `lfm/cli/tuning.py` mounts them with
`app.command("train")(tuning_peft.train)` and `app.command("sft")(tuning_peft.sft)`. Under a
multi-process launch only the main process creates the run directory, saves and reports.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import typer

from lfm.core.train import TrainConfig, run_on_main

CLASSIFY_TASKS = ("bbc",)


def _config(values: dict) -> dict:
    """The command's arguments as a JSON-ready config (paths as strings, `resume` left out)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k != "resume"}


def train(
    method: str = typer.Option(
        "lora", help="full-ft, bitfit, lp-ft, lora, dora, ia3, prompt-tuning, prefix-tuning"
    ),
    model: str = typer.Option(
        "smollm2-135m", help="a causal LM (label words) or an encoder (new head)"
    ),
    task: str = typer.Option("bbc", help="classification task: bbc (BBC News, 5 topics)"),
    shots: int = typer.Option(16, help="training examples per class"),
    steps: int = typer.Option(30, help="optimizer steps"),
    batch_size: int = typer.Option(4),
    lr: float = typer.Option(0.0, help="learning rate; 0 takes the method's paper default"),
    head_lr: float = typer.Option(1e-3, help="learning rate of an encoder's new head"),
    grad_accum: int = typer.Option(1, help="micro-batches per optimizer step"),
    eval_per_class: int = typer.Option(10, help="held-out articles per class to evaluate on"),
    eval_every: int = typer.Option(0, help="evaluate every N steps (0: at the end)"),
    max_chars: int = typer.Option(400, help="articles are cut to this many characters"),
    seed: int = typer.Option(0),
    ckpt_every: int = typer.Option(0, help="checkpoint every N steps (0: never)"),
    threads: int = typer.Option(2, help="torch CPU threads"),
    root: Path = typer.Option(Path("runs"), help="where run directories are created"),
    resume: Path | None = typer.Option(None, help="a run directory to resume"),
) -> None:
    """Few-shot classification with a tuning method, into a run directory (adapter or weights)."""
    from lfm.assets import load_dataset, load_model
    from lfm.tuning.classify import accuracy_fn, class_batches
    from lfm.tuning.tasks import bbc_verbalizer, few_shot
    from lfm.tuning.trainer import classifier, method_config, save_tuned, trainable_parameters, tune

    if task not in CLASSIFY_TASKS:
        raise typer.BadParameter(
            f"unknown task {task!r}; choose one of {', '.join(CLASSIFY_TASKS)}"
        )
    config = _config(locals())
    torch.set_num_threads(threads)
    data, handle = load_dataset("bbc-news"), load_model(model)
    verb = bbc_verbalizer(data.classes)
    is_lm = (
        handle.model.get_output_embeddings() is not None
        if hasattr(handle.model, "get_output_embeddings")
        else False
    )
    text = (
        (lambda t: verb.template.format(text=t[:max_chars].strip()))
        if is_lm
        else (lambda t: t[:max_chars])
    )
    cfg = method_config(method)
    clf = classifier(
        handle,
        method,
        cfg,
        label_words=verb.label_words if is_lm else None,
        n_classes=len(data.classes),
        seed=seed,
    )
    texts, y = few_shot(data, shots, seed)
    batches = class_batches(handle.tokenizer, [text(t) for t in texts], y, batch_size, seed)
    idx = [
        i
        for c in range(len(data.classes))
        for i in (data.y_test == c).nonzero().flatten()[:eval_per_class].tolist()
    ]
    ev = class_batches(
        handle.tokenizer, [text(data.test_texts[i]) for i in idx], data.y_test[idx], 8
    )
    acc = accuracy_fn(ev)
    tcfg = TrainConfig(
        steps=steps,
        lr=lr or cfg.lr,
        grad_accum=grad_accum,
        eval_every=eval_every,
        seed=seed,
        ckpt_every=ckpt_every,
    )  # type: ignore[attr-defined]
    run = run_on_main(f"tune-{method}", config, root=root, path=resume)
    with run or nullcontext():
        before = acc(clf) if is_lm else None  # an encoder's new head has no zero-shot accuracy
        if run is not None:
            run.log(trainable_parameters=trainable_parameters(clf), zero_shot_acc=before)
        hist = tune(
            clf, batches, cfg, tcfg, run=run, evaluate=lambda m: {"acc": acc(m)}, head_lr=head_lr
        )
        if run is not None:
            with run.output("tuned") as tmp:
                save_tuned(clf, tmp)
            run.log(acc=hist.evals[-1]["acc"])
    if run is None:
        return  # another process of a multi-process launch; the main one reports
    start = "" if before is None else f"{before:.3f} (zero-shot) -> "
    typer.echo(
        f"{method} on {model}: accuracy {start}{hist.evals[-1]['acc']:.3f} "
        f"({trainable_parameters(clf):,} trainable) -> {run.path}"
    )


def sft(
    method: str = typer.Option(
        "lora", help="a tuning method (lora, dora, ia3, prompt-tuning, full-ft, ...)"
    ),
    model: str = typer.Option("smollm2-135m", help="a causal LM with a chat template"),
    data: Path | None = typer.Option(
        None, help="JSONL of {prompt, response}; default: the packaged set"
    ),
    steps: int = typer.Option(30),
    batch_size: int = typer.Option(4),
    lr: float = typer.Option(0.0, help="learning rate; 0 takes the method's paper default"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(2),
    root: Path = typer.Option(Path("runs")),
    resume: Path | None = typer.Option(None, help="a run directory to resume"),
) -> None:
    """Instruction tuning (loss on the responses only) into a run directory."""
    from lfm.assets import load_model
    from lfm.tuning.sft import load_instructions, render, sft_batches, sft_loss
    from lfm.tuning.trainer import apply_method, method_config, save_tuned, tune

    config = _config(locals())
    torch.set_num_threads(threads)
    handle = load_model(model, kind="causal-lm")
    rows, cfg = load_instructions(data), method_config(method)
    lm = apply_method(handle.model, method, cfg)
    batches = sft_batches(handle.tokenizer, rows, batch_size, seed)
    run = run_on_main(f"sft-{method}", config, root=root, path=resume)
    with run or nullcontext():
        hist = tune(
            lm,
            batches,
            cfg,
            TrainConfig(steps=steps, lr=lr or cfg.lr, seed=seed),
            run=run,
            loss_fn=sft_loss,
        )  # type: ignore[attr-defined]
        if run is None:
            return  # another process of a multi-process launch; the main one saves and reports
        with run.output("tuned") as tmp:
            save_tuned(lm, tmp)
        handle.model = lm.eval()
        answer = handle.generate([render(handle.tokenizer, rows[0]["prompt"])], max_new_tokens=20)[
            0
        ]
        run.log(final_loss=hist.losses[-1], sample=answer)
    typer.echo(
        f"loss {hist.losses[0]:.3f} -> {hist.losses[-1]:.3f}; {rows[0]['prompt']!r} -> {answer!r}; {run.path}"
    )
