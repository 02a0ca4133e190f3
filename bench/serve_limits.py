"""Benchmark: what one client can do to `lfm serve`, probed as an operator would.

    python bench/serve_limits.py                 # every probe, a table of what the server did
    python bench/serve_limits.py --only chunked  # some probes (comma-separated names)
    PYTHONPATH=/other/checkout/src python bench/serve_limits.py   # the same probes, other code

Each probe starts a fresh server in a subprocess (`--serve`) on a tiny model with a real
vocabulary: a 2-layer, 32-wide Llama with the SmolLM2 tokenizer (49,152 tokens; the tiny BPE
tokenizer with a 49,152-row output layer when that asset is missing) and a 2,048-token context, so
a full-vocabulary answer costs what it costs on SmolLM2. The server's resident memory (RSS) is
sampled every 20 ms; a probe that takes the server more than `--cap-gb` above idle is stopped and
reported as "> cap". The server runs with its defaults; the key is set (the auth probes need it).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

KEY = "bench-key"
MODEL_PATH = "/srv/models/bench-tiny-llama"  # the name the model is served under: a local path


# -- the server ---------------------------------------------------------------------------------


def _tokenizer():
    try:
        from transformers import AutoTokenizer

        from lfm.assets.models import MODELS, convert_gguf

        return AutoTokenizer.from_pretrained(convert_gguf(MODELS["smollm2-135m"].locate()))
    except Exception:  # the asset is not installed: the tiny tokenizer, same output width
        from lfm.tuning.tiny import news_tokenizer

        return news_tokenizer()


def _model():
    import torch
    from transformers import AutoModelForCausalLM

    from lfm.access import LocalModel
    from lfm.core.tiny import tiny_config

    tok = _tokenizer()
    torch.manual_seed(0)
    config = tiny_config("llama", 49152, max_positions=2048)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return LocalModel(model, tok, name=MODEL_PATH)


def serve(port: int, timeout_s: float) -> None:
    """Serve the bench model on loopback with the server's defaults (and a key)."""
    import torch
    import uvicorn

    from lfm.serve import Backend, ServeSettings, build_app

    torch.set_num_threads(1)
    settings = ServeSettings(api_key=KEY, timeout_s=timeout_s)
    app = build_app(Backend(_model(), "scores"), settings)
    try:  # the server's own connection limits, where this version has them
        from lfm.serve.limits import uvicorn_config

        config = uvicorn_config(app, "127.0.0.1", port, settings)
    except ImportError:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uvicorn.Server(config).run()


class Server:
    """A server subprocess and a watcher of its RSS (killed past `cap` bytes above idle)."""

    def __init__(self, cap: int, timeout_s: float = 60.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, __file__, "--serve", str(self.port), "--timeout-s", str(timeout_s)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        self._wait_up()
        self.ps = psutil.Process(self.proc.pid)
        self.idle = self.ps.memory_info().rss
        self.peak, self.cap, self.capped = self.idle, cap, False
        self._stop = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("the bench server did not start")

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.ps.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            if rss - self.idle > self.cap:
                self.capped = True
                self.proc.kill()
                return
            time.sleep(0.02)

    def grew(self) -> str:
        gib = self.cap / 2**30
        return (
            f"> {gib:.0f} GiB (cap)"
            if self.capped
            else f"+{(self.peak - self.idle) / 2**20:,.0f} MiB"
        )

    def close(self) -> None:
        self._stop.set()
        self.proc.kill()
        self.proc.wait()


# -- helpers ------------------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}"}


def _post(url: str, path: str, body: object, timeout: float = 300) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        r = httpx.post(url + path, json=body, headers=AUTH, timeout=timeout)
        return str(r.status_code), time.monotonic() - t0
    except httpx.HTTPError as e:
        return type(e).__name__, time.monotonic() - t0


def _in_background(fn: Callable[[], object]) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def _health_while(srv: Server, thread: threading.Thread, limit_s: float) -> list[float]:
    """/health latencies (s) every 50 ms while `thread` runs (at most `limit_s`), over one
    kept-alive connection (a new client per call would time its own set-up)."""
    lat, end = [], time.monotonic() + limit_s
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        client.get("/health")
        while thread.is_alive() and time.monotonic() < end and not srv.capped:
            t0 = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                client.get("/health")
            lat.append(time.monotonic() - t0)
            time.sleep(0.05)
    return lat


def _prompt(tokens: int) -> str:
    """A text of about `tokens` tokens for the bench tokenizer (" the" is one token in both)."""
    return "the" + " the" * (tokens - 2)


def _ms(s: float) -> str:
    return f"{s * 1000:,.0f} ms"


# -- the probes ---------------------------------------------------------------------------------


def chunked(cap: int) -> list[str]:
    """A 65 MB body sent chunked (no Content-Length), one long word."""
    srv = Server(cap)
    try:

        def body():
            yield b'{"max_tokens": 0, "prompt": "'
            for _ in range(65):
                yield b"a" * 2**20
            yield b'"}'

        t0 = time.monotonic()
        try:
            r = httpx.post(srv.url + "/v1/completions", content=body(), headers=AUTH, timeout=300)
            status = str(r.status_code)
        except httpx.HTTPError as e:
            status = type(e).__name__
        return ["chunked 65 MB body", status, _ms(time.monotonic() - t0), srv.grew()]
    finally:
        srv.close()


def long_word(cap: int) -> list[str]:
    """One 2 MB word with a Content-Length under the body limit."""
    srv = Server(cap)
    try:
        status, took = _post(
            srv.url, "/v1/completions", {"prompt": "a" * 2_000_000, "max_tokens": 0}
        )
        return ["2 MB one-word prompt", status, _ms(took), srv.grew()]
    finally:
        srv.close()


def health_tokenising(cap: int) -> list[str]:
    """/health while a 4 MB prompt is received and tokenised."""
    srv = Server(cap)
    try:
        body = {"prompt": "word " * 800_000, "max_tokens": 0}
        t, out = _in_background(lambda: _post(srv.url, "/v1/completions", body))
        lat = _health_while(srv, t, 120)
        t.join(120)
        status = out[0][0] if out else "-"
        worst = f"/health max {_ms(max(lat))}" if lat else "-"
        return ["/health during a 4 MB prompt", status, worst, srv.grew()]
    finally:
        srv.close()


def echo(cap: int, n: int = 4) -> list[str]:
    """Echo log-probabilities of n 2,000-token prompts in one request."""
    srv = Server(cap)
    try:
        body = {"prompt": [_prompt(2000)] * n, "max_tokens": 0, "echo": True, "logprobs": 0}
        status, took = _post(srv.url, "/v1/completions", body)
        return [f"echo {n} x 2,000 tokens", status, _ms(took), srv.grew()]
    finally:
        srv.close()


def next_token(cap: int, n: int = 8) -> list[str]:
    """Full next-token rows of n 2,000-token prompts in one request."""
    srv = Server(cap)
    try:
        status, took = _post(
            srv.url, "/v1/lfm/next_token_logprobs", {"prompt": [_prompt(2000)] * n}
        )
        return [f"next_token_logprobs {n} x 2,000", status, _ms(took), srv.grew()]
    finally:
        srv.close()


def behind(cap: int) -> list[str]:
    """A 1-token request sent 0.5 s after a large echo (64 x 1,000 tokens) started."""
    srv = Server(cap)
    try:
        big = {"prompt": [_prompt(1000)] * 64, "max_tokens": 0, "echo": True, "logprobs": 0}
        t, out = _in_background(lambda: _post(srv.url, "/v1/completions", big))
        time.sleep(0.5)
        small = {"prompt": "the", "max_tokens": 0, "echo": True, "logprobs": 0}
        status, took = _post(srv.url, "/v1/completions", small)
        t.join(300)
        large = f"large: {out[0][0]} in {_ms(out[0][1])}" if out else "large: -"
        return ["1-token echo behind a large echo", status, f"{_ms(took)} ({large})", srv.grew()]
    finally:
        srv.close()


def timeout(cap: int, limit_s: float = 60.0) -> list[str]:
    """With --timeout-s 2: a large echo times out; then 1-token requests (each under the same
    2 s) until one is answered: how long the worker stays busy with the abandoned request."""
    srv = Server(cap, timeout_s=2.0)
    try:
        big = {"prompt": [_prompt(1000)] * 64, "max_tokens": 0, "echo": True, "logprobs": 0}
        status, _ = _post(srv.url, "/v1/completions", big)
        small = {"prompt": "the", "max_tokens": 0, "echo": True, "logprobs": 0}
        t0, after = time.monotonic(), "-"
        while time.monotonic() - t0 < limit_s and after != "200" and not srv.capped:
            after, _ = _post(srv.url, "/v1/completions", small)
        return ["timeout-s 2: large echo, then 1-token echoes", f"{status}, then {after}",
                f"first 200 after {_ms(time.monotonic() - t0)}", srv.grew()]  # fmt: skip
    finally:
        srv.close()


def trickle(cap: int, n: int = 40, limit_s: float = 30.0) -> list[str]:
    """n connections sending their headers one byte a second: how long the server holds them."""
    srv = Server(cap)
    try:
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(n)]
        line = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        open_, t0 = set(range(n)), time.monotonic()
        for k in range(len(line)):
            for i in list(open_):
                try:
                    socks[i].sendall(line[k : k + 1])
                except OSError:
                    open_.discard(i)
            if not open_ or time.monotonic() - t0 > limit_s:
                break
            time.sleep(1.0)
        held = time.monotonic() - t0
        health, _ = _post_get(srv.url + "/health")
        for s in socks:
            s.close()
        state = f"{len(open_)} of {n} still open" if open_ else f"all {n} closed"
        return [f"{n} trickling connections", f"/health {health}",
                f"{state} after {held:.0f} s", srv.grew()]  # fmt: skip
    finally:
        srv.close()


def _post_get(url: str) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        return str(httpx.get(url, timeout=10).status_code), time.monotonic() - t0
    except httpx.HTTPError as e:
        return type(e).__name__, time.monotonic() - t0


def exposure(cap: int) -> list[str]:
    """Without the key: /openapi.json and /docs; the model path in answers; key without scheme."""
    srv = Server(cap)
    try:
        codes = [httpx.get(srv.url + p, timeout=10).status_code for p in ("/openapi.json", "/docs")]
        models = httpx.get(srv.url + "/v1/models", headers=AUTH, timeout=10).text
        spec = httpx.get(srv.url + "/openapi.json", headers=AUTH, timeout=10).text
        bare = httpx.get(srv.url + "/v1/models", headers={"Authorization": KEY}, timeout=10)
        lower = httpx.get(srv.url + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
        leak = "path shown" if MODEL_PATH in models + spec else "no path"
        return ["spec without key; path; bare key; 'bearer'",
                f"{codes[0]}/{codes[1]}; {leak}", f"bare {bare.status_code}, bearer {lower.status_code}",
                srv.grew()]  # fmt: skip
    finally:
        srv.close()


def largest(cap: int) -> list[str]:
    """/health while the largest allowed request runs: echo of 256 texts of 2,047 tokens."""
    srv = Server(cap)
    try:
        body = {"prompt": [_prompt(2047)] * 256, "max_tokens": 0, "echo": True, "logprobs": 0}
        t, out = _in_background(lambda: _post(srv.url, "/v1/completions", body))
        lat = sorted(_health_while(srv, t, 300))
        t.join(300)
        status = f"{out[0][0]} in {_ms(out[0][1])}" if out else "-"
        p50 = lat[len(lat) // 2] if lat else 0.0
        return ["/health during echo 256 x 2,047", status,
                f"/health p50 {_ms(p50)}, max {_ms(max(lat or [0.0]))}", srv.grew()]  # fmt: skip
    finally:
        srv.close()


PROBES = {"chunked": chunked, "long_word": long_word, "health": health_tokenising, "echo": echo,
          "next": next_token, "behind": behind, "timeout": timeout, "trickle": trickle,
          "exposure": exposure, "largest": largest}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(PROBES), help="probes to run, comma-separated")
    ap.add_argument("--cap-gb", type=float, default=3.0, help="RSS growth that stops a probe")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--timeout-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.timeout_s)
        return
    import lfm

    print(f"lfm from {Path(lfm.__file__).parent}; cap {args.cap_gb} GiB above idle RSS")
    print("| probe | status | time / what | server RSS growth (peak) |")
    print("|---|---|---|---|")
    for name in args.only.split(","):
        row = PROBES[name](int(args.cap_gb * 2**30))
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
