"""DPO training speed on one GPU: lmforge's DPO loss and Trainer beside TRL's DPOTrainer in the same run.

The peer harness's workload (../shared/peer-bench/dpo.py): random-init model A (349M), 512 synthetic pairs
of a 256-token prompt and 256-token chosen and rejected replies (the last token EOS), 8 pairs a step,
bf16 weights, gradients and AdamW state, 5 warm-up and 25 timed steps. lmforge runs chosen and rejected
in one forward pass, log-probs from hidden states in chunks (no [16 x 512 x 32000] logits), fused AdamW,
and optionally compiled blocks; the reference either as a frozen copy run each step (`ref`) or as one
cached pass before training (`precompute`, timed separately). `--share-prompt on,off` runs each mode with
the prompt shared by both replies (one row [prompt, chosen, rejected], what dpo.share_prompt does by
default) and with two rows per pair; the peer rows are unchanged.

    python bench/dpo_speed.py --modes precompute:eager,precompute:compile,ref:compile --share-prompt on,off \
        --peer .peer --out bench/results/dpo_speed_h100.json

On a CPU, `--model S` (a 23M-parameter Llama, fp32) and peak memory as the process's peak resident set
over the training steps (Linux VmHWM, reset after setup; each row in a fresh process; torch's CPU
allocator keeps no statistics and tracemalloc does not see tensor memory), also net of the resident
set at the first step:

    python bench/dpo_speed.py --model S --modes precompute:eager --prompt 256 --reply 64 --share-prompt on,off \
        --pairs 24 --steps 3 --warmup 1 --out bench/results/dpo_speed_share_prompt_cpu.json
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
from sft_speed import MODELS, PAD, build_model  # noqa: E402

SMALL = {"S": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=688)}
"""A model the 2-core CPU trains in seconds a step (23M parameters, 16M of them the 32000-word embeddings)."""


def make_model(name: str, dtype: torch.dtype, device: str):
    if name not in SMALL:
        return build_model(name, dtype, device)
    MODELS.setdefault(name, SMALL[name])  # sft_speed's builder, with one more shape
    return build_model(name, dtype, device)


def reset_peak_rss() -> float:
    """Start the peak resident set afresh (Linux: clear_refs 5 resets VmHWM), so the training steps' peak
    is not the reference pass's; the resident set now, in GiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_gib("VmRSS")


def _status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 2**20, 3)  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


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
    from lmforge.loop.trainer import Trainer, compile_blocks
    from lmforge.models.reference import Reference, precompute
    from lmforge.stages.dpo import preference_count, preference_loss

    reference_kind, compiled, share = mode.split(":")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.config.use_cache = False
    rows = synthetic_pairs(args.pairs, args.prompt, args.reply)
    collate = partial(collate_pairs, pad_id=PAD, share_prompt=share == "on")
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
    trainer = Trainer(model, rows, collate, loss, cfg, LogConfig(report_to=[], progress=False),
                      count_fn=preference_count)
    rss_before = reset_peak_rss() if device == "cpu" else None
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
    return {"who": "lmforge", "mode": mode, "share_prompt": share == "on", "model": args.model, "pairs_per_s": round(args.steps * args.batch / seconds, 1),
            "step_s": round(seconds / args.steps, 4), "precompute_s": precompute_s,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            **({} if device == "cuda" else {"peak_rss_gib": _status_gib("VmHWM"), "rss_at_start_gib": rss_before,
                                             "peak_rss_over_start_gib": round(_status_gib("VmHWM") - rss_before, 3)}),
            "fused_logps": args.fused, "final_loss": round(state["last"]["loss"], 4),
            "final_reward_accuracy": state["last"].get("reward_accuracy")}


def run_peer(args, mode: str) -> dict:
    return run_peer_script(Path(args.peer) / "dpo.py", ["--model", args.model, "--mode", mode, "--steps",
                                                        str(args.steps), "--warmup", str(args.warmup)], {"mode": mode})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="A", choices=[*MODELS, *SMALL])
    parser.add_argument("--modes", default="precompute:eager,precompute:compile,ref:compile")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--reply", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-fused", dest="fused", action="store_false")
    parser.add_argument("--share-prompt", default="on",
                        help="on, off, or on,off: each mode with the shared-prompt row, the two-row pair, or both")
    parser.add_argument("--peer", help="a folder holding the peer harness (dpo.py, common.py)")
    parser.add_argument("--peer-modes", default="ref,precompute")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_lmforge(args, args.single)), flush=True)
        return

    rows = []
    if not set(args.share_prompt.split(",")) <= {"on", "off"}:
        parser.error(f"--share-prompt takes on, off or on,off, not {args.share_prompt!r}")
    modes = [f"{mode}:{share}" for mode in args.modes.split(",") for share in args.share_prompt.split(",")]
    for mode in modes:  # each in a fresh process
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
                           "steps": args.steps, "warmup": args.warmup, "precision": "bf16 weights, grads, AdamW state" if torch.cuda.is_available() else "fp32"},
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
