"""A tiny model served for the API fuzz run (docs/serve.md, "Fuzzing").

    python tests/serve/fuzz_server.py PORT [LEVEL] [llama|gpt2]

A 2-layer, 32-wide model keeps every fuzz case cheap: the Llama of `lfm.tuning.tiny`, or a
GPT-2 with 128 absolute positions (inputs past them fail inside the model unless the server refuses
them first). The server runs with its default limits (connection limits included), on 127.0.0.1 only.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import torch
import uvicorn

from lfm.access import LocalModel
from lfm.core.tiny import tiny_config
from lfm.serve import Backend, ServeSettings, build_app
from lfm.serve.limits import uvicorn_config
from lfm.tuning.tiny import news_tokenizer as tiny_tokenizer
from lfm.tuning.tiny import tiny_news_lm as tiny_lm


def tiny_gpt2() -> LocalModel:
    """A 2-layer, 32-wide GPT-2 with 128 absolute positions."""
    from transformers import GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config("gpt2", len(tok), max_positions=128)).eval()
    return LocalModel(model, tok, name="tiny-gpt2")


def main() -> None:
    torch.set_num_threads(1)
    port = int(sys.argv[1])
    level = sys.argv[2] if len(sys.argv) > 2 else "embeddings"
    arch = sys.argv[3] if len(sys.argv) > 3 else "llama"
    model = tiny_gpt2() if arch == "gpt2" else tiny_lm(0)
    settings = ServeSettings()
    app = build_app(Backend(model, level), settings)
    uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, settings)).run()


if __name__ == "__main__":
    main()
