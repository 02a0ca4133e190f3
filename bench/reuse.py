"""Benchmark: streaming TIES merge vs loading every state dict fully, peak RSS and wall time.

Builds a synthetic model set (a base and 3 fine-tuned models of ~`--mb` MB of fp32 tensors each,
every tensor 1024 x 1024, in 2 safetensors shards with an index) in a temp dir, then runs each merge
in a fresh subprocess (one torch thread) and prints the child's peak resident memory (ru_maxrss) and
wall time. With `--sizes 150,300` the streaming merge also runs on larger model sets (same largest
tensor, more tensors) and the growth of its peak over the first size is printed: the streaming
engine holds a few tensors per input model, so the growth should be within noise. The parent
process imports no torch and builds nothing itself: a child inherits its parent's peak RSS.

    .venv/bin/python bench/reuse.py                      # 3 models x 150 MB
    .venv/bin/python bench/reuse.py --sizes 150,300      # and the peak at twice the size
    .venv/bin/python bench/reuse.py --mb 40              # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

SIDE = 1024  # tensors are SIDE x SIDE fp32 (4 MiB)
SHARD = "32MB"  # output shard size of the streaming engine


def build(root: Path, mb: int, n_models: int = 3) -> list[Path]:
    """Write a base and `n_models` perturbed copies, each in two shards with an index."""
    import torch
    from safetensors.torch import save_file

    n = max(2, mb * 2**20 // (SIDE * SIDE * 4))
    gen = torch.Generator().manual_seed(0)
    paths = []
    for m in range(n_models + 1):
        folder = root / ("base" if m == 0 else f"ft{m}")
        folder.mkdir()
        wmap = {}
        for shard in range(2):
            names = [f"layers.{i}.weight" for i in range(n) if i % 2 == shard]
            tensors = {k: _tensor(k, m, gen) for k in names}
            fname = f"model-{shard + 1:05d}-of-00002.safetensors"
            save_file(tensors, str(folder / fname))
            wmap.update(dict.fromkeys(names, fname))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
        paths.append(folder)
    return paths


def _tensor(name: str, model: int, gen: Any) -> Any:
    import torch

    base = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = torch.randn(SIDE, SIDE, generator=base)
    return x if model == 0 else x + 0.01 * torch.randn(SIDE, SIDE, generator=gen)


def child(mode: str, base: str, models: list[str], out: str) -> None:
    """Run one merge in this process and print peak RSS (MiB) and seconds as JSON."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    from lfm.reuse import merge_models, merge_state_dicts

    t0 = time.perf_counter()
    if mode == "imports":
        pass  # the floor: Python, torch and lfm loaded, nothing merged
    elif mode == "stream":
        merge_models("ties", models, out, base=base, max_shard_size=SHARD, progress=False)
    else:
        sds = [_load_all(Path(p)) for p in models]
        merged = merge_state_dicts("ties", _load_all(Path(base)), sds)
        Path(out).mkdir()
        save_file(merged, str(Path(out) / "model.safetensors"))
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rss_mib": rss, "seconds": seconds}))


def _load_all(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def run(mode: str, paths: list[Path], out: Path) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", mode, str(out), *map(str, paths)]
    res = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child_main(argv: list[str], mb: int) -> None:
    mode, out, *paths = argv
    if mode == "build":
        build(Path(out), mb)
    elif mode == "compare":
        print(json.dumps({"same": _same(_load_all(Path(out)), _load_all(Path(paths[0])))}))
    else:
        child(mode, paths[0], paths[1:], out)


def _build(tmp: str, mb: int) -> list[Path]:
    root = Path(tmp)
    subprocess.run([sys.executable, __file__, "--mb", str(mb), "--child", "build", tmp], check=True)
    return [root / n for n in ("base", "ft1", "ft2", "ft3")]


def compare_engines(mb: int) -> None:
    """Naive vs streaming TIES at one size, and the floor of a process that only imports."""
    with tempfile.TemporaryDirectory(prefix="lfm-bench-reuse-") as tmp:
        root = Path(tmp)
        paths = _build(tmp, mb)
        naive = run("naive", paths, root / "naive")
        stream = run("stream", paths, root / "stream")
        floor = run("imports", paths, root / "none")
        same = run("compare", [root / "stream"], root / "naive")["same"]
    print(
        f"TIES merge of 3 models + base, {mb} MB fp32 each (2 shards each), output shards {SHARD}"
    )
    print(f"{'engine':<28}{'peak RSS (MiB)':>16}{'wall (s)':>10}")
    print(f"{'imports only (floor)':<28}{floor['rss_mib']:>16.0f}{'':>10}")
    print(f"{'naive (load all, merge)':<28}{naive['rss_mib']:>16.0f}{naive['seconds']:>10.2f}")
    print(f"{'streaming (lfm)':<28}{stream['rss_mib']:>16.0f}{stream['seconds']:>10.2f}")
    print(f"{'ratio naive / streaming':<28}{naive['rss_mib'] / stream['rss_mib']:>16.2f}"
          f"{naive['seconds'] / stream['seconds']:>10.2f}")  # fmt: skip
    extra = (naive["rss_mib"] - floor["rss_mib"]) / max(stream["rss_mib"] - floor["rss_mib"], 1)
    print(f"{'ratio above the floor':<28}{extra:>16.2f}")
    print(f"identical merged tensors: {same}", flush=True)


def peak_vs_size(sizes: list[int], repeats: int) -> None:
    """Peak RSS of the streaming merge at each model size (`repeats` fresh processes each)."""
    print(f"\nstreaming TIES peak RSS vs model size ({repeats} runs each, median (min-max))")
    print(
        "| MB per model | tensors per model | peak RSS MiB | growth over the first MiB | wall s |"
    )
    print("|---|---|---|---|---|")
    first = None
    for mb in sizes:
        with tempfile.TemporaryDirectory(prefix="lfm-bench-reuse-") as tmp:
            paths = _build(tmp, mb)
            rs = [run("stream", paths, _fresh(Path(tmp) / "stream")) for _ in range(repeats)]
        peaks = [r["rss_mib"] for r in rs]
        med = statistics.median(peaks)
        first = med if first is None else first
        n = max(2, mb * 2**20 // (SIDE * SIDE * 4))
        wall = statistics.median(r["seconds"] for r in rs)
        print(f"| {mb} | {n} | {med:.0f} ({min(peaks):.0f}-{max(peaks):.0f}) "
              f"| {med - first:+.0f} | {wall:.1f} |", flush=True)  # fmt: skip


def _fresh(path: Path) -> Path:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=150, help="size of each model in MB")
    ap.add_argument("--sizes", help="comma-separated model sizes (MB) for the peak-vs-size table")
    ap.add_argument("--repeats", type=int, default=3, help="streaming runs per size")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return _child_main(a.child, a.mb)
    compare_engines(a.mb)
    if a.sizes:
        peak_vs_size([int(x) for x in a.sizes.split(",")], a.repeats)


if __name__ == "__main__":
    main()
