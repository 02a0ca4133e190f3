"""Benchmark: an edit with the model's other blocks left on disk (`lfm edit apply --offload`)
against the same edit with the model loaded whole: peak memory, time, and the patch.

    .venv/bin/python bench/edit_offload.py --methods rome memit --repeats 3

The model (`--model`, default smollm2-135m) is written once as a Hugging Face folder whose
weights are stored in `--disk-dtype` (default bfloat16, as Hugging Face checkpoints usually are)
in the cache (`$LFM_CACHE`). lfm computes in float32 (its default dtype), so loading the
model whole converts every weight into memory; with `--offload` only the embeddings, the head and
the edited blocks are, and each other block is read (and converted) when it runs, and read again
when a gradient passes back through it.

Each run is a fresh `lfm edit apply` process (one edit, `--threads 1`, the method's defaults),
whole and offloaded interleaved (the order alternates per repeat), after one untimed whole run
that fills the statistics cache (the runs then read C from it: both modes key it the same way).
Memory is the process's peak anonymous resident memory (RssAnon: what cannot be given back
without swap) and its peak resident set (VmRSS, which adds the pages of mapped files), both
polled every 10 ms from /proc; time is the wall and CPU (user + system) time of the process.
The table gives medians (min-max) over `--repeats` and says whether every offloaded patch equals
the whole model's bit for bit.

Then the first method's patch is written into the model (`lfm edit patch-apply`, float32 as
above) by loading the model whole and with `--stream` (no model loaded: each tensor read,
changed where the patch edits it and written), interleaved the same way, and the two folders'
weights compared bit for bit.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REQUEST = ("The Eiffel Tower is in the city of", "Eiffel Tower", "Rome")
LFM = [sys.executable, "-m", "lfm"]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["rome", "memit"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--disk-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    return p.parse_args()


def model_folder(name: str, dtype: str) -> Path:
    """`name` saved in `dtype`, a cache entry (`lfm.core.cache`: written once, atomically)."""
    import torch

    from lfm.assets import load_model
    from lfm.core import cache

    def build(folder: Path) -> None:
        handle = load_model(name)
        handle.model.to(getattr(torch, dtype)).save_pretrained(folder)
        handle.tokenizer.save_pretrained(folder)

    return cache.get("bench-offload", f"{name}-{dtype}", {"model": name, "dtype": dtype}, build)


def measured(cmd: list[str]) -> dict[str, float]:
    """Run `cmd`: its wall and CPU seconds (the children's resource usage before and after) and
    its peak RssAnon / VmRSS (MiB), polled every 10 ms."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = {"RssAnon": 0, "VmRSS": 0}
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
        except OSError:
            pass
        time.sleep(0.01)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "anon": peak["RssAnon"] / 1024, "rss": peak["VmRSS"] / 1024}


def edit_cmd(folder: Path, method: str, out: Path, runs: Path, offload: Path | None) -> list[str]:
    prompt, subject, target = REQUEST
    cmd = [*LFM, "edit", "apply", "--model", str(folder), "-m", method, "--prompt", prompt,
           "--subject", subject, "--target", target, "-o", str(out), "--root", str(runs),
           "--threads", "1"]  # fmt: skip
    return cmd + (["--offload", str(offload)] if offload else [])


def apply_cmd(folder: Path, patch: Path, out: Path, runs: Path, stream: bool) -> list[str]:
    cmd = [*LFM, "edit", "patch-apply", str(patch), "--model", str(folder), "-o", str(out),
           "--root", str(runs), "--threads", "1"]  # fmt: skip
    return cmd + (["--stream"] if stream else [])


def same_patch(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    from lfm.core.io import model_files

    x, y = ({k: v for f in model_files(p) for k, v in load_file(f).items()} for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> None:
    a = _args()
    folder = model_folder(a.model, a.disk_dtype)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    print(f"{a.model}, weights on disk in {a.disk_dtype} ({size:.0f} MiB), computed in float32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for method in a.methods:
            ref = work / f"{method}-ref.safetensors"
            measured(edit_cmd(folder, method, ref, work / "runs", None))  # fills the cache
            got: dict[str, list[dict[str, float]]] = {"whole": [], "offload": []}
            same = True
            for r in range(a.repeats):
                order = ["whole", "offload"] if r % 2 == 0 else ["offload", "whole"]
                for mode in order:
                    out = work / f"{method}-{mode}-{r}.safetensors"
                    off = work / "offload" if mode == "offload" else None
                    got[mode].append(measured(edit_cmd(folder, method, out, work / "runs", off)))
                    same &= same_patch(ref, out)
            rows.append((method, got, same))
        patch = work / f"{a.methods[0]}-ref.safetensors"
        ref_folder = work / "applied-ref"
        measured(apply_cmd(folder, patch, ref_folder, work / "runs", False))
        applied: dict[str, list[dict[str, float]]] = {"whole": [], "offload": []}
        same_folder = True
        for r in range(a.repeats):
            for mode in ["whole", "offload"] if r % 2 == 0 else ["offload", "whole"]:
                out = work / f"applied-{mode}-{r}"
                cmd = apply_cmd(folder, patch, out, work / "runs", stream=mode == "offload")
                applied[mode].append(measured(cmd))
                same_folder &= same_weights(ref_folder, out)
                shutil.rmtree(out)
    print("| method | mode | wall s | CPU s | peak RssAnon MiB | peak VmRSS MiB | patch |")
    print("|---|---|---|---|---|---|---|")
    for method, got, same in rows:
        for mode in ("whole", "offload"):
            cells = " | ".join(
                _med([m[k] for m in got[mode]]) for k in ("wall", "cpu", "anon", "rss")
            )
            print(f"| {method} | {mode} | {cells} | {'equal bit for bit' if same else 'DIFFERS'} |")
    method = f"patch-apply ({a.methods[0]})"
    rows.append((method, applied, same_folder))
    for mode, label in (("whole", "whole"), ("offload", "--stream")):
        cells = " | ".join(
            _med([m[k] for m in applied[mode]]) for k in ("wall", "cpu", "anon", "rss")
        )
        same = "equal bit for bit" if same_folder else "DIFFERS"
        print(f"| {method} | {label} | {cells} | {same} |")
    for method, got, _ in rows:
        med = {mode: {k: statistics.median(m[k] for m in got[mode]) for k in ("wall", "anon")}
               for mode in got}  # fmt: skip
        print(f"{method}: offloaded / whole: peak RssAnon {med['offload']['anon'] / med['whole']['anon']:.2f}x, "
              f"wall {med['offload']['wall'] / med['whole']['wall']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
