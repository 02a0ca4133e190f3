"""Throughput of `lfm serve` under concurrent scoring clients, the server in its own process.

The server (`lfm serve --access scores`) runs in a subprocess with `--threads` torch threads; the
clients run in this process on one asyncio loop with one `httpx.AsyncClient`, each sending one
scoring request at a time (`/v1/completions` with echo and logprobs 0, as `RemoteModel.score`
sends it). Rows, measured in one invocation and interleaved over `--repeats` (medians):

  (a) 1 client, sequential one-prompt requests: req/s, p50, p99;
  (b) `--clients` clients: req/s, p50, p99, ratio to (a), mean items per forward pass (from the
      server's `lfm_batching` counters in `/v1/models`);
  (c) the ceiling: one client sending requests of `--clients` prompts each: items/s, ratio to (a)
      (one request of 32 prompts against 32 sequential one-prompt requests).

    .venv/bin/python bench/serve_load.py                      # defaults: 20 s per row, 3 repeats
    .venv/bin/python bench/serve_load.py --max-wait-ms 5 --max-batch 32 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def args_() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    p.add_argument("--seconds", type=float, default=20.0, help="measured time per row")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=None, help="passed to lfm serve")
    p.add_argument("--max-batch", type=int, default=None, help="passed to lfm serve")
    p.add_argument("--extra", default="", help="further `lfm serve` options, space-separated")
    p.add_argument("--variants", default="",
                   help="';'-separated `lfm serve` option sets, one server each, measured "
                        "interleaved in this invocation (e.g. ';--max-wait-ms 100')")  # fmt: skip
    return p.parse_args()


def start_server(a: argparse.Namespace, log: Path, variant: str) -> tuple[subprocess.Popen, str]:
    """`lfm serve` in a subprocess; returns once `/health` answers."""
    from lfm.serve.thread import free_port, wait_healthy

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    code = f"import torch; torch.set_num_threads({a.threads}); import lfm.cli; lfm.cli.main()"
    cmd = [sys.executable, "-c", code, "serve", "--model", a.model, "--access", "scores",
           "--port", str(port)]  # fmt: skip
    if a.max_wait_ms is not None:
        cmd += ["--max-wait-ms", str(a.max_wait_ms)]
    if a.max_batch is not None:
        cmd += ["--max-batch", str(a.max_batch)]
    cmd += a.extra.split() + variant.split()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return proc, url


def body(prompts: list[str]) -> dict:
    """The body `RemoteModel.score(prompts, [" Paris"] * n)` sends."""
    return {"prompt": [p + " Paris" for p in prompts], "max_tokens": 0, "echo": True, "logprobs": 0}


async def batching(c: httpx.AsyncClient) -> dict[str, int]:
    return (await c.get("/v1/models")).json()["data"][0]["lfm_batching"]


async def load(c: httpx.AsyncClient, clients: int, per_request: int, seconds: float,
               tag: str) -> dict:  # fmt: skip
    """`clients` loops, each sending one request of `per_request` prompts at a time."""
    lat: list[float] = []
    fails = [0]
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        n = 0
        while time.perf_counter() < stop:
            prompts = [f"Request {tag}{i}-{n}-{k}: the capital of France is"
                       for k in range(per_request)]  # fmt: skip
            t = time.perf_counter()
            r = await c.post("/v1/completions", json=body(prompts))
            if r.status_code == 200 and len(r.json()["choices"]) == per_request:
                lat.append(time.perf_counter() - t)
            else:
                fails[0] += 1
            n += 1

    before = await batching(c)
    t0 = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(clients)])
    wall = time.perf_counter() - t0
    after = await batching(c)
    passes = after["passes"] - before["passes"]
    lat.sort()
    return {
        "req_s": len(lat) / wall,
        "items_s": len(lat) * per_request / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "items_per_pass": (after["items"] - before["items"]) / max(passes, 1),
        "failed": fails[0],
        "n": len(lat),
    }


async def measure(a: argparse.Namespace, urls: dict[str, str]) -> list[dict]:
    limits = httpx.Limits(max_connections=a.clients + 8, max_keepalive_connections=a.clients + 8)
    rows = []
    clients = {
        v: httpx.AsyncClient(base_url=u, timeout=120, limits=limits) for v, u in urls.items()
    }
    plan = [("a", 1, 1), ("b", a.clients, 1), ("c", 1, a.clients)]
    for rep in range(a.repeats):
        for v, c in clients.items():
            for name, n, per in plan:
                await load(c, n, per, a.warmup, f"w{rep}{name}")  # warm-up, not counted
                r = await load(c, n, per, a.seconds, f"{rep}{name}")
                r.update(row=name, rep=rep, variant=v)
                print(f"# rep {rep} [{v or 'defaults'}] row {name}: " + ", ".join(
                    f"{k} {x:.2f}" for k, x in r.items() if isinstance(x, float)
                ) + f", n {r['n']}, failed {r['failed']}", flush=True)  # fmt: skip
                rows.append(r)
    for c in clients.values():
        await c.aclose()
    return rows


def table(a: argparse.Namespace, rows: list[dict], variants: list[str]) -> str:
    n = a.clients
    out = [
        "| server options | row | req/s | items/s | p50 ms | p99 ms | items per pass | vs (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        mine = [r for r in rows if r["variant"] == v]

        def med(name: str, key: str, mine: list[dict] = mine) -> float:
            return statistics.median(r[key] for r in mine if r["row"] == name)

        base = {r["rep"]: r["req_s"] for r in mine if r["row"] == "a"}
        for name, label, key in [("a", "(a) 1 client, 1 prompt per request", "req_s"),
                                 ("b", f"(b) {n} clients, 1 prompt per request", "req_s"),
                                 ("c", f"(c) 1 client, {n} prompts per request", "items_s")]:  # fmt: skip
            # the median of the per-repeat ratios to (a) of the same server and repeat
            ratio = statistics.median(r[key] / base[r["rep"]] for r in mine if r["row"] == name)
            out.append(f"| {v or 'defaults'} | {label} | {med(name, 'req_s'):.2f} | "
                       f"{med(name, 'items_s'):.1f} | {med(name, 'p50_ms'):.0f} | "
                       f"{med(name, 'p99_ms'):.0f} | {med(name, 'items_per_pass'):.1f} | "
                       f"{ratio:.2f}x |")  # fmt: skip
    fails = sum(r["failed"] for r in rows)
    return "\n".join(out) + f"\n\nfailed requests: {fails}"


def main() -> None:
    a = args_()
    variants = a.variants.split(";") if a.variants else [""]
    print(f"# {vars(a)}", flush=True)
    print(f"# load average before: {os.getloadavg()}", flush=True)
    procs, urls = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, v in enumerate(variants):
                proc, urls[v] = start_server(a, Path(tmp) / f"serve{i}.log", v)
                procs.append(proc)
            rows = asyncio.run(measure(a, urls))
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    print(f"# load average after: {os.getloadavg()}", flush=True)
    print(table(a, rows, variants))


if __name__ == "__main__":
    main()
