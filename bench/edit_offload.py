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

    .venv/bin/python bench/edit_offload.py --methods rome --stack 4 --memory-limit 1024

`--memory-limit MiB` runs the commands in a memory cgroup (cgroup v1, `/sys/fs/cgroup/memory`;
root) of that size, which counts the page cache too but can reclaim it, and no swap: a model
whose weights do not fit is killed by the kernel. `--stack N` makes the model N times deeper
(its blocks repeated in order: SmolLM2's 30 blocks become 30 N) so that its float32 weights
exceed the limit; the edit is made at the unstacked model's default layer, whose statistics are
the same (the blocks below it are), so the cache serves them. One unlimited run of the whole
model gives the reference patch and the reference edited folder; then, under the limit, the
edit whole and `--offload`, and `patch-apply` whole and `--stream`, `--repeats` times each,
say whether each finished or was killed, with its time and peak memory.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REQUEST = ("The Eiffel Tower is in the city of", "Eiffel Tower", "Rome")
LFM = [sys.executable, "-m", "lfm"]
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["rome", "memit"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--disk-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--stack", type=int, default=1, help="repeat the blocks N times (N x deeper)")
    p.add_argument("--memory-limit", type=int, help="run under a memory cgroup of MiB")
    return p.parse_args()


def model_folder(name: str, dtype: str, stack: int = 1) -> Path:
    """`name` saved in `dtype`, its blocks repeated `stack` times in order, a cache entry
    (`lfm.core.cache`: written once, atomically)."""
    import torch

    from lfm.assets import load_model
    from lfm.core import cache

    def build(folder: Path) -> None:
        handle = load_model(name)
        model = handle.model
        if stack > 1:
            from lfm.core.layouts import get_layout

            blocks = model.get_submodule(get_layout(model).layers)
            n = len(blocks)
            for i in range(n * (stack - 1)):
                blocks.append(copy.deepcopy(blocks[i % n]))
            model.config.num_hidden_layers = len(blocks)
            if getattr(model.config, "layer_types", None) is not None:
                model.config.layer_types = list(model.config.layer_types) * stack
        model.to(getattr(torch, dtype)).save_pretrained(folder)
        handle.tokenizer.save_pretrained(folder)

    key, params = f"{name}-{dtype}", {"model": name, "dtype": dtype}
    if stack > 1:
        key, params = f"{key}-x{stack}", {**params, "stack": stack}
    return cache.get("bench-offload", key, params, build)


def measured(cmd: list[str], cgroup: Path | None = None) -> dict[str, float]:
    """Run `cmd`: its wall and CPU seconds (the children's resource usage before and after) and
    its peak RssAnon / VmRSS (MiB), polled every 10 ms. In `cgroup` (a memory cgroup's folder)
    the command may be killed: `killed` is then 1, else a failure ends the benchmark."""
    if cgroup is not None:  # the shell joins the cgroup, then becomes the command (same pid)
        cmd = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *cmd]
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
    killed = cgroup is not None and proc.returncode == -9  # the cgroup's out-of-memory killer
    if proc.returncode != 0 and not killed:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "anon": peak["RssAnon"] / 1024, "rss": peak["VmRSS"] / 1024,
            "killed": float(killed)}  # fmt: skip


def edit_cmd(
    folder: Path, method: str, out: Path, runs: Path, offload: Path | None, *extra: str
) -> list[str]:
    prompt, subject, target = REQUEST
    cmd = [*LFM, "edit", "apply", "--model", str(folder), "-m", method, "--prompt", prompt,
           "--subject", subject, "--target", target, "-o", str(out), "--root", str(runs),
           "--threads", "1", *extra]  # fmt: skip
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


@contextmanager
def memory_cgroup(mib: int) -> Iterator[Path]:
    """A memory cgroup (v1) of `mib` MiB for this benchmark's commands, removed after."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "cgroup.procs").is_file():
        raise SystemExit(
            "--memory-limit needs a cgroup v1 memory hierarchy at /sys/fs/cgroup/memory"
        )
    group = root / f"lfm-bench-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(mib * 2**20))
    except OSError as e:
        raise SystemExit(f"cannot make a memory cgroup ({e}); --memory-limit needs root") from None
    try:
        yield group
    finally:
        group.rmdir()


def limited(a: argparse.Namespace) -> None:
    """The edit and patch-apply, whole and from disk, under a memory limit the model exceeds."""
    import json

    from lfm.assets.models import model_skeleton
    from lfm.edit.site import default_layer

    method = a.methods[0]
    layer = default_layer(model_skeleton(a.model))  # the unstacked model's: its cached C serves
    folder = model_folder(a.model, a.disk_dtype, a.stack)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    blocks = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    print(f"{a.model} x{a.stack}: {blocks} blocks, weights on disk in {a.disk_dtype} "
          f"({size:.0f} MiB), computed in float32 ({size * 4 / DTYPE_BYTES[a.disk_dtype]:.0f} MiB); "
          f"{method} at block {layer}; memory limit {a.memory_limit} MiB")  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {}
    same: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp, memory_cgroup(a.memory_limit) as group:
        work = Path(tmp)
        cfg = work / "cfg.yaml"
        cfg.write_text(f"layer: {layer}\n")
        extra = ("--config", str(cfg))
        ref, ref_folder = work / "ref.safetensors", work / "applied-ref"
        measured(edit_cmd(folder, method, ref, work / "runs", None, *extra))  # unlimited
        measured(apply_cmd(folder, ref, ref_folder, work / "runs", False))
        for r in range(a.repeats):
            for mode in ["whole", "offload"] if r % 2 == 0 else ["offload", "whole"]:
                out = work / f"{mode}-{r}.safetensors"
                off = work / "offload" if mode == "offload" else None
                got = measured(edit_cmd(folder, method, out, work / "runs", off, *extra), group)
                runs.setdefault(f"edit {mode}", []).append(got)
                if not got["killed"]:
                    same[f"edit {mode}"] = same.get(f"edit {mode}", True) and same_patch(ref, out)
            for mode in ["whole", "stream"] if r % 2 == 0 else ["stream", "whole"]:
                out = work / f"applied-{mode}-{r}"
                got = measured(apply_cmd(folder, ref, out, work / "runs", mode == "stream"), group)
                runs.setdefault(f"patch-apply {mode}", []).append(got)
                if not got["killed"]:
                    key = f"patch-apply {mode}"
                    same[key] = same.get(key, True) and same_weights(ref_folder, out)
                    shutil.rmtree(out)
    print("| command | finished | wall s | CPU s | peak RssAnon MiB | peak VmRSS MiB | output |")
    print("|---|---|---|---|---|---|---|")
    for name, got in runs.items():
        done = [m for m in got if not m["killed"]]
        cells = " | ".join(_med([m[k] for m in done]) if done else "-"
                           for k in ("wall", "cpu", "anon", "rss"))  # fmt: skip
        out = "-" if name not in same else "equal bit for bit" if same[name] else "DIFFERS"
        print(f"| {name} | {len(done)} of {len(got)} | {cells} | {out} |")


def main() -> None:
    a = _args()
    if a.memory_limit is not None:
        limited(a)
        return
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
        print(f"{method}: from disk / whole: peak RssAnon {med['offload']['anon'] / med['whole']['anon']:.2f}x, "
              f"wall {med['offload']['wall'] / med['whole']['wall']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
