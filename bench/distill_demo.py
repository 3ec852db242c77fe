"""Issue 22 point 5: does on-policy distillation close half the held-out exact-match gap between a small
student's own SFT and its teacher, on the demo world?

Takes the models that examples/distill_demo.yaml trains (the teacher: `tiny` PT + SFT; the student: `mini`
PT + SFT on the same world, tokenizer and data) and runs the distill stage from the student's SFT once per
mode, each from the same start and seed. Every row reports the three held-out exact-match figures the stage
measures itself (student before, teacher, student after, on the same greedy replies to `rl/eval.jsonl`), the
share of the gap closed, the reverse KL to the teacher before and after, and the wall time.

    lmforge run examples/distill_demo.yaml --only pt,sft,student_pt,student_sft
    python bench/distill_demo.py --run runs/distill_demo --out bench/results/distill_demo_cpu.json

(`--teacher` / `--student` name other model folders; `--modes on_policy,mix,forward` picks rows.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import write_result  # noqa: E402

from lmforge.config.load import load_config  # noqa: E402
from lmforge.models.load import count_parameters  # noqa: E402
from lmforge.stages import STAGE_RUNNERS  # noqa: E402

# mode -> distill.* overrides: GKD's on-policy reverse KL, its 50/50 mix with the data's replies, and
# supervised KD (forward KL on the data's replies only: the off-policy baseline).
MODES = {"on_policy": ["distill.lambda_on_policy=1.0", "distill.beta=1.0"],
         "mix": ["distill.lambda_on_policy=0.5", "distill.beta=1.0"],
         "forward": ["distill.lambda_on_policy=0.0", "distill.beta=0.0"]}
FIGURES = ("initial_eval_exact_match", "initial_eval_teacher_exact_match", "eval_exact_match", "eval_gap_closed",
           "initial_eval_reverse_kl", "eval_reverse_kl", "initial_eval_length", "eval_length")


def distill(mode: str, args, out: Path) -> dict:
    """One distill stage run from the student's SFT; its figures as the stage's artifact records them."""
    world = Path(args.world or Path(args.run) / "world")
    overrides = [f"model.name_or_path={args.student}", f"distill.teacher={args.teacher}", *MODES[mode],
                 f"data.train=[{','.join(f'{world}/{name}/train.jsonl' for name in args.prompts.split(','))}]",
                 f"data.eval={world}/rl/eval.jsonl", "data.max_length=160",
                 "distill.prompts_per_step=16", "distill.max_new_tokens=48", "distill.eval_prompts=88",
                 f"train.max_steps={args.steps}", "train.batch_size=16", f"train.lr={args.lr}",
                 f"train.seed={args.seed}", "train.logging_steps=5", f"train.output_dir={out}",
                 "log.progress=false", "log.report_to=[]"]
    started = time.perf_counter()
    STAGE_RUNNERS["distill"](load_config(None, overrides, stage="distill"))
    seconds = time.perf_counter() - started
    metrics = json.loads((out / "lmforge.json").read_text(encoding="utf-8"))["metrics"]
    curve = [{k: r[k] for k in ("iteration", "divergence", "length")}
             for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "iteration" in r]
    return {"mode": mode, "settings": MODES[mode], "prompts": args.prompts, "iterations": args.steps, "lr": args.lr, "seed": args.seed,
            **{k: metrics.get(k) for k in FIGURES}, "seconds": round(seconds, 1),
            "sample": metrics.get("eval_sample"), "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/distill_demo", help="examples/distill_demo.yaml's run_dir")
    parser.add_argument("--world", help="the demo world (default: RUN/world)")
    parser.add_argument("--teacher", help="default: RUN/sft")
    parser.add_argument("--student", help="the student's own SFT (default: RUN/student_sft)")
    parser.add_argument("--work", default="/tmp/distill_demo", help="where the distilled students are written")
    parser.add_argument("--modes", default="on_policy,mix")
    parser.add_argument("--prompts", default="rl", help="the world's train sets whose prompts are distilled on: "
                        "rl (rl/train.jsonl), or rl,sft (also the SFT data's 1048 prompts)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out")
    args = parser.parse_args()
    args.teacher = args.teacher or str(Path(args.run) / "sft")
    args.student = args.student or str(Path(args.run) / "student_sft")
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {', '.join(MODES)}")
    from transformers import AutoModelForCausalLM

    sizes = {who: count_parameters(AutoModelForCausalLM.from_pretrained(path))[0]
             for who, path in (("teacher", args.teacher), ("student", args.student))}
    rows = []
    for mode in args.modes.split(","):
        rows.append(distill(mode, args, Path(args.work) / mode))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
        # Written after every row, so a run stopped part way keeps what it measured.
        write_result(args.out, {"teacher": args.teacher, "student": args.student, "parameters": sizes,
                                "eval": "rl/eval.jsonl, 88 held-out questions, greedy, exact match"}, rows)


if __name__ == "__main__":
    main()
