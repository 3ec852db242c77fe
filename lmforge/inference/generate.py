"""`lmforge generate MODEL --data FILE --out FILE.jsonl`: answer every prompt of a dataset on the generation
engine, `batch_size` rows decoding at once (a row that finishes takes the next prompt at the next step),
with a progress bar; written back in the file's order, one JSON line per record."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.progress import Progress

from lmforge.config.errors import ConfigError
from lmforge.data.templates import encode_prompts
from lmforge.generation import Request, RequestError, Sampling
from lmforge.rollout.generate import answer_engine, run_all, to_generation


def generate_file(model, tokenizer, records: list[dict], out: str | Path, params,
                  batch_size: int = 16, progress: bool = True) -> int:
    """Write one line per record: its prompt, the reply, whether the reply ended its turn, and the
    record's reference where it had one. `params` carries max_new_tokens, temperature, top_p and top_k.
    Returns the number written."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists: choose a new file (nothing is overwritten)")
    if isinstance(params.max_new_tokens, bool) or not isinstance(params.max_new_tokens, int) \
            or params.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be at least 1, got {params.max_new_tokens!r}")
    try:
        sampling = Sampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    except RequestError as error:
        raise ConfigError(f"generate sampling settings: {error}") from None
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records])
    requests = []
    for i, ids in enumerate(prompt_ids):
        try:
            requests.append(Request(ids, sampling, params.max_new_tokens))
        except RequestError as error:
            raise ConfigError(f"record {i + 1}: {error}") from None
    engine = answer_engine(model, tokenizer, prompt_ids, params.max_new_tokens, batch_size)
    for i, request in enumerate(requests):  # refuse a prompt that cannot fit before answering any
        try:
            engine._check_fits(request)
        except RequestError as error:
            raise ConfigError(f"record {i + 1}: {error}") from None
    with Progress(disable=not progress) as bar:
        task = bar.add_task("generate", total=len(records))
        results = run_all(engine, requests, lambda done: bar.advance(task, done))
    tmp = out.with_name(out.name + ".partial")
    with tmp.open("w", encoding="utf-8") as handle:
        for record, result in zip(records, results):
            reply = to_generation(tokenizer, result.samples[0].token_ids, result.samples[0].finish_reason)
            line = {"prompt": record["prompt"], "response": reply.text, "stopped": reply.stopped}
            if record.get("reference"):
                line["reference"] = record["reference"]
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(records)
