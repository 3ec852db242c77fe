"""The GRPO loss family on the demo world's held-out sums: `grpo`, `dr_grpo`, `dapo`, DAPO with clip-higher and
dynamic sampling, and GSPO, each from the same SFT checkpoint with the same seed and budget.

Each run is `lmforge train grpo examples/grpo_demo.yaml` in its own process (one CPU thread), with only the
variant's `rl.*` keys changed, plus `rl.minibatch_size=128`: two optimizer steps per rollout, so the second
step is off-policy and the clip ranges and the sequence-level ratio have something to act on (with one
on-policy step per rollout every ratio is 1, and GSPO's gradient equals `grpo`'s). The held-out exact match
and KL to the SFT model come from the stage's own evaluations (`eval_*` rows of metrics.jsonl, every
`--eval-every` rollouts); the script collects them, writes one JSON file and draws the curves.

    lmforge data demo demo --sft-noise 0.25 --arith-reps 4    # then PT and SFT as in docs/rl.md
    python bench/grpo_variants.py --model runs/sft_demo --world demo --work /tmp/grpo_variants \\
        --out bench/results/grpo_variants_cpu.json --png docs/images/grpo_variants.png

`--replot` redraws the PNG and reprints the table from an existing `--out` file without training. Besides the
five loss variants (and GSPO at the default clip) there are two controls for the DAPO row, named in --variants:
`dapo_dynamic` (no clip-higher) and `dapo_32_prompts` (as many groups as dynamic sampling draws, unfiltered).
docs/grpo.md ("The loss variants on the demo sums") has the table and the commands that made it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "examples" / "grpo_demo.yaml"
SHARED = ["rl.minibatch_size=128"]
PROMPTS_PER_STEP = 16  # examples/grpo_demo.yaml's rl.prompts_per_step
VARIANTS = {
    "grpo": ["rl.loss_type=grpo"],
    "dr_grpo": ["rl.loss_type=dr_grpo"],
    "dapo": ["rl.loss_type=dapo"],
    "dapo_clip_higher_dynamic": ["rl.loss_type=dapo", "rl.clip_range_high=0.28", "rl.dynamic_sampling=true"],
    # GSPO's paper setup: per-sequence mean aggregation and its own (much narrower) clip range, since a
    # length-normalised sequence ratio stays far closer to 1 than a token's ratio (Zheng et al. 2025).
    "gspo": ["rl.loss_type=grpo", "rl.importance_sampling=sequence", "rl.clip_range_low=3e-4",
             "rl.clip_range_high=4e-4"],
    # GSPO's sequence ratio with the token-level default clip (0.2): what the narrow range itself does.
    "gspo_clip_0.2": ["rl.loss_type=grpo", "rl.importance_sampling=sequence"],
    # Controls for the DAPO row: dynamic sampling alone (clip_range_high left at 0.2), and plain dapo sampling as
    # many groups as dynamic sampling does (32 prompts a rollout, still two optimizer steps), without the filter.
    "dapo_dynamic": ["rl.loss_type=dapo", "rl.dynamic_sampling=true"],
    "dapo_32_prompts": ["rl.loss_type=dapo", "rl.prompts_per_step=32", "rl.minibatch_size=256"],
}
CORE = ("grpo", "dr_grpo", "dapo", "dapo_clip_higher_dynamic", "gspo", "gspo_clip_0.2")


def scheduled_groups(n_prompts: int, prompts_per_step: int, rollouts: int) -> int:
    """Prompts drawn by `rollouts` plain rollouts: an epoch's last rollout takes only the prompts left
    (n_prompts mod prompts_per_step), as the stage's epoch order cuts it."""
    sizes = [prompts_per_step] * (n_prompts // prompts_per_step) + ([n_prompts % prompts_per_step] if
                                                                     n_prompts % prompts_per_step else [])
    return sum(sizes[i % len(sizes)] for i in range(rollouts))


def read_curves(metrics: Path, plain_groups: int) -> dict:
    """The run's evaluations (rollout -> held-out exact match, KL to the SFT model, reward, reply length) and
    per-rollout training figures (sampled reward, KL, entropy, clipped shares, groups with signal). Groups
    sampled: the dynamic-sampling count where the run logged one, else `plain_groups`."""
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    evals, train, done = [], [], 0
    for row in rows:
        if "iteration" in row:
            done = row["iteration"]
            train.append(row)
        if "eval_exact_match" in row:
            evals.append({"rollout": done, "exact_match": row["eval_exact_match"], "kl": row.get("eval_kl"),
                          "reward": row.get("eval_reward"), "length": row.get("eval_length")})
    keys = ("reward", "kl", "entropy", "clipfrac", "clip_high_frac", "groups_with_signal", "groups_sampled")
    per_rollout = {key: [r.get(key) for r in train] for key in keys}
    logged = [r["groups_sampled"] for r in train if "groups_sampled" in r]
    return {"evals": evals, "train": per_rollout, "groups_sampled": sum(logged) if logged else plain_groups}


def run_variant(name: str, seed: int, args: argparse.Namespace) -> dict:
    out_dir = Path(args.work) / f"{name}-seed{seed}"
    command = [sys.executable, "-m", "lmforge.cli", "train", "grpo", str(RECIPE), "--threads", "1",
               f"model.name_or_path={args.model}", f"data.train=[{args.world}/rl/arith_train.jsonl]",
               f"data.eval=[{args.world}/rl/arith_eval.jsonl]", f"train.output_dir={out_dir}",
               f"train.seed={seed}", f"train.max_steps={args.rollouts}", f"train.eval_steps={args.eval_every}",
               "log.progress=false", "log.report_to=[]", *SHARED, *VARIANTS[name]]
    log = out_dir.parent / f"{out_dir.name}.log"  # not with_suffix: "gspo_clip_0.2" has a dot
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with log.open("w", encoding="utf-8") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    row = {"variant": name, "seed": seed, "overrides": [*SHARED, *VARIANTS[name]],
           "seconds": round(time.time() - start, 1)}
    if done.returncode != 0:
        return {**row, "error": log.read_text(encoding="utf-8")[-2000:]}
    prompts = [int(o.split("=")[1]) for o in VARIANTS[name] if o.startswith("rl.prompts_per_step=")]
    n_prompts = sum(1 for line in open(f"{args.world}/rl/arith_train.jsonl", encoding="utf-8") if line.strip())
    plain = scheduled_groups(n_prompts, prompts[-1] if prompts else PROMPTS_PER_STEP, args.rollouts)
    return {**row, **read_curves(out_dir / "metrics.jsonl", plain)}


def last_mean(values: list, n: int = 10) -> float:
    tail = [v for v in values[-n:] if v is not None]
    return sum(tail) / len(tail) if tail else float("nan")


def markdown_table(rows: list[dict]) -> str:
    """Held-out exact match at each evaluation, one line per run, then the end KL, the training reward over
    the last 10 rollouts (thousands of sampled replies, so less noisy than 32 held-out sums) and the cost."""
    ok = [r for r in rows if "evals" in r]
    points = [e["rollout"] for e in ok[0]["evals"]] if ok else []
    head = ["variant", "seed", *[f"rollout {p}" for p in points], "held-out KL at end", "train reward, last 10",
            "groups sampled", "seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "evals" not in r:
            lines.append(f"| {r['variant']} | {r['seed']} | failed: {(r['error'].strip().splitlines() or ['no output'])[-1]} |")
            continue
        cells = [f"{100 * e['exact_match']:.1f}%" for e in r["evals"]]
        lines.append("| " + " | ".join([r["variant"], str(r["seed"]), *cells, f"{r['evals'][-1]['kl']:.2f}",
                                        f"{last_mean(r['train']['reward']):.3f}", str(r["groups_sampled"]),
                                        f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> None:
    """Held-out exact match and KL to the SFT model per evaluation, and the sampled training reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for r in (r for r in rows if "evals" in r):
        style = {"color": colours.get(r["variant"]), "linestyle": "-" if r["seed"] == 0 else "--",
                 "label": f"{r['variant']} (seed {r['seed']})"}
        x = [e["rollout"] for e in r["evals"]]
        axes[0].plot(x, [100 * e["exact_match"] for e in r["evals"]], marker="o", **style)
        axes[1].plot(x, [e["kl"] for e in r["evals"]], marker="o", **style)
        # A rollout's reward swings with which 16 prompts it drew: a running mean over 5 shows the trend.
        reward = [v for v in r["train"]["reward"] if v is not None]
        smooth = [sum(reward[max(0, i - 4):i + 1]) / len(reward[max(0, i - 4):i + 1]) for i in range(len(reward))]
        axes[2].plot(range(1, len(smooth) + 1), smooth, **style)
    titles = ("held-out exact match (32 sums, greedy), %", "KL to the SFT model on held-out replies (nats)",
              "training reward (sampled replies, mean of the last 5 rollouts)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="the SFT checkpoint every run starts from")
    parser.add_argument("--world", help="the demo world folder (lmforge data demo ... --arith-reps 4)")
    parser.add_argument("--work", default="/tmp/grpo_variants", help="a folder for the runs")
    parser.add_argument("--variants", default=",".join(CORE), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated train.seed values")
    parser.add_argument("--rollouts", type=int, default=40, help="train.max_steps of every run")
    parser.add_argument("--eval-every", type=int, default=10, help="train.eval_steps of every run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--keep", help="a result file whose rows are kept (runs of the same variant and seed redone)")
    parser.add_argument("--out", help="the result JSON")
    parser.add_argument("--png", help="the curves")
    parser.add_argument("--replot", action="store_true", help="only redraw --png and reprint the table from --out")
    args = parser.parse_args()
    if args.replot:
        rows = json.loads(Path(args.out).read_text(encoding="utf-8"))["rows"]
    else:
        if not (args.model and args.world):
            parser.error("--model and --world are needed to train (or --replot with --out)")
        unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
        if unknown:
            parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
        plan = [(v, int(s)) for s in args.seeds.split(",") for v in args.variants.split(",")]
        kept = json.loads(Path(args.keep).read_text(encoding="utf-8"))["rows"] if args.keep else []
        kept = [r for r in kept if (r["variant"], r["seed"]) not in plan]
        workload = {"recipe": str(RECIPE.relative_to(ROOT)), "shared_overrides": SHARED, "rollouts": args.rollouts,
                    "eval_every": args.eval_every, "model": args.model, "world": args.world,
                    "threads_per_run": 1, "runs_at_a_time": args.parallel}
        rows = list(kept)
        with ThreadPoolExecutor(args.parallel) as pool:
            # Written as each run ends, so a stopped sweep keeps what it measured.
            for future in as_completed([pool.submit(run_variant, v, s, args) for v, s in plan]):
                rows.append(future.result())
                rows.sort(key=lambda r: (r["seed"], list(VARIANTS).index(r["variant"])))
                write_result(args.out, workload, rows)
    print(markdown_table(rows))
    if args.png:
        plot(rows, Path(args.png))


if __name__ == "__main__":
    main()
