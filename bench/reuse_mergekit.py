"""Benchmark: lfm's streaming merge beside mergekit on SmolLM2-135M.

The cached fp32 SmolLM2-135M folder is the base; `--n-models` seeded variants (base + N(0, σ²)
noise on every float tensor) are written as Hugging Face folders. The same mergekit YAML goes
through mergekit's CLI (`mergekit-yaml`, in its own venv, threads as it sets them) and through
`lfm reuse merge` (one torch thread, `OMP_NUM_THREADS=1`), each in a fresh subprocess. Runs are
interleaved (per repeat and method: lfm then mergekit, the other order on odd repeats) so that
both see the same load on a shared machine. The table gives medians over `--repeats` of wall time,
CPU time (user + system) and the child's peak RSS (ru_maxrss), the ratios lfm / mergekit of the
medians, and the largest absolute difference between the outputs of the first repeat.

    .venv/bin/python bench/reuse_mergekit.py [--repeats 3] [--methods linear,ties]

Peak memory against model size is measured by `bench/reuse.py --sizes`.

The mergekit venv is made once under `$LFM_CACHE` (default /tmp): `python3.11 -m venv` and
`pip install torch==2.13.0 mergekit`. The parent imports no torch: a child would inherit its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LFM_CACHE", "/tmp"))
MK_VENV = CACHE / "mergekit-venv"
LFM_PY = ROOT / ".venv" / "bin" / "python"
METHODS = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.2},
    "dare_ties": {"weight": 1.0, "density": 0.2},
}
# Runs a command, then prints the child's wall time, CPU time and peak RSS: ru_maxrss of
# RUSAGE_CHILDREN is the largest of the waited-for children, and this wrapper has exactly one.
TIMED = (
    "import resource,subprocess,sys,time;t=time.perf_counter();"
    "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
    "s=time.perf_counter()-t;u=resource.getrusage(resource.RUSAGE_CHILDREN);"
    "print('@@',r.returncode,s,u.ru_utime+u.ru_stime,u.ru_maxrss/1024);"
    "sys.stderr.write(r.stderr[-2000:] if r.returncode else '')"
)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of `cmd` run in a fresh process."""
    p = subprocess.run([sys.executable, "-c", TIMED, *cmd], capture_output=True, text=True, env=env)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@")), None)
    if line is None or line.split()[1] != "0":
        raise RuntimeError(f"{cmd[0]} failed: {p.stderr[-1500:]}")
    _, _, s, cpu, m = line.split()
    return {"s": float(s), "cpu": float(cpu), "mib": float(m)}


def ensure_mergekit() -> Path | None:
    """The mergekit-yaml script of the cached venv, installing it once; None if that fails."""
    exe = MK_VENV / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    try:
        subprocess.run(["python3.11", "-m", "venv", str(MK_VENV)], check=True)
        pip = [str(MK_VENV / "bin" / "pip"), "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0", "mergekit"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"mergekit could not be installed: {e}")
        return None
    return exe if exe.exists() else None


# ------------------------------------------------------------------------------------------------
# Children (run with the project venv): build inputs, compare outputs.


def smollm_folder() -> Path:
    """The cached fp32 safetensors copy of SmolLM2-135M-Instruct (made by `load_model`)."""
    found = sorted((Path.home() / ".cache" / "lfm" / "models").glob("SmolLM2-135M-Instruct*"))
    if not found:
        from lfm.assets import load_model

        load_model("smollm2-135m")
        found = sorted((Path.home() / ".cache" / "lfm" / "models").glob("SmolLM2-135M-Instruct*"))
    return found[0]


def build_variants(root: Path, n: int, sigma: float) -> None:
    """Write `n` seeded noisy copies of SmolLM2 beside a link to the base folder."""
    import torch
    from safetensors.torch import load_file, save_file

    base = smollm_folder()
    (root / "base").symlink_to(base)
    sd = load_file(str(base / "model.safetensors"))
    for m in range(n):
        gen = torch.Generator().manual_seed(1000 + m)
        out = {k: v + sigma * torch.randn(v.shape, generator=gen) for k, v in sd.items()}
        folder = root / f"ft{m}"
        folder.mkdir()
        save_file(out, str(folder / "model.safetensors"), {"format": "pt"})
        for f in base.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors"):
                shutil.copy2(f, folder / f.name)


def _load_dir(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a: str, b: str) -> None:
    """Print the largest |a − b| over the tensors both folders hold, and the keys they differ in."""
    import torch

    sa, sb = _load_dir(Path(a)), _load_dir(Path(b))
    common = sorted(set(sa) & set(sb))
    worst = max((float((sa[k].float() - sb[k].float()).abs().max()), k) for k in common)
    frac = sum(int((sa[k] != sb[k]).sum()) for k in common) / sum(sa[k].numel() for k in common)
    only = sorted(set(sa) ^ set(sb))
    print(json.dumps({"max_abs": worst[0], "where": worst[1], "frac_diff": frac, "only": only}))
    del torch


# ------------------------------------------------------------------------------------------------
# Parent: no torch here.


def write_yaml(path: Path, method: str, root: Path, n: int) -> Path:
    models = [
        f"  - model: {root / f'ft{m}'}\n    parameters: {json.dumps(METHODS[method])}"
        for m in range(n)
    ]
    base = "" if method == "linear" else f"base_model: {root / 'base'}\n"
    text = f"merge_method: {method}\n{base}dtype: float32\nmodels:\n" + "\n".join(models) + "\n"
    path.write_text(text)
    return path


def lfm_cmd(plan: Path, out: Path) -> list[str]:
    return [
        str(ROOT / ".venv" / "bin" / "lfm"),
        "reuse",
        "merge",
        str(plan),
        "--out",
        str(out),
        "-q",
        "--root",
        str(out.parent / "runs"),
    ]


def mk_cmd(exe: Path, plan: Path, out: Path) -> list[str]:
    return [str(exe), str(plan), str(out), "--lazy-unpickle", "--no-cuda", "--allow-crimes"]


def child(args: list[str]) -> dict:
    p = subprocess.run([str(LFM_PY), __file__, *args], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-1500:])
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def part_mergekit(work: Path, n: int, sigma: float, methods: list[str], repeats: int) -> None:
    exe = ensure_mergekit()
    root = work / "smol"
    if not root.exists():
        root.mkdir(parents=True)
        child(["--child", "build", str(root), str(n), str(sigma)])
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {m: {"lfm": [], "mk": []} for m in methods}
    diffs: dict[str, dict] = {}
    for rep in range(repeats):
        for method in methods:
            plan = write_yaml(work / f"{method}.yml", method, root, n)
            tools = ["lfm", "mk"] if exe is not None else ["lfm"]
            for tool in tools if rep % 2 == 0 else tools[::-1]:
                out = _fresh(work / f"{tool}-{method}")
                if tool == "lfm":
                    r = timed(lfm_cmd(plan, out), env=one_thread)
                else:
                    r = timed(mk_cmd(exe, plan, out))  # type: ignore[arg-type]
                runs[method][tool].append(r)
                print(json.dumps({"repeat": rep, "method": method, "tool": tool, **r}), flush=True)
            if rep == 0 and exe is not None:
                diffs[method] = child(
                    ["--child", "compare", str(work / f"lfm-{method}"), str(work / f"mk-{method}")]
                )
                print(json.dumps({"method": method, **diffs[method]}), flush=True)
    _table(runs, diffs)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _med(rs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _spread(rs: list[dict[str, float]], key: str) -> str:
    xs = [r[key] for r in rs]
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def _table(runs: dict[str, dict[str, list[dict[str, float]]]], diffs: dict[str, dict]) -> None:
    n = len(next(iter(runs.values()))["lfm"])
    print(f"\nmedians of {n} interleaved runs (min-max)")
    print(
        "| method | lfm s | mergekit s | time ratio | lfm CPU s | mergekit CPU s | CPU ratio "
        "| lfm MiB | mergekit MiB | RSS ratio | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, r in runs.items():
        lfm, mk = r["lfm"], r["mk"]
        if not mk:
            print(f"| {method} | {_spread(lfm, 's')} | - | - | {_spread(lfm, 'cpu')} | - | - "
                  f"| {_med(lfm, 'mib'):.0f} | - | - | - |")  # fmt: skip
            continue
        d = diffs.get(method, {})
        diff = f"{d['max_abs']:.2e} ({d['frac_diff']:.2e} of entries)" if d else "-"
        print(
            f"| {method} | {_spread(lfm, 's')} | {_spread(mk, 's')} "
            f"| {_med(lfm, 's') / _med(mk, 's'):.2f} | {_spread(lfm, 'cpu')} | {_spread(mk, 'cpu')} "
            f"| {_med(lfm, 'cpu') / _med(mk, 'cpu'):.2f} | {_med(lfm, 'mib'):.0f} "
            f"| {_med(mk, 'mib'):.0f} | {_med(lfm, 'mib') / _med(mk, 'mib'):.2f} | {diff} |"
        )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        what, *rest = sys.argv[2:]
        if what == "build":
            build_variants(Path(rest[0]), int(rest[1]), float(rest[2]))
        elif what == "compare":
            compare(rest[0], rest[1])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=CACHE / "lfm-bench-mergekit")
    ap.add_argument("--n-models", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    part_mergekit(a.work, a.n_models, a.sigma, a.methods.split(","), a.repeats)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
