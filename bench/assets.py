"""Load times of the offline models: first load (GGUF dequantised and cached) against later loads
(fp32 safetensors from the cache), each in a fresh process with a fresh cache folder.

A fresh Python process also pays a one-time import of the architecture's transformers modules
(seconds on a busy machine); it is timed apart from the load itself and printed beside it.

    python bench/assets.py [--models smollm2-135m gemma3-270m] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import importlib, json, sys, time
t = time.perf_counter()
from lfm.assets import load_model
for m in ("configuration", "modeling"):
    importlib.import_module(f"transformers.models.{sys.argv[2]}.{m}_{sys.argv[2]}")
importlib.import_module("transformers.tokenization_utils_tokenizers")
imports = time.perf_counter() - t
t = time.perf_counter(); h = load_model(sys.argv[1]); dt = time.perf_counter() - t
print(json.dumps({"load_s": dt, "imports_s": imports}))
"""
ARCH = {"smollm2-135m": "llama", "gemma3-270m": "gemma3"}


def timed_load(model: str, cache: str) -> dict[str, float]:
    env = {**os.environ, "LFM_CACHE": cache}
    cmd = [sys.executable, "-c", CHILD, model, ARCH[model]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    head = ("model", "first load (s)", "second+ load (s)", "ratio", "imports, once a process (s)")
    print(f"{head[0]:<14} {head[1]:>15} {head[2]:>17} {head[3]:>7} {head[4]:>28}")
    for model in args.models:
        with tempfile.TemporaryDirectory() as cache:
            first = timed_load(model, cache)["load_s"]
            warm = [timed_load(model, cache) for _ in range(args.repeats)]
        med = statistics.median(w["load_s"] for w in warm)
        imp = statistics.median(w["imports_s"] for w in warm)
        print(f"{model:<14} {first:>15.2f} {med:>17.3f} {first / med:>6.0f}x {imp:>28.2f}")
    print(
        f"(second+ load: median of {args.repeats} fresh processes with a warm cache; load_model() alone)"
    )


if __name__ == "__main__":
    main()
