"""LoRA and QLoRA SFT on an 8B-shape Llama, one GPU: lmforge's stage path beside TRL's SFTTrainer + peft.

The model has Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, FFN 14336, vocabulary
128256, untied head) with random weights, saved once as a bf16 safetensors folder that both sides load
the way their users do (lmforge: `stages.common.load_for_training`; TRL: `from_pretrained`). Both train
the same adapter (r 16, alpha 32, no dropout, every linear layer but the head: peft's "all-linear") on
a bf16 base with bf16 autocast (lmforge `model.dtype: bf16` + `train.mixed_precision: bf16`; TRL
`bf16=True`); QLoRA loads the base in 4 bits through lmforge's own bitsandbytes settings (NF4, double
quantisation, bf16 compute) on both sides.

Throughput rows: documents of 200-2000 random tokens packed into rows of `--seq` (4096), documents kept
apart in attention on both sides (lmforge: first-fit-decreasing packing + variable-length flash
attention; TRL: `packing_strategy="bfd"`, which forces padding-free rows and transformers' block mask),
`--batch` rows a step, 3 warm-up and 10 timed steps, no activation checkpointing unless `--ckpt`.
Longest-sequence rows: batch 1, one document of L tokens a row, L = 4k, 8k, 16k, 32k, 64k in turn in one
process (model loaded once), two optimizer steps each, with activation checkpointing on both sides
(transformers' per-decoder-layer checkpointing, non-reentrant), stopping at the first failure (its
error recorded). TRL's rows there are plain causal rows (no packing, no mask: its fastest attention).

    python bench/lora_8b.py --plan lora,qlora --out bench/results/lora_8b_h100.json

`--shape tiny` runs the same plumbing on a small model (a CPU check of the script).
Each measurement runs in its own process; rows are written to `--out` as they finish.
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
from common import machine_and_versions, run_fresh  # noqa: E402
from lora_8b_workload import (  # noqa: E402
    ALPHA,
    LENGTHS,
    PAD,
    SHAPES,
    R,
    device,
    documents,
    free,
    long_document,
    longest_row,
    make_checkpoint,
    peak,
    sweep_lengths,
    trainable,
)

# ---------------------------------------------------------------- lmforge


def lmforge_config(args, seq: int, steps: int, ckpt: bool):
    from lmforge.config.methods import LoraConfig
    from lmforge.config.schema import LogConfig, ModelConfig, StageConfig, TrainConfig

    half = "bf16" if device() == "cuda" else "no"
    return StageConfig(
        stage="sft",
        model=ModelConfig(name_or_path=args.ckpt_dir, dtype="bf16" if device() == "cuda" else "fp32",
                          finetuning=args.method, gradient_checkpointing=ckpt),
        lora=LoraConfig(r=R, alpha=ALPHA, dropout=0.0, target_modules="all-linear", bits=4),
        train=TrainConfig(output_dir=f"/tmp/lmforge_bench_{os.getpid()}_{seq}", batch_size=args.batch,
                          max_steps=steps, lr=1e-4, warmup_ratio=0.0, logging_steps=10**9, mixed_precision=half,
                          fused_loss=True, max_grad_norm=1.0),
        log=LogConfig(report_to=[], progress=False))


def lmforge_trainer(model, rows, cfg):
    from lmforge.data.packing import collate
    from lmforge.loop.trainer import Trainer
    from lmforge.models.heads import lm_loss

    return Trainer(model, rows, partial(collate, pad_id=PAD), partial(lm_loss, fused=True), cfg.train, cfg.log)


def timed_steps(trainer, warmup: int) -> dict:
    """lmforge's own step loop, timed after `warmup` steps (one synchronisation at each end); real
    tokens counted on the device."""
    sync = torch.cuda.synchronize if device() == "cuda" else (lambda: None)
    state = {"step": 0, "tokens": 0, "losses": []}
    plain = trainer.step

    def step(group):
        out = plain(group)
        state["step"] += 1
        state["losses"].append(out["loss"])
        if state["step"] > warmup:
            state["tokens"] += sum(int((b["input_ids"] != PAD).sum()) for b in group)
        if state["step"] == warmup:
            sync()
            state["start"] = time.perf_counter()
        return out

    trainer.step = step
    trainer._train_steps()  # the stage's loop without the final evaluation and checkpoint
    sync()
    state["seconds"] = time.perf_counter() - state["start"]
    return state


def run_lmforge_speed(args) -> dict:
    from lmforge.data.packing import pack_samples
    from lmforge.stages.common import load_for_training

    steps = args.warmup + args.steps
    cfg = lmforge_config(args, args.seq, steps, args.ckpt)
    model, _, _, _ = load_for_training(cfg)
    vocab = model.config.vocab_size
    docs = documents(int(steps * args.batch * args.seq * 1.1), vocab)
    rows = pack_samples([{"input_ids": d, "labels": d} for d in docs], args.seq)
    trainer = lmforge_trainer(model, rows, cfg)
    free()
    state = timed_steps(trainer, args.warmup)
    tokens_s = state["tokens"] / state["seconds"]
    return {"who": "lmforge", "method": args.method, "row": "speed", "seq": args.seq, "batch": args.batch,
            "activation_checkpointing": args.ckpt, "tokens_per_s": round(tokens_s),
            "step_s": round(state["seconds"] / args.steps, 3), **peak(), "trainable": trainable(model),
            "real_tokens_per_step": round(state["tokens"] / args.steps),
            "attention": getattr(model.config, "_attn_implementation", None),
            "first_loss": round(state["losses"][0], 4), "final_loss": round(state["losses"][-1], 4)}


def run_lmforge_longest(args) -> dict:
    from lmforge.data.packing import pack_samples
    from lmforge.stages.common import load_for_training

    cfg = lmforge_config(args, LENGTHS[0], 2, ckpt=True)
    model, _, _, _ = load_for_training(cfg)
    def one_step(length: int) -> float:
        doc = long_document(length, model.config.vocab_size)
        rows = pack_samples([{"input_ids": doc, "labels": doc}] * 2, length)
        trainer = lmforge_trainer(model, rows, lmforge_config(args, length, 2, ckpt=True))
        return timed_steps(trainer, 1)["seconds"]

    return longest_row("lmforge", args, sweep_lengths(args.lengths, one_step), model)


# ---------------------------------------------------------------- TRL


def peer_model(args):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.bfloat16 if device() == "cuda" else torch.float32, "attn_implementation": "sdpa"}
    if args.method == "qlora":
        from lmforge.config.methods import LoraConfig
        from lmforge.config.schema import ModelConfig
        from lmforge.models.adapters import quantization_config

        kwargs["quantization_config"] = quantization_config(ModelConfig(finetuning="qlora"), LoraConfig(bits=4))
    if device() == "cuda":
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(args.ckpt_dir, **kwargs)
    model.config.use_cache = False
    return model


def peer_lora():
    from peft import LoraConfig

    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def peer_config(args, seq: int, steps: int, ckpt: bool, packed: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=f"/tmp/trl_bench_{os.getpid()}", max_steps=steps, per_device_train_batch_size=args.batch if packed
        else 1, max_length=seq, packing=packed, packing_strategy="bfd", padding_free=packed, bf16=device() == "cuda",
        gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
        optim="adamw_torch_fused" if device() == "cuda" else "adamw_torch", learning_rate=1e-4, max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, use_cpu=device() == "cpu")


def peer_timer(warmup: int):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """The clock after each step, after a synchronisation (at 8B a step is far longer than the wait)."""
        times: list[float] = []
        tokens: list[int] = []
        trainer = None

        def on_step_end(self, a, state, control, **kw):
            if device() == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.tokens.append(getattr(self.trainer, "_total_train_tokens", 0))

    return Timer()


def run_trl_speed(args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    steps = args.warmup + args.steps
    model = peer_model(args)
    docs = documents(int(steps * args.batch * args.seq * 1.1), model.config.vocab_size)
    trainer = SFTTrainer(model=model, args=peer_config(args, args.seq, steps, args.ckpt, packed=True),
                         train_dataset=Dataset.from_dict({"input_ids": docs}),
                         processing_class=AutoTokenizer.from_pretrained(args.ckpt_dir), peft_config=peer_lora())
    timer = peer_timer(args.warmup)
    timer.trainer = trainer
    trainer.add_callback(timer)
    free()
    trainer.train()
    seconds = timer.times[steps - 1] - timer.times[args.warmup - 1]
    tokens = timer.tokens[steps - 1] - timer.tokens[args.warmup - 1]
    if tokens <= 0:  # no token counter in this transformers: the packed rows' mean length instead
        lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
        tokens = sum(lengths) / len(lengths) * args.batch * args.steps
    return {"who": "trl", "method": args.method, "row": "speed", "seq": args.seq, "batch": args.batch,
            "activation_checkpointing": args.ckpt, "tokens_per_s": round(tokens / seconds),
            "step_s": round(seconds / args.steps, 3), **peak(), "trainable": trainable(trainer.model),
            "real_tokens_per_step": round(tokens / args.steps), "padding_free": bool(trainer.padding_free),
            "attention": "sdpa (padding-free rows, transformers' block mask from position_ids)"}


def run_trl_longest(args) -> dict:
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    model = peer_model(args)
    if args.method == "qlora":  # what SFTTrainer does to a k-bit model before wrapping it
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, peer_lora())  # wrapped once, trained at each length
    tokenizer = AutoTokenizer.from_pretrained(args.ckpt_dir)

    def one_step(length: int) -> float:
        doc = long_document(length, model.config.vocab_size)
        trainer = SFTTrainer(model=model, args=peer_config(args, length, 2, ckpt=True, packed=False),
                             train_dataset=Dataset.from_dict({"input_ids": [doc, doc]}), processing_class=tokenizer)
        timer = peer_timer(1)
        trainer.add_callback(timer)
        trainer.train()
        return timer.times[1] - timer.times[0]

    return longest_row("trl", args, sweep_lengths(args.lengths, one_step), model)


# ---------------------------------------------------------------- driver

SINGLE = {"lmforge_speed": run_lmforge_speed, "lmforge_longest": run_lmforge_longest,
          "trl_speed": run_trl_speed, "trl_longest": run_trl_longest}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("peft", "trl", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def write(out: str | None, args, rows: list[dict]) -> None:
    if not out:
        return
    result = machine_and_versions()
    result["versions"].update(versions())
    result["workload"] = {
        "shape": {"name": args.shape, **SHAPES[args.shape]}, "adapter": f"LoRA r {R}, alpha {ALPHA}, dropout 0, "
        "all linear layers but the head", "precision": "bf16 base, fp32 adapters (peft), bf16 autocast",
        "qlora_base": "bitsandbytes NF4, double quantisation, bf16 compute (lmforge's settings, both sides)",
        "speed_rows": {"seq": args.seq, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                       "activation_checkpointing": args.ckpt, "data": "documents of 200-2000 random tokens, packed, "
                       "kept apart in attention"},
        "longest_rows": {"batch": 1, "lengths": list(args.lengths), "steps": 2, "data": "one document per row",
                         "activation_checkpointing": "transformers per-layer, non-reentrant, both sides"},
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default")}
    result["rows"] = rows
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8b", choices=list(SHAPES))
    parser.add_argument("--plan", default="lora,qlora", help="methods to run, in order (lora, qlora)")
    parser.add_argument("--parts", default="speed,longest")
    parser.add_argument("--who", default="lmforge,trl")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ckpt", action="store_true", help="activation checkpointing in the speed rows")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--ckpt-dir", default="/tmp/lmforge_bench_8b")
    parser.add_argument("--keep", help="an earlier result file whose rows come first")
    parser.add_argument("--single", choices=list(SINGLE), help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    args.lengths = [int(x) for x in str(args.lengths).split(",")]

    if args.single:  # one measurement in this (fresh) process, printed as the last line
        print(json.dumps(SINGLE[args.single](args)), flush=True)
        return
    if not (Path(args.ckpt_dir) / "config.json").is_file():
        started = time.perf_counter()
        make_checkpoint(Path(args.ckpt_dir), args.shape)
        print(f"checkpoint written in {time.perf_counter() - started:.0f} s", flush=True)
    rows = json.loads(Path(args.keep).read_text())["rows"] if args.keep else []
    for method in args.plan.split(","):
        for part in args.parts.split(","):
            for who in args.who.split(","):
                command = [sys.executable, __file__, "--single", f"{who}_{part}", "--method", method,
                           "--shape", args.shape, "--seq", str(args.seq), "--batch", str(args.batch),
                           "--warmup", str(args.warmup), "--steps", str(args.steps), "--ckpt-dir", args.ckpt_dir,
                           "--lengths", ",".join(map(str, args.lengths))] + (["--ckpt"] if args.ckpt else [])
                started = time.perf_counter()
                row = run_fresh(command, {"who": who, "method": method, "row": part})
                row["wall_s"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write(args.out, args, rows)
    write(args.out, args, rows)


if __name__ == "__main__":
    main()
