"""Benchmark: lfm's streaming merge beside mergekit, and beside the I/O floor, on SmolLM2-135M.

The cached fp32 SmolLM2-135M folder is the base; `--n-models` seeded variants (base + N(0, σ²)
noise on every float tensor) are written as Hugging Face folders. The same mergekit YAML goes
through mergekit's CLI (`mergekit-yaml`, in its own venv) and through `lfm reuse merge`
(`OMP_NUM_THREADS` set to `--lfm-threads`, default 2, as mergekit's `--num-threads 2` sets: lfm
then merges two tensors at once, `lfm.reuse.driver.MERGE_WORKERS`; 1 merges one at a time on one
thread), each in a fresh subprocess.

mergekit runs once per setting set of `--mk-settings` (default all of `MK_SETTINGS`):
`default` (`--lazy-unpickle --no-cuda`, threads as mergekit sets them), `j1` and `j2` (plus
`--num-threads 1` / `2`) and `j2async` (plus `--num-threads 2 --async-write`); a set whose flags
`mergekit-yaml --help` does not list is dropped. For each method, "mergekit best" is the set
with the lowest median wall time: the main table's mergekit columns and ratios are that set's,
and a second table gives every set's medians.

The I/O floor is a fresh plain-Python process (no torch) that reads every input safetensors file
of the merge once (the base when the method has one, and every model; 16 MiB `readinto` into one
reused buffer) and writes one file of the size of lfm's merged output (the sum of its
.safetensors files) by writing the same chunk repeatedly, into the work folder (removed after;
no fsync, as lfm's writer does none). Its table gives the bytes moved (in + out), the floor's and
lfm's throughput over those bytes, and lfm's share of the floor's throughput (floor s / lfm s),
for lfm's whole process and with its start-up subtracted, measured two ways, each run in a fresh
process: `lfm reuse merge --help` (Python and the command-line tree; it imports no torch) and
`lfm reuse merge PLAN --check` (that plus importing torch and the merge engine and checking the
plan from the tensor headers, reading no weight: all a merge does before its first weight).

Runs are interleaved (per repeat and method: lfm, each mergekit set, the floor, `--help`,
`--check`; the reverse order on odd repeats) so that all see the same load on a shared machine. Every run
goes through the same wrapper, which measures wall time, CPU time (user + system) and the
child's peak RSS (ru_maxrss). The tables give medians over `--repeats` (min-max), ratios of the
medians, and the largest absolute difference between lfm's output and that of the first mergekit
set in the first repeat.

    .venv/bin/python bench/reuse_mergekit.py [--repeats 3] [--methods linear,ties]
        [--mk-settings default,j1,j2,j2async]

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
# mergekit-yaml flags per setting set, after `PLAN OUT`.
MK_BASE = ["--lazy-unpickle", "--no-cuda", "--allow-crimes"]
MK_SETTINGS = {
    "default": [],
    "j1": ["--num-threads", "1"],
    "j2": ["--num-threads", "2"],
    "j2async": ["--num-threads", "2", "--async-write"],
}
CHUNK = 16 << 20
# The I/O floor: read each input file once, then write OUT_BYTES to OUT, CHUNK bytes at a time
# from one reused buffer. Plain Python, no torch. lfm's writer does not fsync, so neither does this.
FLOOR = (
    f"import sys;out,n,*ins=sys.argv[1:];n=int(n);buf=bytearray({CHUNK});mv=memoryview(buf)\n"
    "for p in ins:\n"
    " with open(p,'rb',buffering=0) as f:\n"
    "  while f.readinto(buf):pass\n"
    "with open(out,'wb',buffering=0) as f:\n"
    " while n>0:\n"
    "  k=f.write(mv[:min(n,len(buf))]);n-=k\n"
)
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


def mk_cmd(exe: Path, plan: Path, out: Path, setting: str = "default") -> list[str]:
    return [str(exe), str(plan), str(out), *MK_BASE, *MK_SETTINGS[setting]]


def mk_supported(exe: Path, settings: list[str]) -> list[str]:
    """The setting sets all of whose flags `mergekit-yaml --help` lists; the others are dropped."""
    text = subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
    keep = []
    for name in settings:
        missing = [f for f in MK_BASE + MK_SETTINGS[name] if f.startswith("--") and f not in text]
        if missing:
            print(f"mergekit set {name} dropped: mergekit-yaml lacks {' '.join(missing)}")
        else:
            keep.append(name)
    return keep


def floor_inputs(method: str, root: Path, n: int) -> list[Path]:
    """Every safetensors file the merge reads: the base's (for a method with one) and each model's."""
    folders = ([] if method == "linear" else [root / "base"]) + [root / f"ft{m}" for m in range(n)]
    return [f for d in folders for f in sorted(d.glob("*.safetensors"))]


def out_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def floor_cmd(out: Path, nbytes: int, inputs: list[Path]) -> list[str]:
    return [sys.executable, "-c", FLOOR, str(out), str(nbytes), *map(str, inputs)]


def child(args: list[str]) -> dict:
    p = subprocess.run([str(LFM_PY), __file__, *args], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-1500:])
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def part_mergekit(
    work: Path,
    n: int,
    sigma: float,
    methods: list[str],
    repeats: int,
    settings: list[str],
    threads: int = 2,
) -> None:
    exe = ensure_mergekit()
    if exe is not None:
        settings = mk_supported(exe, settings)
    sets = settings if exe is not None else []
    root = work / "smol"
    if not root.exists():
        root.mkdir(parents=True)
        child(["--child", "build", str(root), str(n), str(sigma)])
    lfm_env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    tools = ["lfm", *(f"mk:{s}" for s in sets), "floor", "startup", "check"]
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        m: {t: [] for t in tools} for m in methods
    }
    diffs: dict[str, dict] = {}
    moved: dict[str, tuple[int, int]] = {}  # method: (bytes read, bytes written) by the floor
    for rep in range(repeats):
        for method in methods:
            plan = write_yaml(work / f"{method}.yml", method, root, n)
            for tool in tools if rep % 2 == 0 else tools[::-1]:
                if tool == "lfm":
                    out = _fresh(work / f"lfm-{method}")
                    r = timed(lfm_cmd(plan, out), env=lfm_env)
                    if method not in moved:
                        inputs = floor_inputs(method, root, n)
                        moved[method] = (sum(f.stat().st_size for f in inputs), out_bytes(out))
                elif tool == "floor":
                    inputs = floor_inputs(method, root, n)
                    target = work / "floor.bin"
                    r = timed(floor_cmd(target, moved[method][1], inputs))
                    target.unlink()
                elif tool == "startup":
                    r = timed([*lfm_cmd(plan, work / "unused")[:3], "--help"], env=lfm_env)
                elif tool == "check":
                    r = timed([*lfm_cmd(plan, work / "unused"), "--check"], env=lfm_env)
                else:
                    setting = tool.split(":", 1)[1]
                    out = _fresh(work / f"mk-{setting}-{method}")
                    r = timed(mk_cmd(exe, plan, out, setting))  # type: ignore[arg-type]
                runs[method][tool].append(r)
                print(json.dumps({"repeat": rep, "method": method, "tool": tool, **r}), flush=True)
            if rep == 0 and sets:
                diffs[method] = child(
                    [
                        "--child",
                        "compare",
                        str(work / f"lfm-{method}"),
                        str(work / f"mk-{sets[0]}-{method}"),
                    ]
                )
                print(json.dumps({"method": method, **diffs[method]}), flush=True)
            for setting in sets:  # ~540 MB each: keep no mergekit output past its comparison
                _fresh(work / f"mk-{setting}-{method}")
    best = {m: min(sets, key=lambda s: _med(r[f"mk:{s}"], "s")) for m, r in runs.items() if sets}
    _table(
        {m: {"lfm": r["lfm"], "mk": r[f"mk:{best[m]}"] if sets else []} for m, r in runs.items()},
        diffs,
        best,
    )
    if sets:
        _sets_table(runs, sets, best)
    _floor_table(runs, moved)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _med(rs: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def _spread(rs: list[dict[str, float]], key: str, nd: int = 1) -> str:
    xs = [r[key] for r in rs]
    return f"{statistics.median(xs):.{nd}f} ({min(xs):.{nd}f}-{max(xs):.{nd}f})"


def _table(
    runs: dict[str, dict[str, list[dict[str, float]]]],
    diffs: dict[str, dict],
    best: dict[str, str],
) -> None:
    n = len(next(iter(runs.values()))["lfm"])
    print(f"\nmedians of {n} interleaved runs (min-max); mergekit: its fastest set per method")
    print(
        "| method | mergekit set | lfm s | mergekit s | time ratio | lfm CPU s | mergekit CPU s "
        "| CPU ratio | lfm MiB | mergekit MiB | RSS ratio | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method, r in runs.items():
        lfm, mk = r["lfm"], r["mk"]
        if not mk:
            print(f"| {method} | - | {_spread(lfm, 's')} | - | - | {_spread(lfm, 'cpu')} | - | - "
                  f"| {_med(lfm, 'mib'):.0f} | - | - | - |")  # fmt: skip
            continue
        d = diffs.get(method, {})
        diff = f"{d['max_abs']:.2e} ({d['frac_diff']:.2e} of entries)" if d else "-"
        print(
            f"| {method} | {best[method]} | {_spread(lfm, 's')} | {_spread(mk, 's')} "
            f"| {_med(lfm, 's') / _med(mk, 's'):.2f} | {_spread(lfm, 'cpu')} | {_spread(mk, 'cpu')} "
            f"| {_med(lfm, 'cpu') / _med(mk, 'cpu'):.2f} | {_med(lfm, 'mib'):.0f} "
            f"| {_med(mk, 'mib'):.0f} | {_med(lfm, 'mib') / _med(mk, 'mib'):.2f} | {diff} |"
        )


def _sets_table(
    runs: dict[str, dict[str, list[dict[str, float]]]], sets: list[str], best: dict[str, str]
) -> None:
    print("\nmergekit per setting set: wall s median (min-max), CPU s median")
    flags = ", ".join(f"{s}: {' '.join(MK_SETTINGS[s]) or '(none)'}" for s in sets)
    print(f"(every set: {' '.join(MK_BASE)}; {flags})")
    print("| method | " + " | ".join(f"{s} s" for s in sets) + " | best |")
    print("|---|" + "---|" * len(sets) + "---|")
    for method, r in runs.items():
        cells = [f"{_spread(r[f'mk:{s}'], 's')}; CPU {_med(r[f'mk:{s}'], 'cpu'):.1f}" for s in sets]
        print(f"| {method} | " + " | ".join(cells) + f" | {best[method]} |")


def _floor_table(
    runs: dict[str, dict[str, list[dict[str, float]]]], moved: dict[str, tuple[int, int]]
) -> None:
    print("\nlfm's start-up, per method: wall s median (min-max), CPU s, MiB")
    print("| method | `--help` s | `--help` CPU s | `--help` MiB | `PLAN --check` s | `--check` CPU s "
          "| `--check` MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for method, r in runs.items():
        h, c = r["startup"], r["check"]
        print(
            f"| {method} | {_spread(h, 's', 2)} | {_med(h, 'cpu'):.2f} | {_med(h, 'mib'):.0f} "
            f"| {_spread(c, 's', 2)} | {_med(c, 'cpu'):.2f} | {_med(c, 'mib'):.0f} |"
        )
    print(
        "\nI/O floor: read every input once + write one output of lfm's size (plain Python, "
        "16 MiB chunks, no fsync); MB = 10^6 bytes; share of the floor's throughput = floor s / "
        "lfm s; 'less --help' / 'less --check': lfm s minus that start-up median of the method"
    )
    print(
        "| method | MB read | MB written | floor s | floor CPU s | floor MiB | floor MB/s | lfm s "
        "| lfm MB/s | lfm share of floor | share, less --help | share, less --check |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method, r in runs.items():
        rd, wr = moved[method]
        mb = (rd + wr) / 1e6
        fl, lf = _med(r["floor"], "s"), _med(r["lfm"], "s")
        h, c = _med(r["startup"], "s"), _med(r["check"], "s")
        print(
            f"| {method} | {rd / 1e6:.0f} | {wr / 1e6:.0f} | {_spread(r['floor'], 's', 2)} "
            f"| {_med(r['floor'], 'cpu'):.2f} | {_med(r['floor'], 'mib'):.0f} | {mb / fl:.0f} "
            f"| {lf:.2f} | {mb / lf:.0f} | {fl / lf:.0%} | {fl / (lf - h):.0%} "
            f"(of {lf - h:.2f} s) | {fl / (lf - c):.0%} (of {lf - c:.2f} s) |"
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
    ap.add_argument("--mk-settings", default=",".join(MK_SETTINGS), help="mergekit setting sets")
    ap.add_argument("--lfm-threads", type=int, default=2, help="OMP_NUM_THREADS of lfm's runs")
    a = ap.parse_args()
    settings = a.mk_settings.split(",")
    if unknown := [x for x in settings if x not in MK_SETTINGS]:
        ap.error(f"unknown --mk-settings {','.join(unknown)}; known: {','.join(MK_SETTINGS)}")
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    part_mergekit(
        a.work, a.n_models, a.sigma, a.methods.split(","), a.repeats, settings, a.lfm_threads
    )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
