"""GRPO step speed on one GPU: lmforge's GRPO stage beside TRL's GRPOTrainer (no vLLM on either side).

The peer harness's workload (../shared/peer-bench/grpo.py): random-init model A (349M), per optimizer
step 16 prompts of 128 tokens x 8 completions of up to 256 tokens, temperature 1, bf16, lr 1e-6, one
optimizer step per rollout, no reference model (beta 0). The reward counts reply tokens with an id
below 16000. Tokens are words "t<id>" of a word-level tokenizer, so prompt lengths are exact, and the
chat template prints the prompt as it is. lmforge runs its real `grpo` stage (the same code users
run) with each generation-engine backend (`rl.backend`: own, the engine's own decoder; hf, its transformers
fallback); the figures are the stage's own per-iteration timings after warm-up.

    python bench/grpo_speed.py --peer .peer --out bench/results/grpo_speed_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))
from common import run_fresh, run_peer_script, write_result  # noqa: E402
from sft_speed import MODELS, build_model  # noqa: E402

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def low_ids(prompts, responses, **columns) -> list[float]:
    """The peer's reward: how many reply tokens have an id below 16000."""
    return [float(sum(1 for word in text.split() if word.startswith("t") and int(word[1:]) < 16000))
            for text in responses]


def word_tokenizer():
    """Token "t<K>" <-> id K; 0-3 are the specials (the peer's tokenizer, built here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)} | {f"t{i}": i for i in range(len(SPECIALS), 32000)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tokenizer


def prepare(work: Path, model_name: str, prompts: int, prompt_len: int) -> tuple[Path, Path]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(model_name, torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.save_pretrained(work / "model")
    word_tokenizer().save_pretrained(work / "model")
    g = torch.Generator().manual_seed(0)
    with open(work / "prompts.jsonl", "w") as f:
        for _ in range(prompts):
            words = " ".join(f"t{i}" for i in torch.randint(4, 32000, (prompt_len,), generator=g).tolist())
            f.write(json.dumps({"prompt": [{"role": "user", "content": words}]}) + "\n")
    return work / "model", work / "prompts.jsonl"


def run_lmforge(args, backend: str) -> dict:
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, prompts = prepare(work, args.model, args.prompts * (steps + 2), args.prompt_len)
        overrides = [
            f"model.name_or_path={model}", "model.dtype=bf16" if torch.cuda.is_available() else "model.dtype=fp32",
            f"data.train={prompts}", "data.eval_split=0", f"data.max_length={args.prompt_len + args.new + 8}",
            f"rl.backend={backend}",
            f"rl.prompts_per_step={args.prompts}", f"rl.num_generations={args.ngen}", f"rl.max_new_tokens={args.new}",
            "rl.temperature=1.0", "rl.ppo_epochs=1", "rl.minibatch_size=0", "rl.kl_coef=0", "rl.reference=none",
            "rl.eval_prompts=0", f"rl.rewards=[{{kind: function, function: '{Path(__file__).resolve()}:low_ids'}}]",
            f"train.batch_size={args.micro}", f"train.max_steps={steps}", "train.lr=1e-6", "train.warmup_ratio=0",
            "train.logging_steps=1", f"train.compile={args.compile}", f"train.output_dir={work / 'out'}",
            "log.progress=false", "log.report_to=[]",
        ]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        STAGE_RUNNERS["grpo"](load_config(None, overrides, stage="grpo"))
        rows = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "iteration" in r][args.warmup:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    completions = args.prompts * args.ngen
    step_s = completions / mean("samples_per_s")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"who": "lmforge", "backend": backend, "compile": args.compile, "micro_batch": args.micro,
            "steps_timed": len(rows), "completions_s": round(mean("samples_per_s"), 2),
            "step_s": round(step_s, 3), "mean_completion_len": round(mean("length"), 1),
            "gen_tok_s": round(mean("length") * completions / step_s, 1),
            "gen_only_tok_s": round(mean("length") * completions / (step_s * mean("time/generate_share")), 1),
            **{f"{k}_share": round(mean(f"time/{k}_share"), 4) for k in ("generate", "score", "inference", "train")},
            "reward_mean": round(mean("reward"), 2), "peak_alloc_gib": round(peak, 2) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="A", choices=sorted(MODELS))
    parser.add_argument("--backends", default="own:compile,own,hf",
                        help="rl.backend values (own, hf); BACKEND:compile adds train.compile (the training step)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--ngen", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--micro", type=int, default=64)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--single", help="run one backend in this process and print its row")
    parser.add_argument("--peer", help="a copy of ../shared/peer-bench: also run TRL's GRPOTrainer")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.single:
        print(json.dumps(run_lmforge(args, args.single)), flush=True)
        return
    passthrough = [f"--model={args.model}", f"--prompts={args.prompts}", f"--ngen={args.ngen}",
                   f"--prompt-len={args.prompt_len}", f"--new={args.new}", f"--micro={args.micro}",
                   f"--warmup={args.warmup}", f"--steps={args.steps}", *(["--compile"] if args.compile else [])]
    rows = []
    for entry in args.backends.split(","):  # BACKEND or BACKEND:compile
        backend, _, compiled = entry.partition(":")
        rows.append(run_fresh([sys.executable, __file__, "--single", backend, *passthrough,
                               *(["--compile"] if compiled else [])], {"who": "lmforge", "backend": entry}))
        print(json.dumps(rows[-1]), flush=True)
    if args.peer:
        rows.append(run_peer_script(Path(args.peer) / "grpo.py",
                                    ["job", "--model", args.model, "--beta", "0.0", "--bs", str(args.prompts * args.ngen),
                                     "--ga", "1", "--prompts", str(args.prompts), "--ngen", str(args.ngen),
                                     "--plen", str(args.prompt_len), "--clen", str(args.new),
                                     "--warmup", str(args.warmup), "--steps", str(args.steps)],
                                    {"backend": "GRPOTrainer"}))
        print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, vars(args), rows)


if __name__ == "__main__":
    main()
