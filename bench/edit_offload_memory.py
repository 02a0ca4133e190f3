"""Benchmark: where an offloaded edit's memory grows with the model's depth.

    .venv/bin/python bench/edit_offload_memory.py --stack 1 4

For each `--stack` (the folders of `bench/edit_offload.py`: SmolLM2-135M in bfloat16, its 30
blocks repeated in order), a fresh process makes the ROME edit of `bench/edit_offload.py` with
`--offload` (`lfm.edit.recipes.apply(..., offload=...)`, one thread, glibc's mmap threshold at
64 KiB as `lfm edit apply --offload` sets it) and reports, at its peak anonymous memory (RssAnon,
polled every 10 ms and at every block's start and end): glibc's `mallinfo2` (memory mapped for
allocations of 64 KiB and more, heap in use, heap free) and what the δ search keeps per block,
read from the arguments of each checkpointed block (the key/value cache of every block, the
block's input, which the checkpoint keeps for its recomputation). The parent prints each row and
the growth per added block between the first and last `--stack`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost",
        )
    ]  # fmt: skip


def rss_anon() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no RssAnon in /proc/self/status: this bench needs Linux")


def child(folder: str) -> None:
    import torch
    import torch.utils.checkpoint as tuc
    from edit_offload import REQUEST

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD, as `lfm edit apply --offload`
    MiB = 2**20
    peak: dict = {"rss_anon": 0.0}
    held: dict = {"cache_per_block": 0.0, "input_per_block": 0.0}

    def sample() -> None:
        r = rss_anon()
        if r > peak["rss_anon"]:
            m = libc.mallinfo2()
            peak.update(
                rss_anon=r, mapped=m.hblkhd / MiB, heap_used=m.uordblks / MiB,
                heap_free=m.fordblks / MiB,
            )  # fmt: skip

    checkpoint = tuc.checkpoint

    def watched(fn, *args, **kwargs):
        sample()
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is not None and hasattr(cache, "layers") and args:
            per = max(
                sum(v.untyped_storage().nbytes() for v in vars(layer).values()
                    if isinstance(v, torch.Tensor))
                for layer in cache.layers
            )  # fmt: skip
            if args[0].untyped_storage().nbytes() / MiB > held["input_per_block"]:
                held.update(input_per_block=args[0].untyped_storage().nbytes() / MiB,
                            input_shape=list(args[0].shape))  # fmt: skip
            held["cache_per_block"] = max(held["cache_per_block"], per / MiB)

        def run(*a, **k):
            out = fn(*a, **k)
            sample()
            return out

        return checkpoint(run, *args, **kwargs)

    tuc.checkpoint = watched
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            sample()
            time.sleep(0.01)

    threading.Thread(target=poll, daemon=True).start()
    from lfm.edit import recipes

    with tempfile.TemporaryDirectory() as tmp:
        start = rss_anon()
        recipes.apply(
            folder, "rome", recipes.requests_from(*REQUEST), f"{tmp}/p.safetensors",
            offload=f"{tmp}/off", root=f"{tmp}/runs",
        )  # fmt: skip
    done.set()
    blocks = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]
    print(json.dumps({"blocks": blocks, "start": start, **peak, **held}))


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stack", type=positive, nargs="+", default=[1, 4])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child)
    from edit_offload import model_folder

    rows = []
    for stack in a.stack:
        folder = model_folder(a.model, "bfloat16", stack)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(folder)], check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{r['blocks']} blocks: peak RssAnon {r['rss_anon']:.1f} MiB (start {r['start']:.1f});"
            f" mapped {r['mapped']:.1f}, heap in use {r['heap_used']:.1f}, heap free "
            f"{r['heap_free']:.1f}; per block: K/V cache {r['cache_per_block']:.3f} MiB, "
            f"checkpointed input {r['input_per_block']:.3f} MiB {tuple(r['input_shape'])}",
            flush=True,
        )
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        n = hi["blocks"] - lo["blocks"]
        parts = ("rss_anon", "mapped", "heap_used", "heap_free")
        print(f"growth per added block ({n} blocks): "
              + ", ".join(f"{k} {(hi[k] - lo[k]) / n:.3f} MiB" for k in parts))  # fmt: skip


if __name__ == "__main__":
    main()
