"""LoRA SFT of SmolLM2-135M-Instruct on the 2-core CPU, lmforge beside TRL's SFTTrainer in one run.

Same data and settings as the peer's CPU harness (../shared/peer-bench/trl_sft_cpu.py): the first 96
alpaca_en_demo records as user/assistant dialogues, max_length 256, 8 rows a step, fp32, LoRA r=8 on
every linear layer, lr 1e-4, 5 steps of which the last 3 are timed. Tokens/s counts real (non-pad)
tokens. lmforge runs twice: with the peer's batching (padded rows), and packed (documents kept apart).

    python bench/cpu_lora_sft.py --peer PEER_DIR --out bench/results/cpu_lora_sft.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import machine_and_versions  # noqa: E402


def run_lmforge(packing: bool) -> dict:
    from lmforge.config.load import load_config
    from lmforge.data.build import load_splits, tokenize_sft
    from lmforge.data.errors import ErrorLog
    from lmforge.data.packing import collate
    from lmforge.loop.trainer import Trainer
    from lmforge.models.heads import lm_loss
    from lmforge.stages.common import load_for_training

    with tempfile.TemporaryDirectory() as out:
        alpaca = json.loads((SHARED / "data" / "llamafactory" / "alpaca_en_demo.json").read_text())[:96]
        data = Path(out) / "alpaca96.json"
        data.write_text(json.dumps(alpaca))
        cfg = load_config(None, ["model.name_or_path=smollm2-135m-instruct", "model.finetuning=lora", "lora.r=8",
                                 f"data.train={data}", "data.eval_split=0", "data.max_length=256",
                                 f"data.packing={str(packing).lower()}", "train.batch_size=8", "train.max_steps=5",
                                 "train.lr=1e-4", "train.warmup_ratio=0", f"train.output_dir={out}/run",
                                 "train.fused_loss=true", "log.report_to=[]", "log.progress=false"], stage="sft")
        model, tokenizer, _, _ = load_for_training(cfg)
        examples, _, _ = load_splits(cfg.data, ErrorLog("raise"), f"{out}/cache")
        rows = tokenize_sft(examples, tokenizer, cfg.data, ErrorLog("raise"), pack=packing)
        trainer = Trainer(model, rows, lambda b: collate(b, pad_id=tokenizer.pad_token_id),
                          lambda m, b: lm_loss(m, b, fused=True), cfg.train, cfg.log)
        marks, plain_step = [], trainer.step

        def timed_step(group):
            out_ = plain_step(group)
            # padded rows: the attention mask; packed rows: every token but the batch's end padding
            real = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else
                       int((b["input_ids"] != tokenizer.pad_token_id).sum()) for b in group)
            marks.append((time.perf_counter(), real))
            return out_

        trainer.step = timed_step
        trainer.train()
    seconds = marks[-1][0] - marks[1][0]
    tokens = sum(t for _, t in marks[2:])
    return {"who": "lmforge", "packing": packing, "s_per_step": round(seconds / 3, 2),
            "real_tokens_per_step": round(tokens / 3), "tokens_per_s": round(tokens / seconds, 1)}


def run_peer(peer: str, mode: str) -> dict:
    from lmforge.config.schema import ModelConfig
    from lmforge.models.load import resolve_model_path

    smol = resolve_model_path(ModelConfig(name_or_path="smollm2-135m-instruct"))
    done = subprocess.run([sys.executable, str(Path(peer).resolve() / "trl_sft_cpu.py"), mode], cwd=SHARED.parent,
                          env={**os.environ, "SMOL_DIR": smol}, capture_output=True, text=True)
    try:
        row = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"who": "trl", "mode": mode, "error": done.stderr[-1500:]}
    return {"who": "trl", **row, "tokens_per_s": round(row["approx_tok_per_s"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer", help="a folder holding trl_sft_cpu.py")
    parser.add_argument("--out")
    args = parser.parse_args()

    rows = [run_lmforge(packing=False), run_lmforge(packing=True)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.peer:
        rows.append(run_peer(args.peer, "lora"))
        print(json.dumps(rows[-1]), flush=True)
    result = {**machine_and_versions(), "workload": "SmolLM2-135M-Instruct LoRA r8 all-linear, alpaca_en_demo[:96], max_length 256, "
                          "batch 8, fp32, steps 3-5 timed", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
