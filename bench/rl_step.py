"""Where an online-RL step's time goes: generation, scoring, inference passes, training.

Runs PPO (with a reward model and a separate critic) and GRPO (a verifiable reward) for a few
iterations on the demo world's arithmetic prompts, from a freshly built model of the chosen
scratch preset, and averages the per-iteration time shares and samples/s that the stages log
(the first iteration, which pays for warm-up, is left out). Writes one JSON file with the machine,
the versions and both rows.

    python bench/rl_step.py --preset small --out bench/results/rl_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config.load import load_config
from lmforge.demo.write import write_demo_world
from lmforge.models.load import as_reward_model, count_parameters
from lmforge.models.tokenizer import train_tokenizer
from lmforge.stages import STAGE_RUNNERS

SHARES = ("generate", "score", "inference", "train")


def build_start(work: Path, preset: str) -> tuple[Path, Path, Path]:
    """(world folder, policy folder, reward-model folder): an untrained model is enough for timing."""
    world = work / "world"
    write_demo_world(world)
    tokenizer_dir = work / "tokenizer"
    train_tokenizer([world / "pt" / "train.txt", world / "sft" / "train.jsonl"], tokenizer_dir, vocab_size=3000,
                    split_han_chars=True)
    policy = work / "policy"
    cfg = load_config(None, [f"model.scratch={preset}", f"model.tokenizer={tokenizer_dir}",
                             f"data.train={world}/pt/train.txt", "data.eval_split=0", "train.max_steps=1",
                             f"train.output_dir={policy}", "log.progress=false", "log.report_to=[]"], stage="pt")
    STAGE_RUNNERS["pt"](cfg)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    rm = as_reward_model(AutoModelForCausalLM.from_pretrained(policy), seed=0)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(work / "rm")
    tokenizer.save_pretrained(work / "rm")
    return world, policy, work / "rm"


def run_stage(stage: str, world: Path, policy: Path, out: Path, iterations: int, extra: list[str]) -> dict:
    args = [f"model.name_or_path={policy}", f"data.train={world}/rl/arith_train.jsonl", "data.eval_split=0",
            "data.max_length=128", "rl.max_new_tokens=48", "rl.prompts_per_step=16", "rl.temperature=1.0",
            f"train.max_steps={iterations}", "train.batch_size=32", "train.logging_steps=1", "train.lr=1e-5",
            f"train.output_dir={out}", "log.progress=false", "log.report_to=[]", *extra]
    STAGE_RUNNERS[stage](load_config(None, args, stage=stage))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "iteration" in r][1:]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    return {"stage": stage, "iterations_measured": len(rows),
            "samples_per_iteration": 16 * (8 if stage == "grpo" else 1),
            "samples_per_s": round(mean("samples_per_s"), 2), "mean_reply_tokens": round(mean("length"), 1),
            **{f"{k}_share": round(mean(f"time/{k}_share"), 3) for k in SHARES}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world, policy, rm = build_start(work, args.preset)
        parameters = count_parameters(AutoModelForCausalLM.from_pretrained(policy))[0]
        rows = [run_stage("ppo", world, policy, work / "ppo", args.iterations,
                          [f"rl.reward_model={rm}", "rl.ppo_epochs=2", "rl.minibatch_size=16"]),
                run_stage("grpo", world, policy, work / "grpo", args.iterations,
                          ["rl.num_generations=8", "rl.rewards=[{kind: answer_match}]", "rl.ppo_epochs=1"])]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()}-thread CPU"
    result = {"machine": {"device": device, "platform": platform.platform(), "python": platform.python_version()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "model": {"preset": args.preset, "parameters": parameters}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
