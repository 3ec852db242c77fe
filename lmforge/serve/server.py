"""Load a model and serve it with uvicorn, with limits on what one client can hold: a connection must
deliver each request whole within `request_timeout` seconds, at most `max_connections` are served at once
(more get 503), headers are capped by h11 (16 KiB) and bodies by the app (1 MiB)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from lmforge.config.errors import ConfigError
from lmforge.data.templates import end_of_turn_ids
from lmforge.models.load import load_for_inference
from lmforge.serve.access_log import log_to_stderr
from lmforge.serve.app import create_app
from lmforge.serve.batcher import Batcher
from lmforge.serve.guard import protocol_with_deadline

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          api_key: str | None = None, max_batch_size: int = 16, queue_size: int = 64,
          default_max_tokens: int = 256, request_timeout: float = 20.0, max_connections: int = 256,
          access_log: bool = True) -> None:
    import uvicorn  # imported on use: only this command needs it

    if min(max_batch_size, queue_size, default_max_tokens, max_connections) < 1 or request_timeout <= 0:
        raise ConfigError("--max-batch-size, --queue-size, --max-tokens and --max-connections must be at least 1, "
                          "--request-timeout above 0")
    console = Console(stderr=True)
    if host not in LOOPBACK and api_key is None:
        console.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach this "
                      "address can use the model")
    model, tokenizer = load_for_inference(model_path)
    name = name or Path(model_path.rstrip("/")).name
    batcher = Batcher(model, tokenizer, end_of_turn_ids(tokenizer), max_batch_size, queue_size).start()
    app = create_app(model, tokenizer, name, batcher, api_key=api_key, default_max_tokens=default_max_tokens,
                     access_log=access_log)
    if access_log:
        log_to_stderr()
    console.print(f"serving {name!r} at http://{host}:{port}/v1 ({max_batch_size} rows decoded together, "
                  f"{batcher.max_len} positions each, {queue_size} waiting at most{', API key required' if api_key else ''}"
                  f"{'' if access_log else ', no access log'})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                    http=protocol_with_deadline(request_timeout), limit_concurrency=max_connections,
                    timeout_keep_alive=5)
    finally:
        batcher.stop()
