"""DPO training speed on one GPU: lmforge's DPO loss and Trainer beside TRL's DPOTrainer in the same run.

The peer harness's workload (../shared/peer-bench/dpo.py): random-init model A (349M), 512 synthetic pairs
of a 256-token prompt and 256-token chosen and rejected replies (the last token EOS), 8 pairs a step,
bf16 weights, gradients and AdamW state, 5 warm-up and 25 timed steps. lmforge runs chosen and rejected
in one forward pass, log-probs from hidden states in chunks (no [16 x 512 x 32000] logits), fused AdamW,
and optionally compiled blocks; the reference either as a frozen copy run each step (`ref`) or as one
cached pass before training (`precompute`, timed separately).

    python bench/dpo_speed.py --modes precompute:eager,precompute:compile,ref:compile --peer .peer \
        --out bench/results/dpo_speed_h100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
from common import machine_and_versions, run_fresh, run_peer_script  # noqa: E402
from sft_speed import PAD, build_model  # noqa: E402


def synthetic_pairs(count: int, prompt: int, reply: int):
    import datasets

    g = torch.Generator().manual_seed(0)

    def words(n):
        return torch.randint(4, 32000, (n,), generator=g).tolist()

    return datasets.Dataset.from_list([{"prompt_ids": words(prompt), "chosen_ids": words(reply - 1) + [2],
                                        "rejected_ids": words(reply - 1) + [2]} for _ in range(count)])


def run_lmforge(args, mode: str) -> dict:
    from lmforge.config.schema import DPOConfig, LogConfig, TrainConfig
    from lmforge.data.preference import collate_pairs
    from lmforge.loop.trainer import Trainer, compile_blocks, pair_count
    from lmforge.models.reference import Reference, precompute
    from lmforge.stages.dpo import preference_loss

    reference_kind, compiled = mode.split(":")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.config.use_cache = False
    rows = synthetic_pairs(args.pairs, args.prompt, args.reply)
    collate = partial(collate_pairs, pad_id=PAD)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    precompute_s = None
    reference = None
    if reference_kind == "precompute":
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            rows = precompute(Reference("copy", model), model, rows, collate, 2 * args.batch, device,
                              Path(tmp) / "ref.safetensors", ("ref_chosen", "ref_rejected"))
        precompute_s = round(time.perf_counter() - started, 2)
    else:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        if compiled == "compile":
            compile_blocks(frozen)
        reference = Reference("copy", frozen)
    total_steps = args.warmup + args.steps
    cfg = TrainConfig(output_dir=f"/tmp/lmforge_dpo_{os.getpid()}", batch_size=args.batch, max_steps=total_steps,
                      lr=1e-6, warmup_ratio=0.0, logging_steps=10**9, compile=compiled == "compile", fused_loss=True)
    loss = partial(preference_loss, cfg=DPOConfig(beta=0.1), reference=reference, fused=args.fused)
    trainer = Trainer(model, rows, collate, loss, cfg, LogConfig(report_to=[], progress=False), count_fn=pair_count)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state: dict = {"step": 0}
    plain_step = trainer.step

    def timed_step(group):
        out = plain_step(group)
        state["step"] += 1
        state["last"] = out
        if state["step"] in (args.warmup, total_steps):
            sync()
            state[state["step"]] = time.perf_counter()
        return out

    trainer.step = timed_step
    trainer.train()
    seconds = state[total_steps] - state[args.warmup]
    return {"who": "lmforge", "mode": mode, "model": args.model, "pairs_per_s": round(args.steps * args.batch / seconds, 1),
            "step_s": round(seconds / args.steps, 4), "precompute_s": precompute_s,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "fused_logps": args.fused, "final_loss": round(state["last"]["loss"], 4),
            "final_reward_accuracy": state["last"].get("reward_accuracy")}


def run_peer(args, mode: str) -> dict:
    return run_peer_script(Path(args.peer) / "dpo.py", ["--model", args.model, "--mode", mode, "--steps",
                                                        str(args.steps), "--warmup", str(args.warmup)], {"mode": mode})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="A")
    parser.add_argument("--modes", default="precompute:eager,precompute:compile,ref:compile")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--reply", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-fused", dest="fused", action="store_false")
    parser.add_argument("--peer", help="a folder holding the peer harness (dpo.py, common.py)")
    parser.add_argument("--peer-modes", default="ref,precompute")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_lmforge(args, args.single)), flush=True)
        return

    rows = []
    for mode in args.modes.split(","):  # each in a fresh process
        command = [sys.executable, __file__, "--single", mode, "--model", args.model, "--pairs", str(args.pairs),
                   "--prompt", str(args.prompt), "--reply", str(args.reply), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)] + ([] if args.fused else ["--no-fused"])
        rows.append(run_fresh(command, {"who": "lmforge", "mode": mode}))
        print(json.dumps(rows[-1]), flush=True)
    if args.peer:
        for mode in args.peer_modes.split(","):
            rows.append(run_peer(args, mode))
            print(json.dumps(rows[-1]), flush=True)
    result = {**machine_and_versions(), "workload": {"model": args.model, "pairs_per_step": args.batch, "prompt": args.prompt, "reply": args.reply,
                           "steps": args.steps, "warmup": args.warmup, "precision": "bf16 weights, grads, AdamW state"},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
