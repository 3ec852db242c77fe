"""Load a model and serve it with uvicorn."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lmforge.config.schema import ConfigError
from lmforge.data.templates import end_of_turn_ids
from lmforge.models.load import load_for_inference
from lmforge.serve.app import create_app
from lmforge.serve.batcher import Batcher

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          api_key: str | None = None, max_batch_size: int = 16, queue_size: int = 64,
          default_max_tokens: int = 256) -> None:
    import uvicorn  # imported on use: only this command needs it

    if max_batch_size < 1 or queue_size < 1 or default_max_tokens < 1:
        raise ConfigError("--max-batch-size, --queue-size and --max-tokens must be at least 1")
    console = Console(stderr=True)
    if host not in LOOPBACK and api_key is None:
        console.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach this "
                      "address can use the model")
    model, tokenizer = load_for_inference(model_path)
    name = name or Path(model_path.rstrip("/")).name
    batcher = Batcher(model, tokenizer, end_of_turn_ids(tokenizer), max_batch_size, queue_size).start()
    app = create_app(model, tokenizer, name, batcher, api_key=api_key, default_max_tokens=default_max_tokens)
    console.print(f"serving {name!r} at http://{host}:{port}/v1 (batches of up to {max_batch_size}, "
                  f"{queue_size} waiting at most{', API key required' if api_key else ''})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        batcher.stop()
