"""Load test of `lmforge serve`: today's server (`engine`: continuous batching on the generation engine) beside
the fixed-batch server it replaced (`fixed-batch`: rows left-padded into one HF `generate` call, the tree
before commit 32e559d, prepared by bench/serve_baseline.sh), in one run, on loopback, same model and settings.

Each side: a fresh server, a warm-up round (not counted), then `--requests` streamed chat requests,
`--concurrency` at a time (closed loop: a client sends its next request when its reply ends), prompts of
token lengths drawn uniformly from `--prompt-tokens`, greedy, `--max-tokens` each. Per request: time to
first token (TTFT: sending -> first content chunk) and per-token latency ((last chunk - first chunk) /
(completion tokens - 1)); tokens are counted from the usage chunk (stream_options.include_usage).

    bench/serve_baseline.sh .serve-baseline
    python bench/serve_load.py --model random-A --baseline-root .serve-baseline --requests 512 \
        --concurrency 64 --max-tokens 128 --out bench/results/serve_load_h100.json

It prints each side's row as it ends, rewrites --out after each side, ends by itself within
--time-limit seconds (a side cut off reports what finished) and stops its servers on any exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_and_versions  # noqa: E402
from serve_workload import build_random_model, mixed_prompts  # noqa: E402

SIDES = ("engine", "fixed-batch")
DTYPE_PROBE = ("import dataclasses; from lmforge.config.schema import ModelConfig; "
               "print(next(f.default for f in dataclasses.fields(ModelConfig) if f.name == 'dtype'))")


def side_root(side: str, baseline_root: Path | None) -> Path:
    return ROOT if side == "engine" else baseline_root


def check_baseline(root: Path | None) -> Path:
    if root is None:
        raise SystemExit("--sides names fixed-batch but no --baseline-root: prepare one with "
                         "bench/serve_baseline.sh DIR and pass --baseline-root DIR")
    if not (root / "lmforge" / "rollout" / "stream.py").is_file():
        raise SystemExit(f"--baseline-root {root}: no lmforge/rollout/stream.py there (the fixed-batch server); "
                         "prepare it with bench/serve_baseline.sh DIR")
    return root.resolve()


def tree_env(root: Path) -> dict:
    """The environment that runs `root`'s lmforge: its folder first on PYTHONPATH, the caller's entries
    (wheels carried to a GPU machine, say) after it."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def served_dtype(root: Path) -> str:
    """The weights dtype `lmforge serve` of this tree loads (ModelConfig's default: serve has no option)."""
    try:
        done = subprocess.run([sys.executable, "-c", DTYPE_PROBE], capture_output=True, text=True,
                              env=tree_env(root), timeout=120)
    except subprocess.TimeoutExpired:
        return "unknown (the probe took over 120 s)"
    return done.stdout.strip() or f"unknown ({done.stderr.strip()[-200:]})"


class Server:
    """One `lmforge serve` process of the tree at `root`, in its own process group, stopped on exit."""

    def __init__(self, root: Path, model: str, args, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        self.command = [sys.executable, "-m", "lmforge.cli", "serve", model, "--port", str(self.port),
                        "--name", "bench", "--max-batch-size", str(args.max_batch_size),
                        "--queue-size", str(max(64, args.concurrency)),
                        "--max-connections", str(max(256, args.concurrency + 16))]
        with open(log, "wb") as sink:
            self.process = subprocess.Popen(self.command, cwd=root, stdout=sink, stderr=subprocess.STDOUT,
                                            env={**tree_env(root), "COLUMNS": "200"},
                                            start_new_session=True)

    def wait_ready(self, deadline: float) -> float:
        started = time.monotonic()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return time.monotonic() - started
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("the server did not answer /health before the time limit")

    def tail(self, lines: int = 8) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)


async def one_request(client, text: str, max_tokens: int) -> dict:
    """Stream one chat reply; its timings and counts, or {"error": ...}."""
    sent = time.perf_counter()
    first = last = None
    usage, finish, chunks = None, None, 0
    try:
        stream = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": text}], temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
                finish = choice.finish_reason or finish
    except Exception as error:  # counted and reported: the point of a load test
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    if usage is None:
        return {"error": "the stream ended without a usage chunk"}
    tokens = usage.completion_tokens
    return {"ttft": None if first is None else first - sent, "latency": time.perf_counter() - sent,
            "per_token": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None,
            "tokens": tokens, "prompt_tokens": usage.prompt_tokens, "chunks": chunks, "finish": finish}


async def drive(url: str, prompts: list[str], concurrency: int, max_tokens: int, records: list[dict]) -> None:
    """`concurrency` clients, each sending its next prompt as soon as its last reply ended."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    queue = iter(prompts)

    async def client_loop() -> None:
        for text in queue:
            records.append(await one_request(client, text, max_tokens))

    try:
        await asyncio.gather(*(client_loop() for _ in range(min(concurrency, len(prompts)))))
    finally:
        await client.close()


def load(url: str, prompts: list[str], concurrency: int, max_tokens: int, seconds: float) -> tuple[list, float, bool]:
    """(records, wall seconds, cut off) of one measured round, stopped after `seconds`."""
    records: list[dict] = []

    async def bounded() -> bool:
        try:
            await asyncio.wait_for(drive(url, prompts, concurrency, max_tokens, records), timeout=seconds)
            return False
        except asyncio.TimeoutError:
            return True

    started = time.perf_counter()
    cut = asyncio.run(bounded())
    return records, time.perf_counter() - started, cut


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1) of the values, None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def rounded(value: float | None, scale: float = 1) -> float | None:
    return None if value is None else round(value * scale, 4)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def summarise(records: list[dict], wall: float) -> dict:
    done = [r for r in records if "error" not in r]
    failures = [r["error"] for r in records if "error" in r]
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft"] for r in done if r["ttft"] is not None]
    per_token = [r["per_token"] for r in done if r["per_token"] is not None]
    latency = [r["latency"] for r in done]
    return {"completed": len(done), "failed": len(failures), "failures": failures[:5], "wall_s": round(wall, 2),
            "requests_per_s": round(len(done) / wall, 3), "output_tokens_per_s": round(tokens / wall, 1),
            "output_tokens": tokens, "output_tokens_counted_from": "usage.completion_tokens",
            "content_chunks": sum(r["chunks"] for r in done),
            "mean_prompt_tokens": round(sum(r["prompt_tokens"] for r in done) / max(1, len(done)), 1),
            "mean_completion_tokens": round(tokens / max(1, len(done)), 1),
            "ended_before_max_tokens": sum(r["finish"] != "length" for r in done),
            "ttft_p50_s": rounded(percentile(ttft, 0.5)), "ttft_p99_s": rounded(percentile(ttft, 0.99)),
            "per_token_p50_ms": rounded(percentile(per_token, 0.5), 1000),
            "per_token_p99_ms": rounded(percentile(per_token, 0.99), 1000),
            "latency_p50_s": rounded(percentile(latency, 0.5)), "latency_p99_s": rounded(percentile(latency, 0.99))}


def run_side(side: str, root: Path, model: str, args, prompts: list[str], warmup: list[str],
             deadline: float, logs: Path) -> dict:
    row = {"side": side, "tree": "this repository" if root == ROOT else str(root),
           "served_dtype": served_dtype(root), "max_batch_size": args.max_batch_size,
           "requests": len(prompts), "concurrency": args.concurrency, "max_tokens": args.max_tokens}
    server = Server(root, model, args, logs / f"{side}.log")
    try:
        row["startup_s"] = round(server.wait_ready(deadline), 1)
        # The banner tells which server answered (the engine's speaks of rows, the fixed batch's of batches).
        row["banner"] = next((line.strip() for line in server.log.read_text(errors="replace").splitlines()
                              if line.startswith("serving")), None)
        if warmup:
            _, row["warmup_s"], _ = load(server.url, warmup, args.concurrency, args.warmup_tokens,
                                         max(1.0, deadline - time.monotonic()))
            row["warmup_s"] = round(row["warmup_s"], 1)
        records, wall, cut = load(server.url, prompts, args.concurrency, args.max_tokens,
                                  max(1.0, deadline - time.monotonic()))
        row.update(summarise(records, wall), cut_off_by_time_limit=cut)
    except (RuntimeError, TimeoutError) as error:
        row["error"] = str(error)[:1500]
    finally:
        server.stop()
    if "error" not in row and (row["failed"] or row["cut_off_by_time_limit"]):
        row["server_log_tail"] = server.tail()
    return row


def compare(rows: list[dict]) -> dict | None:
    """Engine over fixed-batch, from each side's median over its rounds (one round: its only row)."""
    measured = {side: [r for r in rows if r["side"] == side and r.get("completed")] for side in SIDES}
    if not all(measured.values()):
        return None

    def median(side: str, key: str) -> float | None:
        values = [r[key] for r in measured[side] if r[key] is not None]
        return statistics.median(values) if values else None

    result = {f"{key}_engine_over_fixed": ratio(median("engine", key), median("fixed-batch", key))
              for key in ("output_tokens_per_s", "requests_per_s", "ttft_p99_s", "per_token_p99_ms")}
    rounds = {side: len(measured[side]) for side in SIDES}
    return {**result, "rounds_per_side": rounds, "aim": "output tokens/s >= 5x, p99 TTFT lower (issue 20)"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-A",
                        help="random-A / random-B / random-T (built here, random weights) or a model folder")
    parser.add_argument("--model-dir", help="where random-X is built (default: a temporary folder, removed)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                        help="saved weights of random-X (auto: bf16 on a GPU, fp32 on the CPU)")
    parser.add_argument("--baseline-root", type=Path,
                        help="a copy of the tree before commit 32e559d (bench/serve_baseline.sh DIR)")
    parser.add_argument("--sides", default=",".join(SIDES), help="which servers, in order: engine,fixed-batch")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each side this many times, the order alternating (a busy shared machine)")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int,
                        help="both servers' --max-batch-size (default: --concurrency)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", default="16,512", help="LOW,HIGH: user message lengths in tokens")
    parser.add_argument("--warmup", type=int, help="requests before the measured round (default: --concurrency)")
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=1800,
                        help="seconds for the whole run, shared equally by the sides left after the model is built; a side "
                        "still running at its share's end is cut and reports what ended")
    parser.add_argument("--out")
    args = parser.parse_args()
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or set(args.sides) - set(SIDES):
        parser.error(f"--sides {','.join(args.sides)}: name one or both of {', '.join(SIDES)}")
    args.max_batch_size = args.max_batch_size or args.concurrency
    args.warmup = args.concurrency if args.warmup is None else args.warmup
    if min(args.rounds, args.requests, args.concurrency, args.max_batch_size, args.max_tokens) < 1 \
            or args.warmup < 0:
        parser.error("--rounds, --requests, --concurrency, --max-batch-size and --max-tokens must be at least 1")
    try:
        args.prompt_tokens = tuple(int(v) for v in args.prompt_tokens.split(","))
        assert len(args.prompt_tokens) == 2
    except (ValueError, AssertionError):
        parser.error(f"--prompt-tokens {args.prompt_tokens}: give LOW,HIGH, e.g. 16,512")
    if "fixed-batch" in args.sides:
        args.baseline_root = check_baseline(args.baseline_root)
    return args


def model_folder(args, scratch: Path) -> tuple[str, dict]:
    """(the folder both servers load, what it is)."""
    if not args.model.startswith("random-"):
        if not Path(args.model).is_dir():
            raise SystemExit(f"--model {args.model}: not a folder (or random-A / random-B / random-T)")
        return args.model, {"folder": args.model}
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or \
        (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    out = Path(args.model_dir) if args.model_dir else scratch / args.model
    started = time.monotonic()
    build_random_model(args.model.removeprefix("random-"), out, dtype)
    info = json.loads((out / "bench_model.json").read_text())
    print(f"built {args.model} in {out} ({time.monotonic() - started:.0f} s)", flush=True)
    return str(out), {"name": args.model, **info}


def main() -> None:
    args = parse_args()
    deadline = time.monotonic() + args.time_limit
    # A SIGTERM (a time limit around this script) unwinds like an error, so every server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        run(args, deadline, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, deadline: float, scratch: Path) -> None:
    from transformers import AutoTokenizer

    model, model_info = model_folder(args, scratch)
    tokenizer = AutoTokenizer.from_pretrained(model)
    drawn = mixed_prompts(tokenizer, args.requests + args.warmup, *args.prompt_tokens, seed=args.seed)
    prompts, warmup = [t for t, _ in drawn[:args.requests]], [t for t, _ in drawn[args.requests:]]
    lengths = [n for _, n in drawn[:args.requests]]
    workload = {"model": model_info, "requests": args.requests, "concurrency": args.concurrency,
                "max_batch_size": args.max_batch_size, "max_tokens": args.max_tokens, "greedy": True,
                "prompt_tokens_drawn_uniform": list(args.prompt_tokens), "prompt_tokens_min_mean_max":
                [min(lengths), round(sum(lengths) / len(lengths), 1), max(lengths)], "seed": args.seed,
                "warmup_requests": args.warmup, "warmup_max_tokens": args.warmup_tokens,
                "streaming": "openai client, stream=True, stream_options.include_usage",
                "ttft": "request sent -> first chunk with content",
                "per_token_latency": "(last content chunk - first content chunk) / (completion tokens - 1)",
                "rounds": args.rounds,
                "time_limit_s": args.time_limit}
    notes = ["A random-init model almost never emits an end-of-turn token, so every request runs to max_tokens "
             "(ended_before_max_tokens counts the exceptions)." if args.model.startswith("random-") else
             "Replies may end before max_tokens (ended_before_max_tokens); compare tokens/s, not requests/s.",
             "Both servers load the weights with ModelConfig's default dtype (served_dtype): `lmforge serve` has "
             "no dtype option, so the saved dtype only sets the folder's size."]
    result = {**machine_and_versions(), "workload": workload, "notes": notes, "rows": []}
    # Rounds alternate the order (A B, B A, ...) so a machine getting busier or quieter over the run
    # weighs on both sides alike.
    runs = [(r, side) for r in range(args.rounds) for side in (args.sides if r % 2 == 0 else args.sides[::-1])]
    for k, (round_index, side) in enumerate(runs):
        left = deadline - time.monotonic()
        if left < 10:
            row = {"side": side, "error": "not run: under 10 s of --time-limit left"}
        else:  # an equal share of the time left, so a slow first side cannot starve the others
            row = run_side(side, side_root(side, args.baseline_root), model, args, prompts, warmup,
                           time.monotonic() + left / (len(runs) - k), scratch)
        row = {"round": round_index, **row}
        print(json.dumps(row), flush=True)
        result["rows"].append(row)
        result["comparison"] = compare(result["rows"])
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if result["comparison"]:
        print(json.dumps(result["comparison"]), flush=True)


if __name__ == "__main__":
    main()
