"""DPO reference log-probs: a live frozen copy vs a cached pass (`dpo.precompute_ref=true`).

Each mode runs in its own process so peak memory (max RSS on CPU, max allocated on CUDA) is its own.
Writes one JSON file with the machine, the versions and both rows.

    python bench/precompute_ref.py --out bench/results/precompute_ref_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.config.schema import DPOConfig, LogConfig, TrainConfig
from lmforge.data.preference import collate_pairs
from lmforge.loop.trainer import Trainer
from lmforge.models.reference import Reference, precompute
from lmforge.stages.dpo import preference_loss

SHAPE = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 1408, "vocab_size": 8000}  # the `small` preset with an 8k vocabulary


def pairs(n: int, prompt: int, response: int) -> datasets.Dataset:
    g = torch.Generator().manual_seed(0)
    rand = lambda k: torch.randint(1, SHAPE["vocab_size"], (k,), generator=g).tolist()  # noqa: E731
    return datasets.Dataset.from_list([{"prompt_ids": rand(prompt), "chosen_ids": rand(response),
                                        "rejected_ids": rand(response)} for _ in range(n)])


def run_mode(mode: str, steps: int, batch: int, prompt: int, response: int) -> dict:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(device)
    rows = pairs(batch * (steps + 2), prompt, response)
    collate = partial(collate_pairs, pad_id=0)
    cfg = TrainConfig(output_dir=f"/tmp/bench_ref_{mode}", batch_size=batch, max_steps=steps + 2, lr=1e-5,
                      logging_steps=10**9)
    precompute_s = 0.0
    if mode == "live":  # what lmforge does without precompute_ref under full fine-tuning: a frozen copy
        frozen = LlamaForCausalLM(LlamaConfig(**SHAPE)).requires_grad_(False).eval()
        frozen.load_state_dict(policy.state_dict())
        reference = Reference("copy", frozen.to(device))
    else:  # before the first step the policy is the reference: the cached pass needs no copy
        reference = Reference("copy", policy)
        started = time.perf_counter()
        rows = precompute(reference, policy, rows, collate, batch, device,
                          Path(cfg.output_dir) / f"ref-{time.time_ns()}.safetensors", ("ref_chosen", "ref_rejected"))
        precompute_s = time.perf_counter() - started
        reference = None
    trainer = Trainer(policy, rows, collate, partial(preference_loss, cfg=DPOConfig(), reference=reference),
                      cfg, LogConfig(report_to=[], progress=False))
    timings = []
    original_step = trainer.step

    def timed_step(group):
        started = time.perf_counter()
        out = original_step(group)
        timings.append(time.perf_counter() - started)
        return out

    trainer.step = timed_step
    trainer.train()
    measured = timings[2:]  # the first steps warm up allocators and kernels
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"mode": mode, "pairs_per_s": round(batch * len(measured) / sum(measured), 2),
            "peak_memory_gib": round(peak, 3), "memory_kind": "cuda max allocated" if device == "cuda" else "max RSS",
            "precompute_s": round(precompute_s, 2), "steps_timed": len(measured), "batch_pairs": batch,
            "tokens_per_pair": prompt + 2 * response, "params_m": round(policy.num_parameters() / 1e6, 1)}


def machine() -> dict:
    import accelerate
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available()
            else None, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["live", "precompute"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--out", default="bench/results/precompute_ref_cpu.json")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.steps, args.batch, args.prompt, args.response)))
        return
    rows = []
    for mode in ("live", "precompute"):
        command = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--prompt", str(args.prompt), "--response", str(args.response)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    result = {"benchmark": "dpo reference: live frozen copy vs cached pass", "machine": machine(), "rows": rows,
              "speedup": round(rows[1]["pairs_per_s"] / rows[0]["pairs_per_s"], 3),
              "memory_ratio": round(rows[1]["peak_memory_gib"] / rows[0]["peak_memory_gib"], 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
