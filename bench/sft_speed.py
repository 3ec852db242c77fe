"""SFT/PT training speed on one GPU: lmforge's own Trainer and loss, beside TRL's SFTTrainer in the same run.

The workload is the peer harness's (../shared/peer-bench/sft.py): a random-init Llama (model A 349M or
B 1.1B), synthetic documents of 200-2000 random tokens, packed into rows of 2048, 8 rows a step, bf16
weights, gradients and AdamW state, 5 warm-up and 25 timed steps. lmforge packs whole documents
(first-fit decreasing) and keeps them apart in attention (variable-length flash attention), with the
chunked cross-entropy and fused AdamW; `--modes eager,compile` runs it without and with compiled blocks.

    python bench/sft_speed.py --model B --modes eager,compile --peer .peer --out bench/results/sft_speed_h100.json

`--peer DIR` runs DIR/sft.py (a copy of the peer harness) with --strategy bfd (TRL's default packing)
and wrapped (TRL's fastest) on the same model, after lmforge, in the same process tree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_and_versions, run_fresh, run_peer_script  # noqa: E402

MODELS = {  # the peer's shapes (Llama, untied embeddings, vocabulary 32000)
    "A": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
              intermediate_size=2816),
    "B": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632),
    "T": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128),
}
PEAK_FLOPS = 989e12  # H100 SXM dense bf16 datasheet, as the peer's MFU uses
PAD = 3


def build_model(name: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=False, **MODELS[name])
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def synthetic_rows(steps: int, batch: int, seq: int) -> list[dict]:
    """The peer's documents: lengths uniform in [200, 2000], random ids in [4, 32000), seed 0."""
    g = torch.Generator().manual_seed(0)
    need = int(steps * batch * seq * 1.15)
    count = int(need / 1100) + 16
    lengths = torch.randint(200, 2001, (count,), generator=g).tolist()
    return [{"input_ids": ids, "labels": list(ids)}
            for ids in (torch.randint(4, 32000, (n,), generator=g).tolist() for n in lengths)]


def run_lmforge(args, compile_blocks: bool) -> dict:
    from lmforge.config.schema import LogConfig, TrainConfig
    from lmforge.data.packing import collate, pack_samples
    from lmforge.loop.trainer import Trainer
    from lmforge.models.attention import VARLEN, register
    from lmforge.models.heads import lm_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    register()
    model = build_model(args.model, torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.set_attn_implementation(VARLEN)
    model.config.use_cache = False
    total_steps = args.warmup + args.steps + (1 if args.profile else 0)
    rows = pack_samples(synthetic_rows(total_steps, args.batch, args.seq), args.seq)
    cfg = TrainConfig(output_dir=f"/tmp/lmforge_bench_{os.getpid()}", batch_size=args.batch, max_steps=total_steps,
                      lr=1e-4, warmup_ratio=0.0, logging_steps=10**9, compile=compile_blocks, fused_loss=True)
    check = {}
    if not compile_blocks:  # the fast path's loss against transformers' SDPA with its block-diagonal mask
        batch = {k: v.to(device) for k, v in collate(rows[:args.batch], pad_id=PAD).items()}
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            plain = lm_loss(model, batch, fused=False)
            model.set_attn_implementation(VARLEN)
            fast = lm_loss(model, batch, fused=True)
        check = {"check_sdpa_dense_loss": round(float(plain[0] / plain[1]), 5),
                 "check_fast_loss": round(float(fast[0] / fast[1]), 5)}
    trainer = Trainer(model, rows, partial(collate, pad_id=PAD), partial(lm_loss, fused=args.fused),
                      cfg, LogConfig(report_to=[], progress=False))
    # Timing without a synchronisation per step (that would stop the host from running ahead): the clock
    # is read after the warm-up and at the end, each after a synchronisation; real (non-pad) tokens are
    # counted on the device and read once.
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    state = {"step": 0, "tokens": torch.zeros((), dtype=torch.long, device=device), "first": None}
    losses: list[float] = []
    plain_step = trainer.step

    def timed_step(group):
        state["step"] += 1
        profiling = args.profile and device == "cuda" and state["step"] == total_steps
        if profiling:
            sync()
            state["end"] = time.perf_counter()
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                out = plain_step(group)
                sync()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
            print(f"profile of one more step ({'compile' if compile_blocks else 'eager'}):\n{table}", flush=True)
            return out
        out = plain_step(group)
        losses.append(out["loss"])
        if state["step"] > args.warmup:
            state["tokens"] += sum((b["input_ids"] != PAD).sum() for b in group)
        if state["step"] == 1:
            state["first"] = time.perf_counter() - started
        if state["step"] == args.warmup:
            sync()
            state["start"] = time.perf_counter()
        if state["step"] == args.warmup + args.steps:
            sync()
            state["end"] = time.perf_counter()
        return out

    trainer.step = timed_step
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = state["end"] - state["start"]
    tokens = int(state["tokens"])
    step_s = seconds / args.steps
    tok_s = tokens / seconds
    parameters = sum(p.numel() for p in model.parameters())
    return {"who": "lmforge", "mode": "compile" if compile_blocks else "eager", "model": args.model,
            "parameters": parameters, "tokens_per_s": round(tok_s), "step_s": round(step_s, 4),
            "mfu_pct": round(100 * 6 * parameters * tok_s / PEAK_FLOPS, 1),
            "first_step_s": round(state["first"], 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "real_tokens_per_step": round(tokens / args.steps), "packed_rows": len(rows),
            "attention": "lmforge_varlen (documents kept apart)", "fused_loss": args.fused,
            "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4), **check}


def run_peer(args, strategy: str) -> dict:
    return run_peer_script(Path(args.peer) / "sft.py", ["--model", args.model, "--strategy", strategy, "--steps",
                                                        str(args.steps), "--warmup", str(args.warmup)],
                           {"strategy": strategy})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="B", choices=list(MODELS))
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-fused", dest="fused", action="store_false")
    parser.add_argument("--profile", action="store_true",
                        help="print the CUDA kernel table of one extra step (with --single)")
    parser.add_argument("--peer", help="a folder holding the peer harness (sft.py, common.py)")
    parser.add_argument("--peer-strategies", default="bfd,wrapped")
    parser.add_argument("--single", choices=["eager", "compile"], help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()

    if args.single:  # one measurement in this (fresh) process, printed as the last line
        print(json.dumps(run_lmforge(args, compile_blocks=args.single == "compile")), flush=True)
        return
    rows = []
    for mode in args.modes.split(","):  # each mode in its own process, as a user's run would be
        command = [sys.executable, __file__, "--single", mode, "--model", args.model, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq)]
        command += (["--no-fused"] if not args.fused else []) + (["--profile"] if args.profile else [])
        rows.append(run_fresh(command, {"who": "lmforge", "mode": mode}))
        print(json.dumps(rows[-1]), flush=True)
    if args.peer:
        for strategy in args.peer_strategies.split(","):
            rows.append(run_peer(args, strategy))
            print(json.dumps(rows[-1]), flush=True)
    result = {**machine_and_versions(), "workload": {"model": args.model, "seq": args.seq, "rows_per_step": args.batch, "steps": args.steps,
                           "warmup": args.warmup, "precision": "bf16 weights, grads and AdamW state"},
              "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
