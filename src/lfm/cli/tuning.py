"""`lfm tuning`: model tuning from the command line, a thin layer over `lfm.tuning.recipes`.

Each command parses its options, calls its recipe and prints the summary. The black-box commands
(bbt, prompt-search, opro, augment with REPLUG) run against a served model (`--url`) or a local asset
narrowed to the level the method needs; `classify` classifies again with what a run saved. Under
a multi-process launch only the main process of `train` and `sft` reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm.cli.common import Threads, finite, group, use_threads

app = group(
    "Model tuning: fine-tuning and adapters (train, sft), black-box prompt tuning (bbt, "
    "prompt-search, opro), retrieval augmentation (augment), and classifying with a run "
    "(classify)."
)

Root = Annotated[Path, typer.Option(help="where run directories are created")]
Resume = Annotated[Path | None, typer.Option(help="a run directory to resume")]
Steps = Annotated[int, typer.Option(help="optimizer steps (MeZO: zeroth-order steps)")]
Batch = Annotated[int, typer.Option(help="examples per micro-batch")]
Lr = Annotated[
    float,
    typer.Option(
        min=0.0, callback=finite, help="learning rate; 0 takes the method's paper default"
    ),
]
Seed = Annotated[int, typer.Option(help="seeds the data draw and the initialisations")]
TRAINERS = "full_ft, bitfit, lp_ft, wise_ft, lora, dora, ia3, prompt_tuning, prefix_tuning, mezo"
Data = Annotated[
    Path | None,
    typer.Option(dir_okay=False, help="your own examples: JSON lines, or CSV with a header row "
                 "(.csv); default: BBC News"),
]  # fmt: skip
TextField = Annotated[str, typer.Option(help="the field of --data holding the text")]
LabelField = Annotated[
    str, typer.Option(help="the field of --data holding the label (label words: the labels)")
]
Holdout = Annotated[
    float,
    typer.Option(callback=finite, help="held out of each class of --data for the accuracy: a "
                 "fraction in (0, 1), or k >= 2 for every k-th example"),
]  # fmt: skip


@app.command("train", placed="train")
def train(
    method: Annotated[str, typer.Option(help=f"a trained tuning method: {TRAINERS}")] = "lora",
    model: Annotated[str, typer.Option(help="a causal LM (label words) or an encoder (new head)")] = "smollm2-135m",
    task: Annotated[str, typer.Option(help="classification task: bbc (BBC News, 5 topics)")] = "bbc",
    data: Data = None, text_field: TextField = "text", label_field: LabelField = "label",
    holdout: Holdout = 0.2,
    shots: Annotated[int, typer.Option(help="training examples per class")] = 16,
    steps: Steps = 30,
    batch_size: Batch = 4,
    lr: Lr = 0.0,
    head_lr: Annotated[float, typer.Option(min=0.0, callback=finite, help="learning rate of an encoder's new head")] = 1e-3,
    grad_accum: Annotated[int, typer.Option(min=1, help="micro-batches per optimizer step")] = 1,
    eval_per_class: Annotated[int, typer.Option(min=0, help="held-out articles per class to evaluate on (0: all)")] = 10,
    eval_every: Annotated[int, typer.Option(min=0, help="evaluate every N steps (0: at the end)")] = 0,
    max_chars: Annotated[int, typer.Option(min=1, help="articles are cut to this many characters")] = 400,
    seed: Seed = 0,
    ckpt_every: Annotated[int, typer.Option(min=0, help="checkpoint every N steps (0: never)")] = 0,
    threads: Threads = 2,
    root: Root = Path("runs"),
    resume: Resume = None,
) -> None:  # fmt: skip
    """Few-shot classification with a tuning method, into a run directory (adapter or weights)."""
    from lfm.tuning import recipes

    use_threads(threads)
    out = recipes.classify(
        method, model, task=task, shots=shots, steps=steps, batch_size=batch_size, lr=lr,
        head_lr=head_lr, grad_accum=grad_accum, eval_per_class=eval_per_class,
        eval_every=eval_every, max_chars=max_chars, seed=seed, ckpt_every=ckpt_every,
        root=root, resume=resume, data=data, text_field=text_field, label_field=label_field,
        holdout=holdout,
    )  # fmt: skip
    if out is None:
        return  # another process of a multi-process launch; the main one reports
    start = "" if out["zero_shot_acc"] is None else f"{out['zero_shot_acc']:.3f} (zero-shot) -> "
    typer.echo(f"{out['method']} on {model}: accuracy {start}{out['acc']:.3f} on "
               f"{out['held_out']} held out ({out['trainable_parameters']:,} trainable) "
               f"-> {out['run']}")  # fmt: skip


@app.command("sft", placed="train")
def sft(
    method: Annotated[str, typer.Option(help=f"a trained tuning method: {TRAINERS}")] = "lora",
    model: Annotated[str, typer.Option(help="a causal LM with a chat template")] = "smollm2-135m",
    data: Annotated[Path | None, typer.Option(dir_okay=False, help="JSONL of {prompt, response}; default: the packaged set")] = None,
    steps: Steps = 30,
    batch_size: Batch = 4,
    lr: Lr = 0.0,
    seed: Seed = 0,
    threads: Threads = 2,
    root: Root = Path("runs"),
    resume: Resume = None,
) -> None:  # fmt: skip
    """Instruction tuning (loss on the responses only) into a run directory."""
    from lfm.tuning import recipes

    use_threads(threads)
    out = recipes.sft(method, model, data=data, steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed, root=root, resume=resume)  # fmt: skip
    if out is None:
        return
    typer.echo(f"loss {out['first_loss']:.3f} -> {out['final_loss']:.3f}; "
               f"{out['prompt']!r} -> {out['answer']!r}; {out['run']}")  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Black-box tuning: through a served model or a narrowed local one.

Url = Annotated[
    str | None, typer.Option(help="served model root (lfm serve); default: load --model")
]
Model = Annotated[str, typer.Option(help="model asset or folder, when no --url is given")]
Key = Annotated[str | None, typer.Option(help="API key of the served model", envvar="LFM_API_KEY")]
Shots = Annotated[int, typer.Option(min=1, help="training examples per class (paper: 16)")]
Calls = Annotated[
    int | None, typer.Option(min=1, help="HTTP call budget for --url (none: unlimited)")
]
Out = Annotated[
    Path | None, typer.Option("--out", "-o", help="also write the summary as JSON here")
]
MaxChars = Annotated[int, typer.Option(min=1, help="article cut in characters")]
Proposer = Annotated[
    str | None,
    typer.Option(help="a model that writes pool phrases from a few examples (asset or folder, "
                 "loaded here); default: none, the pool names the labels and holds generic "
                 "phrases"),
]  # fmt: skip


def _model(url: str | None, model: str, key: str | None, level: str, calls: int | None) -> Any:
    """A remote handle on `url` at `level`, or the model's name (the recipe loads and narrows it)."""
    if not url:
        return model
    from lfm.serve import Budget, RemoteModel

    return RemoteModel(url, api_key=key, access=level, budget=Budget(calls=calls))


def _report(result: dict[str, Any], out: Path | None) -> None:
    typer.echo(json.dumps(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))


@app.command("bbt", placed=True)
def bbt(
    url: Url = None, model: Model = "smollm2-135m", api_key: Key = None, shots: Shots = 16,
    budget: Annotated[int, typer.Option(min=1, help="CMA-ES evaluations (paper: 8000)")] = 8000,
    n_tokens: Annotated[int, typer.Option(min=1, help="soft-prompt length (paper: 50)")] = 50,
    dim: Annotated[int, typer.Option(min=1, help="intrinsic dimension d (paper: 500)")] = 500,
    max_chars: MaxChars = 1200, calls: Calls = None, seed: Seed = 0, root: Root = Path("runs"),
    out: Out = None, data: Data = None, text_field: TextField = "text",
    label_field: LabelField = "label", holdout: Holdout = 0.2, threads: Threads = 2,
    resume: Resume = None,
) -> None:  # fmt: skip
    """Black-Box Tuning (arXiv 2201.03514): CMA-ES over a projected soft prompt (EMBEDDINGS)."""
    from lfm.tuning import recipes

    use_threads(threads)
    handle = _model(url, model, api_key, "embeddings", calls)
    _report(recipes.bbt(handle, shots=shots, budget=budget, n_tokens=n_tokens, dim=dim,
                        max_chars=max_chars, seed=seed, root=root, data=data,
                        text_field=text_field, label_field=label_field, holdout=holdout,
                        resume=resume), out)  # fmt: skip


@app.command("prompt-search", placed=True)
def prompt_search(
    url: Url = None, model: Model = "smollm2-135m", api_key: Key = None, shots: Shots = 16,
    iterations: Annotated[int, typer.Option(min=1, help="search steps (GrIPS: 10)")] = 10,
    candidates: Annotated[int, typer.Option(min=1, help="candidates per step (GrIPS: 5)")] = 5,
    max_chars: MaxChars = 1200, calls: Calls = None, seed: Seed = 0, root: Root = Path("runs"),
    out: Out = None, data: Data = None, text_field: TextField = "text",
    label_field: LabelField = "label", holdout: Holdout = 0.2, threads: Threads = 2,
    resume: Resume = None, proposer: Proposer = None,
) -> None:  # fmt: skip
    """GrIPS-style discrete prompt search (arXiv 2203.07281) through SCORES access."""
    from lfm.tuning import recipes

    use_threads(threads)
    handle = _model(url, model, api_key, "scores", calls)
    _report(recipes.prompt_search(handle, shots=shots, iterations=iterations,
                                  candidates=candidates, max_chars=max_chars, seed=seed,
                                  root=root, data=data, text_field=text_field,
                                  label_field=label_field, holdout=holdout, resume=resume,
                                  proposer=proposer), out)  # fmt: skip


@app.command("opro", placed=True)
def opro(
    url: Url = None, model: Model = "smollm2-135m", api_key: Key = None,
    proposer: Annotated[str, typer.Option(help="the model that writes the instructions (asset or folder, loaded here; its chat template when it has one)")] = "smollm2-135m",
    shots: Shots = 16,
    steps: Annotated[int, typer.Option(min=0, help="OPRO steps after APE's proposals (OPRO: up to 200)")] = 4,
    candidates: Annotated[int, typer.Option(min=1, help="instructions proposed per step (OPRO: 8)")] = 4,
    max_chars: MaxChars = 1200, calls: Calls = None, seed: Seed = 0, root: Root = Path("runs"),
    out: Out = None, data: Data = None, text_field: TextField = "text",
    label_field: LabelField = "label", holdout: Holdout = 0.2, threads: Threads = 2,
    resume: Resume = None,
) -> None:  # fmt: skip
    """Instruction optimisation (APE arXiv 2211.01910, OPRO arXiv 2309.03409) through TEXT access:
    a proposer model writes instructions, the target's generated answers score them."""
    from lfm.tuning import recipes

    use_threads(threads)
    handle = _model(url, model, api_key, "text", calls)
    _report(recipes.opro(handle, proposer=proposer, shots=shots, steps=steps,
                         candidates=candidates, max_chars=max_chars, seed=seed, root=root,
                         data=data, text_field=text_field, label_field=label_field,
                         holdout=holdout, resume=resume), out)  # fmt: skip


@app.command("augment", placed=True)
def augment(
    method: Annotated[str, typer.Option(help="knn_lm (HIDDEN) or replug (SCORES)")] = "knn_lm",
    model: Model = "smollm2-135m",
    corpus: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="one document per line; default: BBC News training articles")] = None,
    store: Annotated[int, typer.Option(min=1, help="BBC training articles used when no --corpus")] = 100,
    eval_texts: Annotated[int, typer.Option(min=1, help="BBC test articles whose perplexity is measured")] = 15,
    chars: Annotated[int, typer.Option(min=1, help="characters kept of each document and article")] = 800,
    prefix_chars: Annotated[int, typer.Option(min=0, help="the unscored prefix of each article")] = 200,
    embedder: Annotated[str, typer.Option(help="REPLUG's retriever: minilm or chars")] = "minilm",
    url: Annotated[str | None, typer.Option(help="served model root: at SCORES for REPLUG, at HIDDEN for kNN-LM (lfm serve --access hidden)")] = None,
    api_key: Key = None, calls: Calls = None,
    threads: Threads = 2, root: Root = Path("runs"), out: Out = None,
) -> None:  # fmt: skip
    """Retrieval augmentation (kNN-LM, REPLUG): build it, save it, report held-out perplexity."""
    from lfm.tuning import recipes

    use_threads(threads)
    level = "scores"
    if url:  # the level the method needs; a server below it answers 403
        from lfm.registry import get

        level = get(method, "tuning").access.name.lower()
    handle = _model(url, model, api_key, level, calls)
    _report(recipes.augment(method, handle, corpus=corpus, store=store, eval_texts=eval_texts,
                            chars=chars, prefix_chars=prefix_chars, embedder=embedder,
                            root=root), out)  # fmt: skip


@app.command("classify", placed=True)
def classify(
    run: Annotated[Path, typer.Option(help="a run directory of `tuning train`, `bbt`, `prompt-search` or `opro`")],
    data: Annotated[Path | None, typer.Option(dir_okay=False, help="texts to classify: JSON lines, or CSV (.csv); lines with labels give the accuracy")] = None,
    text: Annotated[str | None, typer.Option(help="one text to classify")] = None,
    text_field: TextField = "text",
    label_field: Annotated[str, typer.Option(help="the field of --data holding the label (optional)")] = "label",
    model: Annotated[str | None, typer.Option(help="the model (default: the one the run used; for an adapter, its base)")] = None,
    url: Annotated[str | None, typer.Option(help="served model root, for a bbt, prompt-search or opro run")] = None,
    api_key: Key = None, calls: Calls = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", dir_okay=False, help="write the predictions here (JSON lines)")] = None,
    threads: Threads = 2,
) -> None:  # fmt: skip
    """Classify with what a tuning run saved: a BBT prompt, a prompt-search template, an OPRO
    instruction, or a trained adapter, weights or head; the accuracy when --data has labels."""
    from lfm.tuning import recipes

    use_threads(threads)
    handle: Any = model
    if url:  # at the access the run's method needs (one trained through its weights refuses it)
        level = recipes.saved_access(run).name.lower()
        handle = _model(url, model or url, api_key, level, calls)
    res = recipes.predict(run, data=data, text=text, text_field=text_field,
                          label_field=label_field, model=handle, out=out)  # fmt: skip
    if text is not None:
        scores = ", ".join(
            f"{c} {v:.3f}" for c, v in zip(res["classes"], res["scores"], strict=True)
        )
        named = res["prediction"] or "no class (the answer names no label word)"
        typer.echo(f"{named} ({res['method']}: {scores})")
        return
    acc = "" if res["acc"] is None else f"; accuracy {res['acc']:.3f}"
    saved = "" if out is None else f" -> {out}"
    typer.echo(f"{res['method']}: {res['texts']} texts classified{acc}{saved}")
