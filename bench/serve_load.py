"""Load test of `lmforge serve`: a fixed number of chat requests, a fixed number at a time, on loopback,
with batching off (--max-batch-size 1) and on; reports failures, requests/s, generated tokens/s and
latency percentiles for each. It starts and stops the servers itself and ends by itself.

    python bench/serve_load.py --model smollm2-135m-instruct --requests 200 --concurrency 16 \
        --out bench/results/serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_and_versions  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "llamafactory" / "alpaca_en_demo.json"


def prompts_from_alpaca(limit: int) -> list[str]:
    records = json.loads(ALPACA.read_text(encoding="utf-8"))
    return [(r["instruction"] + ("\n" + r["input"] if r.get("input") else ""))[:400] for r in records[:limit]]


def start_server(model: str, batch_size: int, queue_size: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", model, "--port", str(port),
                                "--name", "bench", "--max-batch-size", str(batch_size), "--queue-size",
                                str(queue_size)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return process, url
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start in 5 minutes")


async def load(url: str, prompts: list[str], requests: int, concurrency: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
    gate = asyncio.Semaphore(concurrency)
    latencies, tokens, failures = [], [], []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                reply = await client.chat.completions.create(
                    model="bench", messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                    temperature=0, max_tokens=max_tokens)
                tokens.append(reply.usage.completion_tokens)
                latencies.append(time.perf_counter() - started)
            except Exception as error:  # counted and reported: the point of the test
                failures.append(f"{type(error).__name__}: {error}")

    await asyncio.gather(*(one(i) for i in range(2)))  # warm-up, not counted
    latencies.clear(), tokens.clear()
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    seconds = time.perf_counter() - started
    latencies.sort()
    pick = (lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)) if latencies else None
    return {"requests": requests, "concurrency": concurrency, "failed": len(failures),
            "failures": failures[:5], "seconds": round(seconds, 1), "requests_per_s": round(len(tokens) / seconds, 2),
            "tokens_per_s": round(sum(tokens) / seconds, 1), "mean_completion_tokens": round(sum(tokens) / max(1, len(tokens)), 1),
            "latency_p50_s": pick(0.5) if pick else None, "latency_p95_s": pick(0.95) if pick else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,16", help="server --max-batch-size values; 1 is batching off")
    parser.add_argument("--out")
    args = parser.parse_args()

    prompts = prompts_from_alpaca(args.requests)
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        process, url = start_server(args.model, batch_size, queue_size=max(64, args.concurrency))
        try:
            row = {"max_batch_size": batch_size, "batching": batch_size > 1,
                   **asyncio.run(load(url, prompts, args.requests, args.concurrency, args.max_tokens))}
        finally:
            process.terminate()
            process.wait(timeout=60)
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {**machine_and_versions(), "model": args.model, "max_tokens": args.max_tokens, "greedy": True, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
