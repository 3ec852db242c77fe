"""Every fine-tuning method on the demo world's SFT, one at a time, same data, steps and seed.

The SFT stage of examples/demo.yaml (packed rows of up to 256 tokens, 4 a step, lr 1e-3 with 5% warmup and
cosine decay, seed 42), cut from the demo's 8 epochs (352 steps) to 100 steps so that the sweep fits in
about 15 minutes of the shared 2-core CPU, starts from the demo's PT model for each of: full, freeze, LoRA, DoRA, LoRA+,
rsLoRA, PiSSA, GaLore, Mixture-of-Depths, NEFTune and LLaMA-Pro. Each runs in a fresh process, so its
peak RSS is its own. Per method: final held-out loss (sft/eval.jsonl), exact match of greedy answers to
the 88 held-out questions (answered by the saved artifact loaded back through lmforge), trainable
parameters, optimizer state, peak RSS, training tokens/s (steps 6 onwards), and the loss curves.

    python bench/finetuning_methods.py --out bench/results/finetuning_methods_cpu.json \\
        --plot docs/images/finetuning-curves.png

The PT model comes from `--demo-dir` (default runs/bench-finetuning, built with
`lmforge run examples/demo.yaml --only pt` there when missing, about 2 minutes on the 2-core CPU).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_and_versions, run_fresh  # noqa: E402

LORA = ["lora.r=16", "lora.alpha=32"]
# method -> overrides of the demo's SFT stage (the settings the docs page explains)
METHODS: dict[str, list[str]] = {
    "full": ["model.finetuning=full"],
    "freeze": ["model.finetuning=freeze", "model.freeze_trainable_layers=2"],
    "lora": ["model.finetuning=lora", *LORA],
    "dora": ["model.finetuning=dora", *LORA],
    "lora+": ["model.finetuning=lora", *LORA, "lora.plus_ratio=16"],
    "rslora": ["model.finetuning=lora", *LORA, "lora.use_rslora=true"],
    "pissa": ["model.finetuning=lora", *LORA, "lora.init=pissa"],
    "galore": ["model.finetuning=galore", "galore.rank=32", "galore.update_interval=50", "galore.scale=1.0"],
    "mod": ["model.finetuning=mod", "mod.capacity=0.5", "mod.layers=alternate"],
    "neftune": ["model.finetuning=full", "sft.neftune_alpha=5"],
    "llama_pro": ["model.finetuning=llama_pro", "expand.num_new_blocks=2"],
}
STEPS = 100  # the demo's SFT runs 8 epochs (352 steps); a third of that keeps 11 runs within ~15 minutes
DEMO_SFT = ["data.max_length=256", "data.packing=true", f"train.max_steps={STEPS}", "train.batch_size=4",
            "train.lr=1e-3", "train.warmup_ratio=0.05", "train.eval_steps=25", "train.logging_steps=10", "train.save_steps=0",
            "train.seed=42", "sft.eval_generate=0", "log.report_to=[]", "log.progress=false"]
TIMED_FROM = 5  # steps before this one warm up and are not timed


def wire_optimizer() -> dict:
    """Until lmforge/loop/trainer.py builds its optimizer with build_optimizer, build it here the same
    way; also records the trainable parameters and the optimizer's state size."""
    import torch

    from lmforge.loop import trainer as loop
    from lmforge.models.optimizers import build_optimizer, optimizer_state_numel

    seen: dict = {"step_marks": []}
    original_init, original_step = loop.Trainer.__init__, loop.Trainer.step
    wired = "build_optimizer" in inspect.getsource(original_init)

    def init(self, model, *args, **kwargs):
        original_init(self, model, *args, **kwargs)
        if not wired:
            optimizer = build_optimizer(model, self.cfg)
            warmup = int(self.cfg.warmup_ratio * self.total_steps)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: loop.lr_factor(
                s, self.total_steps, warmup, self.cfg.scheduler, self.cfg.min_lr_ratio))
            self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        seen["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seen["total"] = sum(p.numel() for p in model.parameters())
        seen["optimizer"] = self.optimizer

    def step(self, group):
        out = original_step(self, group)
        tokens = sum(int(b["input_ids"].numel()) for b in group)  # positions computed, padding included
        seen["step_marks"].append((time.perf_counter(), tokens))
        return out

    loop.Trainer.__init__, loop.Trainer.step = init, step
    seen["state_numel"] = lambda: optimizer_state_numel(seen["optimizer"])
    return seen


def run_method(name: str, demo_dir: Path, out: Path) -> dict:
    """One method in this process: train, then answer the held-out questions with the saved artifact."""
    from lmforge.config.load import load_config
    from lmforge.models.load import load_for_inference
    from lmforge.rollout.evaluate import answer_eval
    from lmforge.stages import STAGE_RUNNERS

    seen = wire_optimizer()
    world = demo_dir / "world" / "sft"
    cfg = load_config(None, [f"model.name_or_path={demo_dir / 'pt'}", f"data.train={world / 'train.jsonl'}",
                             f"data.eval={world / 'eval.jsonl'}", f"train.output_dir={out}", *DEMO_SFT,
                             *METHODS[name]], stage="sft")
    started = time.perf_counter()
    metrics = STAGE_RUNNERS["sft"](cfg)
    seconds = time.perf_counter() - started
    marks = seen["step_marks"]
    timed = marks[TIMED_FROM:]
    tokens_per_s = sum(t for _, t in timed[1:]) / (timed[-1][0] - timed[0][0])
    state_numel = seen["state_numel"]()

    model, tokenizer = load_for_inference(str(out))
    rows = [json.loads(line) for line in (world / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    answers = answer_eval(model, tokenizer, [r["messages"][:-1] for r in rows],
                          [r["messages"][-1]["content"] for r in rows], max_new_tokens=48)
    curves = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return {
        "method": name, "overrides": METHODS[name], "steps": len(marks),
        "eval_loss": round(metrics["eval_loss"], 4), "exact_match": round(answers["exact_match"], 4),
        "answered": answers["answered"], "trainable_params": seen["trainable"], "total_params": seen["total"],
        "optimizer_state_floats": state_numel, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "tokens_per_s": round(tokens_per_s), "seconds": round(seconds, 1),
        "train_curve": [[r["step"], round(r["loss"], 4)] for r in curves if "loss" in r],
        "eval_curve": [[r["step"], round(r["eval_loss"], 4)] for r in curves if "eval_loss" in r],
    }


def ensure_base(demo_dir: Path) -> None:
    if (demo_dir / "pt" / "model.safetensors").is_file() and (demo_dir / "world" / "sft" / "eval.jsonl").is_file():
        return
    subprocess.run([sys.executable, "-m", "lmforge.cli", "run", str(ROOT / "examples" / "demo.yaml"), "--only", "pt",
                    "--no-report", f"run_dir={demo_dir}"], check=True, cwd=ROOT)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = [*plt.get_cmap("tab10").colors, (0.0, 0.0, 0.0)]  # eleven methods, eleven colours
    for i, row in enumerate(r for r in rows if "error" not in r):
        style = {"color": colours[i % len(colours)], "linestyle": "-" if i < 6 else "--", "label": row["method"]}
        train_ax.plot(*zip(*row["train_curve"], strict=True), linewidth=1, **style)
        eval_ax.plot(*zip(*row["eval_curve"], strict=True), marker="o", markersize=3, **style)
    for ax, title in ((train_ax, "training loss"), (eval_ax, "held-out loss")):
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    eval_ax.legend(ncol=2, fontsize=8)
    fig.suptitle(f"Demo world SFT, {STEPS} steps, one method at a time (2-core CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo-dir", default=str(ROOT / "runs" / "bench-finetuning"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    parser.add_argument("--plot")
    parser.add_argument("--replot", help="draw --plot from this result file instead of running")
    args = parser.parse_args()
    demo_dir = Path(args.demo_dir).resolve()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text(encoding="utf-8"))["rows"], Path(args.plot))
        return
    if args.child:
        print(json.dumps(run_method(args.child, demo_dir, Path(args.run_dir))))
        return
    ensure_base(demo_dir)
    rows = []
    for name in args.methods:
        command = [sys.executable, __file__, "--child", name, "--demo-dir", str(demo_dir),
                   "--run-dir", str(demo_dir / "sft-methods" / name)]
        rows.append(run_fresh(command, {"method": name}))
        brief = {k: v for k, v in rows[-1].items() if not k.endswith("_curve")}
        print(json.dumps(brief), flush=True)
    result = {**machine_and_versions(), "workload": f"demo world SFT (examples/demo.yaml's sft stage cut to {STEPS} steps "
              "of 4 packed rows <= 256 tokens, lr 1e-3, seed 42) from the demo PT model (tiny preset, 0.99M parameters)",
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
