"""Benchmark: start-up time of the catalogue commands, in fresh processes.

    python bench/startup.py              # 5 runs of each command, interleaved
    python bench/startup.py --runs 9

`lfm --help`, `lfm methods`, `lfm models` and `lfm datasets` read the catalogue file
(`lfm.cli.catalogue`) and import no torch; the target is 1 s each. For scale, the same table is
printed for `python -c "import torch"` and for `lfm tuning --help` (which imports its area);
`lfm plan smollm2-135m` reads its methods from the catalogue too (no area imported) but imports
torch to probe the target, so it has no 1 s target. Each
round runs every command once, in turn, so a busy moment of a shared machine falls on all of them;
the figure is the median wall time per command.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 1.0


def commands() -> dict[str, list[str]]:
    lfm = shutil.which("lfm") or f"{sys.prefix}/bin/lfm"
    return {
        "lfm --help": [lfm, "--help"],
        "lfm methods": [lfm, "methods"],
        "lfm models": [lfm, "models"],
        "lfm datasets": [lfm, "datasets"],
        "lfm tuning --help (for scale)": [lfm, "tuning", "--help"],
        # `lfm plan` places the methods from the catalogue too, but probes the target with torch
        "lfm plan smollm2-135m (imports torch; no 1 s target)": [lfm, "plan", "smollm2-135m"],
        "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    cmds = commands()
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.runs):
        for name, argv in cmds.items():
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times[name].append(time.perf_counter() - t0)
    print(f"| command | median s ({args.runs} fresh processes) | min | max | <= {TARGET_S:g} s |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        ok = (
            ""
            if "scale" in name or "no target" in name
            else ("yes" if statistics.median(ts) <= TARGET_S else "no")
        )
        print(f"| `{name}` | {statistics.median(ts):.2f} | {min(ts):.2f} | {max(ts):.2f} | {ok} |")


if __name__ == "__main__":
    main()
