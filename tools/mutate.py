"""Mutation testing of one area's method code with mutmut: `make mutate AREA=reuse`.

    python tools/mutate.py reuse               # mutate the area's method files, run its fast tests
    python tools/mutate.py reuse --fresh       # forget earlier results first (a full, timed run)
    python tools/mutate.py reuse --survivors   # re-test only the survivors of the last run
    python tools/mutate.py reuse --workers 1   # one test process at a time (default 2)
    python tools/mutate.py reuse --tests tests/reuse/test_reuse_kernels.py   # other tests
    python tools/mutate.py edit --only 'lfm.edit.memory.*' 'lfm.edit.tail.*'   # some of an area
    python tools/mutate.py edit --part 1      # the area's first part (edit has six)

The files each area mutates and the tests run against them are listed in `AREAS` below, the one
place they are kept. mutmut reads its settings from a `pyproject.toml`, so each area gets a work
folder `mutants/<area>/` (ignored by git) with links to `src/` and `tests/` and a copy of the
project's `pyproject.toml` with a generated `[tool.mutmut]` table; mutmut writes its mutated copy
of the sources and its results under `mutants/<area>/mutants/`. Results are kept between runs:
a mutant whose function did not change is not tested again (`--fresh` starts over).

At the end the script prints killed / survived / timeouts / other, the score (killed / total) and
the wall time, and writes the surviving mutants to `mutants/<area>/survivors.txt`
(`.venv/bin/mutmut show NAME` in `mutants/<area>/` prints a mutant's diff). mutmut skips a
decorated function (all of it), so method code registers by a call after the function,
`fn = register(...)(fn)`, and puts `with torch.no_grad():` in its body; the script names the
decorated functions it finds in the area's files, which no run tests. Survivors that no test
should kill, because they change nothing the method promises, are listed with a reason in
`tests/mutation_equivalents.md`. Another test selection (`--tests`, or a change to an area's
list below) makes mutmut test every mutant again: after one, a `--survivors` run re-tests the
survivors but leaves every other mutant "not checked", so its score is not the area's; run
`--fresh` for that. `--only` takes mutant-name patterns (`*` as in shell globs; names are
`lfm.<area>.<file>.x_<function>__mutmut_<n>`, with `xǁClassǁmethod` for methods), and mutmut
tests every mutant they match, even one with a result. A large area (edit: 4,626 mutants, about
1.5 hours; tuning: 3,157, 49 minutes) runs in parts (`--part N`, listed in `AREAS`) of about half
an hour or less, and the figures printed are the part's. Under mutmut, `tests/conftest.py`
builds the tiny models once in mutmut's fork server and runs each mutant's tests fastest first.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin/ (mutmut is installed with the dev extra)


@dataclass(frozen=True)
class Area:
    """What `make mutate AREA=...` mutates (the method code) and the tests it runs against it."""

    files: tuple[str, ...]  # paths under src/ whose functions are mutated
    tests: tuple[str, ...]  # pytest paths (the fast tests only: `slow` ones are deselected)
    note: str = ""  # what is left out, and why
    pytest_args: tuple[str, ...] = field(default=())  # extra pytest options for this area
    also_copy: tuple[str, ...] = ()  # other folders its tests read (linked, then copied by mutmut)
    # an area too large for one half-hour run: its parts, each a tuple of mutant-name patterns
    parts: tuple[tuple[str, ...], ...] = ()


_EDIT_TESTS = ("base", "cli", "facts", "grace", "memory", "mend", "methods", "own_facts", "patch",
               "requests", "sequential", "site", "stats", "tail", "trace", "ultraedit", "wise")  # fmt: skip

_TUNING_PARTS = ("peft_methods lora_plus methods mezo", "bbt retrieval tasks",
                 "prompt_search opro proposer")  # fmt: skip

_EDIT_PARTS = ("memory tail requests common", "rome memit ftl", "grace ultraedit", "mend", "wise",
               "facts stats")  # fmt: skip

AREAS: dict[str, Area] = {
    "reuse": Area(
        files=(
            "src/lfm/reuse/kernels.py",  # the per-tensor merge maths
            "src/lfm/reuse/methods.py",  # the registered merge methods over those kernels
            "src/lfm/reuse/topk.py",  # TIES's model-wide magnitude threshold
            "src/lfm/reuse/spectral.py",  # TSV-Merge and Iso-C / Iso-CTS
            "src/lfm/reuse/wemoe.py",  # weight-ensembling MoE: the upscaled modules, the routers
            "src/lfm/reuse/moe.py",  # MoE upcycling: the Mixtral checkpoint, the gates
        ),
        tests=(
            "tests/reuse/test_reuse_kernels.py",  # hand computations of every kernel
            "tests/reuse/test_reuse_fast_paths.py",  # the fast paths equal the plain forms
            "tests/reuse/test_reuse_newer.py",  # Breadcrumbs, DELLA and the spectral merges
            "tests/reuse/test_reuse_engine.py",  # the streamed merge equals the in-memory one
            "tests/reuse/test_reuse_mutants.py",  # what earlier runs found untested
            "tests/reuse/test_reuse_wemoe.py",  # WEMoE by hand on small modules
            "tests/reuse/test_reuse_moe.py",  # upcycling: forced routing gives the expert
        ),
        note=(
            "driver, engine and writer (I/O), plan, recipes and the CLI glue are not mutated; the "
            "tests of fusion, LoRA, ensembles, re-basin and the CLI are not run (they train "
            "or load models, and test other code), nor test_merge_properties.py (its Hypothesis "
            "search shrinks every failure: minutes per mutant)"
        ),
        # the merge kernels and methods (1,022 mutants, 23-24 min), then the spectral merges,
        # then the two mixtures of experts
        parts=(
            ("lfm.reuse.kernels.*", "lfm.reuse.methods.*", "lfm.reuse.topk.*"),
            ("lfm.reuse.spectral.*",),
            ("lfm.reuse.wemoe.*", "lfm.reuse.moe.*"),
        ),
    ),
    "meta": Area(
        files=(
            "src/lfm/meta/functional.py",
            "src/lfm/meta/maml.py",
            "src/lfm/meta/protonets.py",
            "src/lfm/meta/reptile.py",
        ),
        tests=(
            "tests/meta/test_meta_functional.py",  # meta-gradients against closed forms
            "tests/meta/test_meta_unroll.py",  # against a hand-written autograd unroll
            "tests/meta/test_meta_reptile_protonets.py",  # Reptile and ProtoNets by hand
            "tests/meta/test_meta_training.py",  # every learner runs and meta-training helps
            "tests/meta/test_meta_mutants.py",  # what earlier runs found untested
        ),
        note=(
            "task samplers, data folders, the training loop (train.py, with query_objective) and "
            "the CLI glue are not mutated; the few-shot, data-free and own-data tests are not run "
            "(minutes of training each)"
        ),
    ),
    "distill": Area(
        files=(
            "src/lfm/distill/losses.py",  # KD, reverse KL, top-k KD, DIST
            "src/lfm/distill/features.py",  # FitNets, AT, RKD, PKT
            "src/lfm/distill/served.py",  # top-k LM KD with its tail, GKD's JSD and sampling
            "src/lfm/distill/xtok.py",  # ULD: offset alignment and the sorted-probability loss
            "src/lfm/distill/seqkd.py",  # sequence-level KD and step-by-step targets
            "src/lfm/distill/skew.py",  # skew KL
        ),
        tests=(
            "tests/distill/test_distill_losses.py",  # every loss by hand
            "tests/distill/test_distill_features.py",
            "tests/distill/test_distill_distiller.py",
            "tests/distill/test_distill_served.py",
            "tests/distill/test_distill_hint_lm.py",
            "tests/distill/test_distill_xtok.py",
            "tests/distill/test_distill_seqkd.py",
            "tests/distill/test_distill_skew.py",
            "tests/distill/test_distill_mutants.py",  # what the first run found untested
            "tests/distill/test_distill_mutants_xtok.py",  # and the fresh run, in ULD's helpers
        ),
        note=(
            "the distiller loop, the layer-dropped LM students (lm.py), the data-free games "
            "(datafree.py, adversarial.py, game.py: minutes of generator training per test), the "
            "vision recipes and the CLI glue are not mutated"
        ),
    ),
    "tuning": Area(
        files=(
            "src/lfm/tuning/peft_methods.py",  # LoRA, DoRA, IA3, prompt and prefix tuning
            "src/lfm/tuning/lora_plus.py",  # LoRA+'s learning rates
            "src/lfm/tuning/methods.py",  # full FT, BitFit, LP-FT, WiSE-FT
            "src/lfm/tuning/mezo.py",  # zeroth-order SGD
            "src/lfm/tuning/bbt.py",  # CMA-ES in a random projection of the prompt
            "src/lfm/tuning/prompt_search.py",  # GrIPS's edit search
            "src/lfm/tuning/opro.py",  # OPRO / APE: a proposer model's instructions
            "src/lfm/tuning/proposer.py",
            "src/lfm/tuning/retrieval.py",  # kNN-LM and REPLUG
            "src/lfm/tuning/tasks.py",  # class scores, accuracy, few-shot draws
        ),
        tests=(
            "tests/tuning/test_tuning_blackbox_methods.py",
            "tests/tuning/test_tuning_blackbox_retrieval.py",
            "tests/tuning/test_tuning_blackbox_cli.py",
            "tests/tuning/test_tuning_opro.py",
            "tests/tuning/test_tuning_lora_plus.py",
            "tests/tuning/test_tuning_peft_adapters.py",
            "tests/tuning/test_tuning_peft_prefix.py",
            "tests/tuning/test_tuning_peft_training.py",
            "tests/tuning/test_tuning_resume.py",
            "tests/tuning/test_tuning_seed.py",
            "tests/tuning/test_tuning_own_data.py",
            "tests/tuning/test_tuning_train_cli.py",
            "tests/tuning/test_tuning_classify_cli.py",
            "tests/test_tasks.py",
            # what the first run found untested, by the files it mutates
            *(
                f"tests/tuning/test_tuning_mutants_{part}.py"
                for part in ("methods", "peft", "bbt", "search", "opro", "retrieval", "tasks")
            ),
        ),
        note=(
            "the trainer loop (trainer.py), SFT data, saved runs, replay logs, the retrieval "
            "handles (augmented.py), adapter I/O, the recipes and the CLI glue are not mutated"
        ),
        # 3,157 mutants, 49 min in one run: three parts of 958-1,100 mutants (the weight tuners,
        # BBT with retrieval and the task scores, the prompt searchers)
        parts=tuple(
            tuple(f"lfm.tuning.{stem}.*" for stem in part.split()) for part in _TUNING_PARTS
        ),
    ),
    "edit": Area(
        files=(
            "src/lfm/edit/rome.py",  # ROME's rank-one update
            "src/lfm/edit/memit.py",  # MEMIT's spread over layers, AlphaEdit's null space
            "src/lfm/edit/common.py",  # the covariance solve, temporary deltas
            "src/lfm/edit/tail.py",  # the value search's forward from the edit layer
            "src/lfm/edit/stats.py",  # the second moments C
            "src/lfm/edit/requests.py",  # the subject's last token, the target ids
            "src/lfm/edit/ftl.py",  # FT-L's constrained steps
            "src/lfm/edit/grace.py",  # GRACE's codebook
            "src/lfm/edit/wise.py",  # WISE's side memory and router
            "src/lfm/edit/ultraedit.py",  # UltraEdit's lifelong normalised solve
            "src/lfm/edit/mend.py",  # MEND's gradient editor
            "src/lfm/edit/memory.py",  # IKE's demonstrations
            "src/lfm/edit/facts.py",  # the edit metrics
        ),
        tests=tuple(f"tests/edit/test_edit_{name}.py" for name in _EDIT_TESTS),
        note=(
            "causal tracing and layer choice (trace.py, locate.py, site.py), patches' I/O "
            "(patch.py, base.py), the sequential runner, the recipes and the CLI glue are not "
            "mutated; test_edit_real.py is slow (real models) and not run"
        ),
        also_copy=("tools",),  # a facts test checks the packaged set against its seeded tool
        # 4,626 mutants, about 1.5 h in one run: six parts of 627-905 mutants, 7-30 min each
        parts=tuple(tuple(f"lfm.edit.{stem}.*" for stem in part.split()) for part in _EDIT_PARTS),
    ),
    "access": Area(
        files=("src/lfm/access.py",),  # the access levels, their checks and the local scoring
        tests=(
            "tests/test_access.py",
            "tests/test_tasks.py",
            "tests/test_registry.py",
            "tests/test_access_mutants.py",  # what the first run found untested: the handles
            "tests/test_access_mutants_local.py",  # and the local model's text, scores and padding
        ),
        note="the served handles (lfm.serve) are not mutated",
    ),
}


def mutmut_table(area: Area) -> str:
    """The `[tool.mutmut]` table of one area (TOML)."""
    pytest_args = ["-m", "not slow", "-p", "no:cacheprovider", *area.pytest_args]
    lines = [
        "[tool.mutmut]",
        'source_paths = ["src"]',
        f"only_mutate = {json.dumps(list(area.files))}",
        f"pytest_add_cli_args = {json.dumps(pytest_args)}",
        f"pytest_add_cli_args_test_selection = {json.dumps(list(area.tests))}",
        # mutmut's choice for torch: fork the workers from a server that has not run pytest
        'process_isolation = "forkserver"',
    ]
    if area.also_copy:
        lines.append(f"also_copy = {json.dumps(list(area.also_copy))}")
    return "\n".join(lines) + "\n"


def prepare(name: str, area: Area, fresh: bool) -> Path:
    """The area's work folder: links to src/ and tests/, and pyproject.toml with its mutmut table."""
    work = ROOT / "mutants" / name
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for part in ("src", "tests", *area.also_copy):
        link = work / part
        if not link.is_symlink():
            link.symlink_to(Path("..") / ".." / part)
    project = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in project:
        sys.exit("pyproject.toml has a [tool.mutmut] table: tools/mutate.py writes that per area")
    text = project.rstrip("\n") + "\n\n" + mutmut_table(area)
    target = work / "pyproject.toml"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return work


def decorated(area: Area) -> list[str]:
    """The decorated top-level functions and methods of the area's files: mutmut skips them."""
    found = []
    for f in area.files:
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.decorator_list:
                names = {ast.unparse(d) for d in node.decorator_list}
                if not names <= {"staticmethod", "classmethod"}:  # mutmut handles these two
                    found.append(f"{Path(f).stem}.{node.name}")
    return found


def matches(name: str, patterns: list[str]) -> bool:
    """Whether a mutant's name matches one of the shell-style patterns."""
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def unknown_patterns(area: Area, patterns: list[str]) -> list[str]:
    """The patterns whose fixed start names none of the area's modules (a misspelt file)."""
    modules = [".".join(Path(f).with_suffix("").parts[1:]) + "." for f in area.files]
    heads = [pat.split("*")[0].split("?")[0].split("[")[0] for pat in patterns]
    return [pat for pat, head in zip(patterns, heads, strict=True)
            if not any(head.startswith(m) or m.startswith(head) for m in modules)]  # fmt: skip


def results(work: Path, area: Area, only: list[str]) -> dict[str, list[str]]:
    """Mutant names by status (those matching `only`, if given), from mutmut's result files."""
    from mutmut.stats import status_by_exit_code

    by_status: dict[str, list[str]] = {}
    for f in area.files:
        meta = work / "mutants" / (f + ".meta")
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        for key, code in codes.items():
            if only and not matches(key, only):
                continue
            by_status.setdefault(status_by_exit_code[code], []).append(key)
    return by_status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("area", nargs="?", help=f"one of {', '.join(AREAS)}")
    parser.add_argument("--workers", type=int, default=2, help="test processes at once (1-2 here)")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results first")
    parser.add_argument("--survivors", action="store_true", help="re-test the last survivors only")
    parser.add_argument("--tests", nargs="+", help="run these test paths instead of the area's")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", help="mutant names to run (globs)")
    parser.add_argument("--part", type=int, help="run the area's part N (1, 2, ...: see AREAS)")
    args = parser.parse_args()
    if args.area not in AREAS:
        why = f" ({args.area!r} has no set-up in tools/mutate.py yet)" if args.area else ""
        sys.exit(f"usage: make mutate AREA=<{'|'.join(AREAS)}>{why}")
    area = AREAS[args.area]
    if args.part is not None:
        if not 1 <= args.part <= len(area.parts):
            has = f"parts 1-{len(area.parts)}" if area.parts else "no parts: run it whole"
            parser.error(f"--part {args.part}: the {args.area} area has {has}")
        args.only = [*(args.only or []), *area.parts[args.part - 1]]
    if args.only and (bad := unknown_patterns(area, args.only)):
        parser.error(f"--only {' '.join(bad)}: no file of the {args.area} area is named so")
    if args.tests:
        area = replace(area, tests=tuple(args.tests))
    work = prepare(args.area, area, args.fresh)
    names: list[str] = []
    if args.survivors:
        listed = work / "survivors.txt"
        names = listed.read_text().split() if listed.exists() else []
        if args.only:
            names = [n for n in names if matches(n, args.only)]
        if not names:
            which = " matching --only" if args.only else ""
            sys.exit(f"no survivors{which} listed in {listed}: run without --survivors first")
    elif args.only:
        names = list(args.only)
    env = dict(os.environ, LFM_TEST_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print(f"mutating {', '.join(area.files)} against {' '.join(area.tests)} (not slow)")
    if area.note:
        print(f"left out: {area.note}")
    if skipped := decorated(area):
        print(f"not mutated (decorated, which mutmut skips): {', '.join(skipped)}")
    start = time.monotonic()
    cmd = [str(BIN / "mutmut"), "run", "--max-children", str(args.workers), *names]
    code = subprocess.run(cmd, cwd=work, env=env).returncode
    wall = time.monotonic() - start
    if code != 0:
        sys.exit(f"mutmut exited with {code} after {wall:.0f} s")
    by_status = results(work, area, args.only or [])
    total = sum(len(v) for v in by_status.values())
    killed = len(by_status.get("killed", []))
    survived = sorted(by_status.get("survived", []))
    timeouts = len(by_status.get("timeout", []))
    other = total - killed - len(survived) - timeouts
    listed = work / "survivors.txt"  # a part's run keeps the other parts' survivors listed
    kept = []
    if args.only and listed.exists():
        kept = [n for n in listed.read_text().split() if not matches(n, args.only)]
    listed.write_text("".join(f"{s}\n" for s in sorted({*kept, *survived})))
    score = 100 * killed / total if total else 0.0
    print(
        f"{args.area}: {total} mutants, {killed} killed, {len(survived)} survived, "
        f"{timeouts} timeouts, {other} other ({score:.1f} % killed) in {wall:.0f} s"
    )
    for status, keys in sorted(by_status.items()):
        if status not in ("killed", "survived", "timeout"):
            print(f"  {status}: {', '.join(sorted(keys))}")
    print(f"survivors ({len(survived)}) listed in {work.relative_to(ROOT)}/survivors.txt")


if __name__ == "__main__":
    main()
