"""`lfm tuning`: model tuning from the command line.

Black-box commands (BBT, discrete prompt search) run against a served model (`--url`) or a local
asset narrowed to the level the method needs; both take the BBC News few-shot task. PEFT commands
belong in their own section of this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lfm.cli import tuning_peft
from lfm.errors import LfmError

app = typer.Typer(
    help="Model tuning: fine-tuning and PEFT adapters (train, sft), black-box prompt tuning (bbt, prompt-search)."
)

# ------------------------------------------------------------------------------------------------
# Black-box tuning (BBT, discrete prompt search): through a served model or a narrowed local one.

Url = Annotated[
    str | None, typer.Option(help="served model root (lfm serve); default: load --model")
]
Model = Annotated[str, typer.Option(help="model asset or folder, when no --url is given")]
Key = Annotated[str | None, typer.Option(help="API key of the served model", envvar="LFM_API_KEY")]
Shots = Annotated[int, typer.Option(help="training examples per class (paper: 16)")]
Calls = Annotated[int | None, typer.Option(help="HTTP call budget for --url (none: unlimited)")]
Out = Annotated[Path | None, typer.Option(help="write the result and config as JSON here")]


def _handle(url: str | None, model: str, key: str | None, level: str, calls: int | None) -> Any:
    """A remote handle on `url`, or the local asset narrowed to `level`."""
    if url:
        from lfm.serve import Budget, RemoteModel

        return RemoteModel(url, api_key=key, access=level, budget=Budget(calls=calls))
    from lfm.access import narrow
    from lfm.assets import load_model

    return narrow(load_model(model, kind="causal-lm"), level)


def _task(shots: int, seed: int, max_chars: int):
    from lfm.assets import load_dataset
    from lfm.tuning.tasks import BBC_LABEL_WORDS, BBC_TEMPLATE, Verbalizer, few_shot

    data = load_dataset("bbc-news")
    verb = Verbalizer(BBC_TEMPLATE, tuple(BBC_LABEL_WORDS[c] for c in data.classes), max_chars)
    return (*few_shot(data, shots, seed), verb)


def _report(result: dict[str, Any], out: Path | None) -> None:
    typer.echo(json.dumps(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))


@app.command("bbt")
def bbt_cmd(
    url: Url = None, model: Model = "smollm2-135m", api_key: Key = None, shots: Shots = 16,
    budget: Annotated[int, typer.Option(help="CMA-ES evaluations (paper: 8000)")] = 8000,
    n_tokens: Annotated[int, typer.Option(help="soft-prompt length (paper: 50)")] = 50,
    dim: Annotated[int, typer.Option(help="intrinsic dimension d (paper: 500)")] = 500,
    max_chars: Annotated[int, typer.Option(help="article cut in characters")] = 1200,
    calls: Calls = None, seed: int = 0, out: Out = None,
) -> None:  # fmt: skip
    """Black-Box Tuning (arXiv 2201.03514): CMA-ES over a projected soft prompt (EMBEDDINGS)."""
    from lfm.tuning.bbt import BBTConfig, bbt

    try:
        cfg = BBTConfig.build(budget=budget, n_tokens=n_tokens, intrinsic_dim=dim)
        x, y, verb = _task(shots, seed, max_chars)
        res = bbt(_handle(url, model, api_key, "embeddings", calls), x, y, verb, cfg, seed)
    except LfmError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _report({"method": "tuning/bbt", "config": cfg.to_dict(), "start_loss": res.start_loss,
             "best_loss": res.best_loss, "evaluations": res.evaluations, "stopped": res.stopped,
             "prompt_shape": list(res.prompt.shape)}, out)  # fmt: skip


@app.command("prompt-search")
def prompt_search_cmd(
    url: Url = None, model: Model = "smollm2-135m", api_key: Key = None, shots: Shots = 16,
    iterations: Annotated[int, typer.Option(help="search steps (GrIPS: 10)")] = 10,
    candidates: Annotated[int, typer.Option(help="candidates per step (GrIPS: 5)")] = 5,
    max_chars: Annotated[int, typer.Option(help="article cut in characters")] = 1200,
    calls: Calls = None, seed: int = 0, out: Out = None,
) -> None:  # fmt: skip
    """GrIPS-style discrete prompt search (arXiv 2203.07281) through SCORES access."""
    from lfm.tuning.prompt_search import PromptSearchConfig, prompt_search

    try:
        cfg = PromptSearchConfig.build(iterations=iterations, candidates=candidates)
        x, y, verb = _task(shots, seed, max_chars)
        res = prompt_search(_handle(url, model, api_key, "scores", calls), x, y, verb, cfg, seed)
    except LfmError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    _report({"method": "tuning/prompt-search", "config": cfg.to_dict(), "start_score": res.start_score,
             "best_score": res.best_score, "evaluations": res.evaluations, "stopped": res.stopped,
             "template": res.verbalizer.template}, out)  # fmt: skip


# Gradient-based tuning (full FT, BitFit, LP-FT, PEFT adapters, SFT) lives in tuning_peft.
app.command("train")(tuning_peft.train)
app.command("sft")(tuning_peft.sft)
