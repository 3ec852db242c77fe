"""Issue 24: an online RL run (grpo here; ppo and rloo share run_online) says its plan before the first iteration,
as offline stages do: records read, prompts and their tokens, rollouts, optimizer steps and one prompt."""

from __future__ import annotations

from test_rl_stages import rl_args

from lmforge.config.load import load_config
from lmforge.stages import STAGE_RUNNERS


def test_grpo_says_its_plan_before_the_first_iteration(base, world_dir, tmp_path, capsys):
    train = world_dir / "rl" / "arith_train.jsonl"
    n = len(train.read_text(encoding="utf-8").splitlines())
    cfg = load_config(None, rl_args(world_dir, tmp_path / "grpo", f"model.name_or_path={base}", "rl.num_generations=2",
                                    "rl.rewards=[{kind: answer_match}]", "train.max_steps=1", "rl.ppo_epochs=2",
                                    "rl.eval_prompts=4"), stage="grpo")
    STAGE_RUNNERS["grpo"](cfg)
    said = capsys.readouterr().out.splitlines()
    assert f"data (read): {train}: {n} read, {n} kept" in said
    plan = [line for line in said if line.startswith(("prompts:", "iterations:", "optimizer steps:", "example prompt"))]
    assert plan[0].startswith(f"prompts: {n:,} train (") and plan[0].endswith("), 4 held out")
    assert plan[1] == (f"iterations: 1 ({8 / n:.2g} epochs over the prompts), each 8 prompts x 2 replies = 16 "
                       "rollouts of up to 8 new tokens; 16 rollouts in all")
    assert plan[2] == "optimizer steps: 2 per iteration (2 epochs x 1 minibatches of 16 rollouts), 2 in all"
    assert plan[3].startswith("example prompt (") and "<|im_start|>user" in plan[3]
