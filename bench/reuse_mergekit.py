"""Benchmark: lfm's streaming merge beside mergekit on SmolLM2-135M, and peak memory vs model size.

Part 1 (`--part mergekit`): the cached fp32 SmolLM2-135M folder is the base; `--n-models` seeded
variants (base + N(0, σ²) noise on every float tensor) are written as Hugging Face folders. The same
mergekit YAML goes through mergekit's CLI (`mergekit-yaml`, in its own venv) and through
`lfm reuse merge`, each in a fresh subprocess; the table gives wall time, the child's peak RSS
(ru_maxrss), the ratios lfm / mergekit, and the largest absolute difference between the outputs.

Part 2 (`--part size`): synthetic models whose largest tensor is the same but with 1x and 2x as many
tensors; lfm's peak RSS should stay about flat (it holds a few tensors per input and one shard).

    .venv/bin/python bench/reuse_mergekit.py                  # both parts
    .venv/bin/python bench/reuse_mergekit.py --part size      # no mergekit needed

The mergekit venv is made once under `$LFM_CACHE` (default /tmp): `python3.11 -m venv` and
`pip install torch==2.13.0 mergekit`. The parent imports no torch: a child would inherit its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
# Runs a command, then prints the child's peak RSS: ru_maxrss of RUSAGE_CHILDREN is the largest
# of the waited-for children, and this wrapper has exactly one.
TIMED = (
    "import resource,subprocess,sys,time;t=time.perf_counter();"
    "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE,text=True);"
    "s=time.perf_counter()-t;m=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024;"
    "print('@@',r.returncode,s,m);sys.stderr.write(r.stderr[-2000:] if r.returncode else '')"
)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of `cmd` run in a fresh process."""
    p = subprocess.run([sys.executable, "-c", TIMED, *cmd], capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("@@")), None)
    if line is None or line.split()[1] != "0":
        raise RuntimeError(f"{cmd[0]} failed: {p.stderr[-1500:]}")
    _, _, s, m = line.split()
    return float(s), float(m)


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


def build_synthetic(root: Path, n_tensors: int, side: int, n_models: int) -> None:
    """A base and perturbed copies with `n_tensors` tensors of side x side, one file each."""
    import torch
    from safetensors.torch import save_file

    for m in range(n_models + 1):
        gen = torch.Generator().manual_seed(m)
        sd = {
            f"layers.{i}.weight": torch.randn(side, side, generator=gen) for i in range(n_tensors)
        }
        folder = root / ("base" if m == 0 else f"ft{m}")
        folder.mkdir()
        save_file(sd, str(folder / "model.safetensors"), {"format": "pt"})


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
    ]


def mk_cmd(exe: Path, plan: Path, out: Path) -> list[str]:
    return [str(exe), str(plan), str(out), "--lazy-unpickle", "--no-cuda", "--allow-crimes"]


def child(args: list[str]) -> dict:
    p = subprocess.run([str(LFM_PY), __file__, *args], capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-1500:])
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {}


def part_mergekit(work: Path, n: int, sigma: float, methods: list[str]) -> None:
    exe = ensure_mergekit()
    root = work / "smol"
    if not root.exists():
        root.mkdir(parents=True)
        child(["--child", "build", str(root), str(n), str(sigma)])
    rows = []
    for method in methods:
        plan = write_yaml(work / f"{method}.yml", method, root, n)
        t_l, m_l = timed(lfm_cmd(plan, _fresh(work / f"lfm-{method}")))
        row = {"method": method, "lfm_s": t_l, "lfm_mib": m_l}
        if exe is not None:
            t_m, m_m = timed(mk_cmd(exe, plan, _fresh(work / f"mk-{method}")))
            cmp = child(
                ["--child", "compare", str(work / f"lfm-{method}"), str(work / f"mk-{method}")]
            )
            row |= {"mk_s": t_m, "mk_mib": m_m, **cmp}
        rows.append(row)
        print(json.dumps(row), flush=True)
    _table(rows)


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _table(rows: list[dict]) -> None:
    print(
        "\n| method | lfm s | mergekit s | time ratio | lfm MiB | mergekit MiB | RSS ratio | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "mk_s" not in r:
            print(f"| {r['method']} | {r['lfm_s']:.1f} | - | - | {r['lfm_mib']:.0f} | - | - | - |")
            continue
        print(
            f"| {r['method']} | {r['lfm_s']:.1f} | {r['mk_s']:.1f} | {r['lfm_s'] / r['mk_s']:.2f} "
            f"| {r['lfm_mib']:.0f} | {r['mk_mib']:.0f} | {r['lfm_mib'] / r['mk_mib']:.2f} "
            f"| {r['max_abs']:.2e} ({r['frac_diff']:.1%} of entries differ) |"
        )


def part_size(work: Path, side: int, n_tensors: int) -> None:
    print(f"\n| tensors (each {side}x{side} fp32) | model MB | lfm ties peak MiB | seconds |")
    print("|---|---|---|---|")
    for k in (1, 2):
        root = work / f"syn{k}"
        if not root.exists():
            root.mkdir(parents=True)
            child(["--child", "synthetic", str(root), str(k * n_tensors), str(side), "2"])
        plan = root / "plan.yml"
        plan.write_text(
            f"method: ties\nbase: {root / 'base'}\nmodels: [{root / 'ft1'}, {root / 'ft2'}]\n"
            "parameters: {density: 0.2}\nmax_shard_size: 64MB\n"
        )
        t, m = timed(lfm_cmd(plan, _fresh(root / "out")))
        mb = k * n_tensors * side * side * 4 / 1e6
        print(f"| {k * n_tensors} | {mb:.0f} | {m:.0f} | {t:.1f} |", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        what, *rest = sys.argv[2:]
        if what == "build":
            build_variants(Path(rest[0]), int(rest[1]), float(rest[2]))
        elif what == "compare":
            compare(rest[0], rest[1])
        elif what == "synthetic":
            build_synthetic(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["all", "mergekit", "size"], default="all")
    ap.add_argument("--work", type=Path, default=CACHE / "lfm-bench-mergekit")
    ap.add_argument("--n-models", type=int, default=2)
    ap.add_argument("--sigma", type=float, default=1e-3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--tensors", type=int, default=12)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if a.part in ("all", "mergekit"):
        part_mergekit(a.work, a.n_models, a.sigma, a.methods.split(","))
    if a.part in ("all", "size"):
        part_size(a.work, a.side, a.tensors)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
