"""The demo pipeline (examples/demo.yaml) on a shorter schedule: every stage moves its own metric the
right way, as the full demo does in the README's main command."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.pipeline.run import load_pipeline, run_pipeline

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
SHORTER = ["stages.pt.config.train.epochs=8", "stages.sft.config.train.epochs=5",
           "stages.rm.config.train.epochs=4", "stages.ppo.config.train.max_steps=20",
           "stages.dpo.config.train.epochs=1", "eval.choice=null"]


def test_demo_pipeline_each_stage_improves_its_own_metric(tmp_path):
    run = tmp_path / "demo"
    pipeline = load_pipeline(DEMO, [f"run_dir={run}", *SHORTER])
    run_pipeline(pipeline)
    evals = {s: json.loads((run / s / "lmforge.json").read_text())["eval"]["metrics"]
             for s in ("pt", "sft", "rm", "ppo", "dpo")}
    start = json.loads((run / "run.json").read_text())["start_eval"]["metrics"]
    print({s: {k: round(v, 3) for k, v in m.items() if isinstance(v, float)} for s, m in evals.items()})

    assert evals["pt"]["perplexity"] < start["perplexity"] / 100       # PT: from ~vocabulary size to a few
    # SFT: the model answers (on this short schedule the rude habit still spoils most exact matches)
    assert evals["sft"]["contains"] > evals["pt"]["contains"] + 0.15
    assert evals["sft"]["exact_match"] > evals["pt"]["exact_match"]
    assert evals["rm"]["rm_accuracy"] >= 0.8                            # RM: held-out pairs ranked
    for policy in ("ppo", "dpo"):                                       # PPO, DPO: better replies than SFT's
        assert evals[policy]["win_rate"] > 0.6, policy
        assert evals[policy]["reward"] > evals["sft"]["reward"], policy
        assert 0 <= evals[policy]["kl"] < 3.0, policy                   # ... near SFT
        assert evals[policy]["gt_win_rate"] >= 0.45, policy             # ... and no facts lost
        assert evals[policy]["exact_match"] >= evals["sft"]["exact_match"], policy
    assert (run / "report.html").stat().st_size > 50_000                # the figures are in it
