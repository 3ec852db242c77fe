"""`lmforge generate MODEL --data FILE --out FILE.jsonl`: answer every prompt of a dataset, batched.

Prompts are sorted by length before batching (left padding then wastes little), answered in
batches with a progress bar, and written back in the file's order, one JSON line per record."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.progress import Progress

from lmforge.config.schema import ConfigError
from lmforge.rollout.sample import HFBackend, SamplingParams, encode_prompts, sample


def generate_file(model, tokenizer, records: list[dict], out: str | Path, params: SamplingParams,
                  batch_size: int = 16, progress: bool = True) -> int:
    """Write one line per record: its prompt, the reply, whether the reply ended its turn, and the
    record's reference where it had one. Returns the number written."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: choose a new file (nothing is overwritten)")
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records])
    order = sorted(range(len(records)), key=lambda i: len(prompt_ids[i]))
    replies: dict[int, tuple[str, bool]] = {}
    backend = HFBackend(batch_size)
    with Progress(disable=not progress) as bar:
        task = bar.add_task("generate", total=len(records))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            samples = sample(backend, model, tokenizer, [prompt_ids[i] for i in chunk], params)
            for i, text, stopped in zip(chunk, samples.texts, samples.stopped.tolist()):
                replies[i] = (text, stopped)
            bar.advance(task, len(chunk))
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w", encoding="utf-8") as handle:
        for i, record in enumerate(records):
            text, stopped = replies[i]
            line = {"prompt": record["prompt"], "response": text, "stopped": stopped}
            if record.get("reference"):
                line["reference"] = record["reference"]
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(records)
