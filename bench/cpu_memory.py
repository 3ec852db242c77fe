"""Peak resident memory (RSS) of LoRA SFT, DPO and GRPO on SmolLM2-135M-Instruct on the CPU.

Each stage runs in a fresh process through the CLI (`lmforge train <stage> CONFIG overrides`), a few
steps of the example's settings: SFT as examples/sft_smollm2_identity.yaml, DPO as
examples/dpo_smollm2_lora.yaml (200 of its pairs), GRPO with the LoRA config below (the demo world's arithmetic prompts,
4 prompts x 4 replies a step). A thread samples the process's RSS every 20 ms and, at each new peak,
records where the main thread was (the innermost lmforge frames), so the row says both how much and
where. The peak is also read from the kernel (ru_maxrss), which sees what sampling misses.
Needs the demo world (`lmforge data demo DIR`) for DPO and GRPO; one stage at a time (`--stage`) or all.

    python bench/cpu_memory.py --demo /tmp/demo --out bench/results/cpu_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import run_fresh, write_result  # noqa: E402

STEPS = 4
PAGE = os.sysconf("SC_PAGE_SIZE")


def grpo_config(demo: Path, out: Path) -> Path:
    """GRPO with LoRA on SmolLM2 (no example ships one): the demo's arithmetic prompts, exact-match reward."""
    text = f"""stage: grpo
model: {{name_or_path: smollm2-135m-instruct, finetuning: lora}}
lora: {{r: 16, alpha: 32}}
data:
  train: [{demo}/rl/arith_train.jsonl]
  eval: [{demo}/rl/arith_eval.jsonl]
  max_length: 128
rl:
  rewards: [{{kind: exact_match, weight: 1.0}}]
  prompts_per_step: 4
  num_generations: 4
  max_new_tokens: 48
  temperature: 0.7
  kl_coef: 0.02
  eval_prompts: 8
train: {{output_dir: {out}/grpo, max_steps: {STEPS}, batch_size: 16, lr: 1.0e-4, eval_steps: 0, logging_steps: 1}}
"""
    path = out / "grpo_smollm2_lora.yaml"
    path.write_text(text)
    return path


def stage_command(stage: str, demo: Path, out: Path, extra: list[str]) -> list[str]:
    # one thread: memory does not depend on it, and 2 threads on a shared 2-core machine spin in barriers
    common = ["--threads", "1", f"train.max_steps={STEPS}", "log.report_to=[]", "log.progress=false", *extra]
    if stage == "sft":
        return ["train", "sft", str(ROOT / "examples/sft_smollm2_identity.yaml"), f"data.dataset_dir={ROOT}/examples/data",
                f"train.output_dir={out}/sft", *common]
    if stage == "dpo":
        # 200 of the demo's pairs (the held-out 10% is evaluated in full, which on 2 busy cores took longer
        # than the steps themselves); a step's batch, lengths and so its memory are the example's
        return ["train", "dpo", str(ROOT / "examples/dpo_smollm2_lora.yaml"), f"data.dataset_dir={demo}",
                "data.train=[{name: demo_pref, max_samples: 200}]", f"train.output_dir={out}/dpo", *common]
    return ["train", "grpo", str(grpo_config(demo, out)), *common]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """The highest RSS seen and the main thread's lmforge frames at that moment."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.peak, self.where, self.stop = interval, 0, [], threading.Event()
        self.main = threading.main_thread().ident

    def run(self) -> None:
        while not self.stop.is_set():
            rss = rss_bytes()
            if rss > self.peak:
                self.peak = rss
                frame = sys._current_frames().get(self.main)
                stack = traceback.extract_stack(frame) if frame is not None else []
                self.where = [f"{Path(s.filename).name}:{s.lineno} {s.name}" for s in stack
                              if "/lmforge/" in s.filename][-4:]
            time.sleep(self.interval)


def measure_one(stage: str, demo: Path, extra: list[str]) -> dict:
    from lmforge.cli import main

    sampler = PeakSampler()
    sampler.start()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        code = main(stage_command(stage, demo, Path(out), extra))
    sampler.stop.set()
    sampler.join()
    kernel_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"stage": stage, "exit_code": code, "steps": STEPS, "peak_rss_gib": round(kernel_peak / 2**30, 2),
            "sampled_peak_gib": round(sampler.peak / 2**30, 2), "peak_at": sampler.where,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="the demo world's folder (lmforge data demo DIR)")
    parser.add_argument("--stage", choices=("sft", "dpo", "grpo"), action="append")
    parser.add_argument("--one", choices=("sft", "dpo", "grpo"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--label", default="", help="a note stored on every row (before/after a change)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every stage (train.fused_loss=false: the full logits)")
    parser.add_argument("--out")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out (before, then after)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, Path(args.demo), args.set)))
        return
    rows = json.loads(Path(args.out).read_text())["rows"] if args.append and args.out and Path(args.out).is_file() else []
    for stage in args.stage or ("sft", "dpo", "grpo"):  # one at a time: each figure is its process alone
        command = [sys.executable, __file__, "--demo", args.demo, "--one", stage, *(f"--set={s}" for s in args.set)]
        row = run_fresh(command, {"stage": stage})
        rows.append({**row, "label": args.label, "overrides": args.set})
        print(json.dumps(rows[-1]), flush=True)
    write_result(args.out, {"model": "SmolLM2-135M-Instruct (fp32, LoRA r16 all linear)", "steps": STEPS,
                            "threads": os.environ.get("OMP_NUM_THREADS", "default")}, rows)


if __name__ == "__main__":
    main()
