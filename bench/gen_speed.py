"""Rollout generation speed on one GPU: the rollout backends (transformers generate with a dynamic or a
static, compiled cache; lmforge's own decoder, eager or compiled step, CUDA graph), model A (349M), 128 prompts of 128 random tokens, 256 sampled tokens each (the peer's
gen_speed.py workload). Generation is 90% of a GRPO step, so this is the number RL speed rests on.

    python bench/gen_speed.py --out bench/results/gen_speed_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
from common import write_result  # noqa: E402
from sft_speed import PAD, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="A")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--backends", default="hf,hf-static,lmforge,lmforge-compile")
    parser.add_argument("--out")
    args = parser.parse_args()

    from lmforge.rollout.decode import LMForgeBackend
    from lmforge.rollout.sample import HFBackend, SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, 32000, (args.batch, args.prompt), generator=g).tolist()
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0)
    backends = {"hf": lambda: HFBackend(batch_size=args.batch),  # transformers generate, dynamic cache
                "hf-static": lambda: HFBackend(batch_size=args.batch, static_cache=True),  # its compiled decoding
                "lmforge": lambda: LMForgeBackend(batch_size=args.batch),  # our decoder, CUDA graph
                "lmforge-compile": lambda: LMForgeBackend(batch_size=args.batch, compile=True)}
    rows = []
    for name in args.backends.split(","):
        backend = backends[name]()
        started = time.perf_counter()
        backend.generate(model, prompts, params, stop_ids=[0], pad_id=PAD)  # warm-up (and compilation)
        first = time.perf_counter() - started
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = backend.generate(model, prompts, params, stop_ids=[0], pad_id=PAD)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(len(r) for r in out)
        rows.append({"backend": name, "tokens_per_s": round(tokens / seconds),
                     "ms_per_step": round(seconds / args.new * 1000, 2), "first_call_s": round(first, 1)})
        print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, vars(args), rows)


if __name__ == "__main__":
    main()
