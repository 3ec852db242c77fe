"""Online RL stages (ppo, grpo, rloo) on tiny models: rollouts, reward shaping, learning, artifacts, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.config.load import load_config
from lmforge.config.schema import RLConfig
from lmforge.data.templates import encode_prompts, end_of_turn_ids
from lmforge.generation import Sampling
from lmforge.loop.checkpoint import list_checkpoints
from lmforge.models.load import as_reward_model
from lmforge.rollout.rollouts import RolloutEngine
from lmforge.stages import STAGE_RUNNERS
from lmforge.stages.online import shape_scores
from lmforge.stages.ppo import token_rewards

QUIET = ["log.progress=false", "log.report_to=[]"]
STARTS_WITH_DIGIT = r"^\s*\d"


@pytest.fixture(scope="module")
def reward_model(base, tmp_path_factory):
    """An (untrained) reward model on the base network: enough to exercise the RM reward path."""
    out = tmp_path_factory.mktemp("rl_rm")
    tokenizer = AutoTokenizer.from_pretrained(base)
    rm = as_reward_model(AutoModelForCausalLM.from_pretrained(base), seed=0)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def rl_args(world_dir, out, *extra):
    return [f"data.train={world_dir}/rl/arith_train.jsonl", f"data.eval={world_dir}/rl/arith_eval.jsonl",
            "data.max_length=96", "rl.max_new_tokens=8", "rl.prompts_per_step=8", "rl.eval_prompts=16",
            "train.batch_size=16", "train.logging_steps=1", f"train.output_dir={out}", *QUIET, *extra]


def rows_of(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_keeps_the_stop_token_and_pads_after_it(base):
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = encode_prompts(tokenizer, [[{"role": "user", "content": "What is 2 + 3?"}],
                                 [{"role": "user", "content": "Where is it?"}]])
    ends = end_of_turn_ids(tokenizer)
    torch.manual_seed(0)
    samples = RolloutEngine(model, tokenizer, 6, max(map(len, prompts)), 6).sample(prompts, Sampling(), 6, n=3)
    assert samples.response_ids.shape[0] == 6 and samples.prompt_ids.shape[0] == 6
    assert torch.equal(samples.prompt_ids[0], samples.prompt_ids[2])  # prompt-major: 3 samples of prompt 0
    for ids, mask, stopped in zip(samples.response_ids, samples.response_mask, samples.stopped):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == tokenizer.pad_token_id).all()
        assert bool(stopped) == (ids[n - 1].item() in ends) and (bool(stopped) or n == 6)
        assert not set(ids[:n - 1].tolist()) & set(ends)  # nothing after the end of the turn
    inputs = samples.model_inputs()
    positions = inputs["position_ids"][inputs["attention_mask"].bool()]
    assert positions.min() == 0  # left padding skipped: every sequence starts at position 0


def test_token_rewards_pay_the_score_on_the_last_token():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    rewards = token_rewards(torch.tensor([1.0, -2.0]), mask, kl, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.25 - 2.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_shape_scores_penalty_normalisation_and_clip():
    raw, stopped = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([True, True, False, True])
    assert shape_scores(raw, stopped, RLConfig(missing_eos_penalty=1.5), {}).tolist() == [1.0, 2.0, 1.5, 4.0]
    batch = shape_scores(raw, stopped.fill_(True), RLConfig(reward_norm="batch"), {})
    assert float(batch.mean()) == pytest.approx(0.0, abs=1e-6) and float(batch.std()) == pytest.approx(1.0, 1e-4)
    extra: dict = {}
    shape_scores(raw, stopped, RLConfig(reward_norm="running"), extra)
    second = shape_scores(raw, stopped, RLConfig(reward_norm="running"), extra)
    values = raw.tolist() * 2  # the running std covers both batches
    assert second.tolist() == pytest.approx((raw / torch.tensor(values).std()).tolist(), rel=1e-5)
    assert shape_scores(raw * 10, stopped, RLConfig(reward_clip=15.0), {}).tolist() == [10.0, 15.0, 15.0, 15.0]


@pytest.mark.parametrize("backend,epochs", [("hf", 2), ("own", 1)])
def test_grpo_learns_a_verifiable_reward(base, world_dir, tmp_path, backend, epochs):
    """On the engine's HF fallback with two epochs (old log-probs from the engine), and on its own decoder with
    one on-policy step per rollout (no old-log-prob pass)."""
    out = tmp_path / "grpo"
    cfg = load_config(None, rl_args(world_dir, out, f"model.name_or_path={base}", "rl.num_generations=8",
                                    "rl.rewards=[{kind: regex, pattern: '" + STARTS_WITH_DIGIT + "'}]",
                                    "rl.kl_coef=0.0", f"rl.ppo_epochs={epochs}", "train.max_steps=20",
                                    "train.lr=3e-3", f"rl.backend={backend}"),
                      stage="grpo")
    metrics = STAGE_RUNNERS["grpo"](cfg)
    rows = [r for r in rows_of(out / "metrics.jsonl") if "iteration" in r]
    first, last = (sum(r["reward"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
    assert last > first + 0.1, (first, last)  # sampled replies (temperature 1) improve too
    assert metrics["initial_eval_reward"] < 0.4 and metrics["eval_reward"] > 0.8  # greedy replies
    shares = sum(rows[0][f"time/{k}_share"] for k in ("generate", "score", "inference", "train"))
    assert 0.5 < shares <= 1.0 + 1e-6
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_ppo_with_a_reward_model_and_a_separate_critic(base, reward_model, world_dir, tmp_path):
    out = tmp_path / "ppo"
    cfg = load_config(None, rl_args(world_dir, out, f"model.name_or_path={base}", f"rl.reward_model={reward_model}",
                                    "rl.kl_coef=0.1", "rl.kl_target=0.5", "train.max_steps=2", "train.lr=1e-4"),
                      stage="ppo")
    metrics = STAGE_RUNNERS["ppo"](cfg)
    rows = [r for r in rows_of(out / "metrics.jsonl") if "iteration" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout comes from the reference itself
    assert rows[0]["kl_coef"] != 0.1  # the adaptive controller moved toward its target
    for key in ("value_loss", "explained_variance", "clipfrac", "entropy", "reward/model", "reward_with_kl"):
        assert key in rows[0], key
    assert "eval_kl" in metrics and "initial_eval_reward" in metrics
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert not any("score" in name for name, _ in saved.named_parameters())  # the policy alone, no critic


def test_ppo_lora_with_shared_value_head_uses_the_adapter_free_reference(base, world_dir, tmp_path):
    out = tmp_path / "ppo_lora"
    cfg = load_config(None, rl_args(world_dir, out, f"model.name_or_path={base}", "model.finetuning=lora",
                                    "rl.critic=shared", "rl.rewards=[{kind: answer_match}]", "train.max_steps=2",
                                    "train.lr=1e-3"), stage="ppo")
    STAGE_RUNNERS["ppo"](cfg)
    rows = [r for r in rows_of(out / "metrics.jsonl") if "iteration" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["kl"] != 0.0  # the adapter moved the policy away from the adapter-free reference
    assert (out / "adapter_config.json").is_file()


def test_rloo_runs_and_resumes_to_the_same_weights(base, world_dir, tmp_path):
    args = [f"model.name_or_path={base}", "rl.num_generations=4", "rl.rewards=[{kind: answer_match}]",
            "train.max_steps=4", "train.save_steps=2", "train.lr=1e-3"]
    whole = tmp_path / "whole"
    STAGE_RUNNERS["rloo"](load_config(None, rl_args(world_dir, whole, *args), stage="rloo"))
    halfway = list_checkpoints(whole / "checkpoints")[0]
    # A second run continued from the checkpoint written after iteration 2 ends with the same weights.
    resumed = tmp_path / "resumed"
    STAGE_RUNNERS["rloo"](load_config(None, rl_args(world_dir, resumed, *args, f"train.resume_from={halfway}"),
                                      stage="rloo"))
    a = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_mid_run_saves_and_the_resumed_run_ends_with_the_same_weights(base, world_dir, tmp_path,
                                                                               monkeypatch):
    """Preemption: SIGTERM during iteration 2 finishes that iteration, saves it (save_steps is 0) and
    exits with status 143; train.resume=true then ends exactly where an uninterrupted run does."""
    import os
    import signal

    from lmforge.loop.preemption import EXIT_STATUS, Preempted
    from lmforge.stages import online

    args = [f"model.name_or_path={base}", "rl.num_generations=4", "rl.rewards=[{kind: answer_match}]",
            "train.max_steps=3", "train.save_steps=0", "train.lr=1e-3", "rl.eval_prompts=0", "rl.ppo_epochs=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    STAGE_RUNNERS["grpo"](load_config(None, rl_args(world_dir, whole, *args), stage="grpo"))
    calls, iteration = [], online.one_iteration

    def preempted_in_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return iteration(*a, **k)

    monkeypatch.setattr(online, "one_iteration", preempted_in_second)
    with pytest.raises(Preempted) as stopped:
        STAGE_RUNNERS["grpo"](load_config(None, rl_args(world_dir, cut, *args), stage="grpo"))
    assert stopped.value.code == EXIT_STATUS and len(calls) == 2
    assert [p.name for p in list_checkpoints(cut / "checkpoints")] == ["checkpoint-2"]
    monkeypatch.setattr(online, "one_iteration", iteration)
    STAGE_RUNNERS["grpo"](load_config(None, rl_args(world_dir, cut, *args, "train.resume=true"), stage="grpo"))
    a = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = AutoModelForCausalLM.from_pretrained(cut).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_prompt_too_long_for_the_reply_is_a_data_error_naming_file_and_line(base, world_dir, tmp_path, capsys):
    from lmforge.cli import main

    args = rl_args(world_dir, tmp_path / "long", f"model.name_or_path={base}", "rl.num_generations=2",
                   "rl.rewards=[{kind: answer_match}]", "data.max_length=12")
    assert main(["train", "grpo", *args]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"{world_dir}/rl/arith_train.jsonl:line" in out and "leaves no room for rl.max_new_tokens=8" in out


# ---------------------------------------------------------------- held-out grading of references with no text

INVISIBLE = "\u200b\u200d "  # zero-width characters: a reference that looks filled but states nothing


def _one_reply(text: str):
    from lmforge.rollout.rollouts import Samples

    return Samples(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                   torch.full((1, 1), 5), torch.ones(1, 1), [text], torch.tensor([True]), seconds=0.0)


def test_held_out_replies_skip_exact_match_when_a_reference_is_only_invisible_characters():
    from types import SimpleNamespace

    from lmforge.config.schema import RewardSpec
    from lmforge.rollout.rewards import RewardSet
    from lmforge.stages.online import evaluate_policy

    rollouts = SimpleNamespace(sample=lambda *a, **k: _one_reply("7"))
    rl = RLConfig(rewards=[RewardSpec(kind="regex", pattern=STARTS_WITH_DIGIT)])
    rows = [{"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "reference": INVISIBLE, "answer": ""}]
    out = evaluate_policy(None, None, rollouts, rows, [[1, 2]], RewardSet(rl.reward_specs()), None, rl)
    assert out["reward"] == 1.0 and "exact_match" not in out
    rows[0]["reference"] = "7"
    out = evaluate_policy(None, None, rollouts, rows, [[1, 2]], RewardSet(rl.reward_specs()), None, rl)
    assert out["exact_match"] == 1.0


def test_eval_metrics_skip_answers_a_gsm8k_marker_leaves_empty():
    from lmforge.eval.metrics import answer_metrics, ground_truth

    record = {"prompt": [{"role": "user", "content": "How many?"}], "reference": INVISIBLE, "answer": "#### "}
    out = answer_metrics([record], _one_reply("12"))
    assert "exact_match" not in out and "contains" not in out and out["length"] == 1.0
    assert ground_truth([record], ["12"]) is None
    record.update(answer="#### 12", reference="There are 12.")
    out = answer_metrics([record], _one_reply("There are 12."))
    assert out["exact_match"] == 1.0 and out["contains"] == 1.0
    assert ground_truth([record], ["12 of them", "none"][:1]) == [1.0]
