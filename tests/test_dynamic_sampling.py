"""DAPO's dynamic sampling and the stop flags of overlong handling: on hand-made groups, alone and through the
online loop (the generation engine replaced by a scripted one, so every group's rewards are known)."""

from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from lmforge.config.schema import RewardSpec, RLConfig
from lmforge.rollout.groups import collect_rollout, merge_samples, pick_groups, score_rollout, take_rows
from lmforge.rollout.rewards import RewardSet
from lmforge.rollout.rollouts import Samples, left_pad

DIGIT = r"^\s*\d"  # the reward: 1 when a reply starts with a digit
TOKEN = 7  # the id every scripted reply token has (what the rewards read is the text)


def samples_of(prompts: list[list[int]], replies: list[tuple[str, int, bool]], pad: int = 0) -> Samples:
    """Samples of scripted replies: (text, tokens, stopped) per sample, prompt-major."""
    width = max(1, max(n for _, n, _ in replies))
    ids, mask = torch.full((len(replies), width), pad), torch.zeros(len(replies), width)
    for i, (_, n, _) in enumerate(replies):
        ids[i, :n], mask[i, :n] = TOKEN, 1.0
    prompt, prompt_mask = left_pad(prompts, pad)
    return Samples(prompt, prompt_mask, ids, mask, [t for t, _, _ in replies],
                   torch.tensor([s for _, _, s in replies]), seconds=0.5)


MIXED = [("1", 2, True), ("a", 3, True), ("2", 2, True), ("b", 2, True)]  # rewards 1, 0, 1, 0
FLAT = [("a", 2, True)] * 4  # rewards all 0: no signal


class ScriptedRollouts:
    """A RolloutEngine whose k-th rollout gives group g the replies script[k][g]; it records the prompts."""

    def __init__(self, script: list[list[list]], pad: int = 0):
        self.script, self.calls = script, []
        self.tokenizer = SimpleNamespace(pad_token_id=pad)

    def sample(self, prompt_ids, sampling, max_new_tokens, n=1, logprobs=False) -> Samples:
        groups = self.script[min(len(self.calls), len(self.script) - 1)]
        self.calls.append([list(p) for p in prompt_ids])
        replies = [reply for g in range(len(prompt_ids)) for reply in groups[g % len(groups)]]
        return samples_of([p for p in prompt_ids for _ in range(n)], replies)


# ---------------------------------------------------------------- merging and keeping groups


def test_merge_repads_both_sides_and_take_trims_unused_columns():
    a = samples_of([[1, 2, 3]] * 2, [("x", 1, True), ("y", 2, False)])
    b = samples_of([[4]] * 2, [("z", 4, True), ("w", 1, True)])
    merged = merge_samples([a, b], pad_id=0)
    assert merged.prompt_ids.tolist() == [[1, 2, 3], [1, 2, 3], [0, 0, 4], [0, 0, 4]]  # left-padded
    assert merged.response_mask.sum(-1).tolist() == [1, 2, 4, 1] and merged.response_ids.shape == (4, 4)
    assert merged.texts == ["x", "y", "z", "w"] and merged.stopped.tolist() == [True, False, True, True]
    assert merged.seconds == 1.0
    kept = take_rows(merged, torch.tensor([3, 1]))
    # Row 3's prompt starts 2 columns in and row 1's uses all 3: nothing to trim on the left; replies 1 and 2
    # tokens wide: 2 columns kept on the right.
    assert kept.prompt_ids.tolist() == [[0, 0, 4], [1, 2, 3]] and kept.response_ids.shape == (2, 2)
    assert kept.texts == ["w", "y"] and kept.stopped.tolist() == [True, False]
    only_short = take_rows(merged, torch.tensor([2]))
    assert only_short.prompt_ids.tolist() == [[4]] and only_short.response_mask.tolist() == [[1, 1, 1, 1]]
    inputs = only_short.model_inputs()
    assert inputs["position_ids"][0, 0] == 0  # the prompt's first token still at position 0


def test_pick_groups_prefers_signal_then_tops_up_in_order():
    signal = torch.tensor([False, True, False, True, True])
    assert pick_groups(signal, 2).tolist() == [1, 3]  # the first two with signal; the third one is surplus
    assert pick_groups(torch.tensor([False, True, False, False]), 3).tolist() == [0, 1, 2]


def _collect(script, rl: RLConfig, prompts: int):
    rollouts = ScriptedRollouts(script)
    rewards = RewardSet(rl.reward_specs(), device=torch.device("cpu"))
    drawn = iter(range(100))

    def draw():
        start = next(drawn) * prompts
        rows = [{"prompt": [{"role": "user", "content": f"q{start + i}"}], "reference": "", "answer": ""}
                for i in range(prompts)]
        return rows, [[10 + start + i] for i in range(prompts)]

    accelerator = SimpleNamespace(num_processes=1)
    score = partial(score_rollout, rollouts, None, rewards, rl)
    return rollouts, collect_rollout(accelerator, score, draw, rl, pad_id=0, logprobs=False)


def test_dynamic_sampling_draws_until_enough_groups_differ():
    rl = RLConfig(num_generations=4, max_new_tokens=8, rewards=[RewardSpec(kind="regex", pattern=DIGIT)],
                  dynamic_sampling=True, max_sampling_rounds=3)
    # Round 1: groups 0 and 1 flat, 2 and 3 mixed; round 2: all four mixed -> two of them complete the step.
    rollouts, (sampled, kept, metrics) = _collect([[FLAT, FLAT, MIXED, MIXED], [MIXED] * 4], rl, prompts=4)
    assert len(rollouts.calls) == 2 and metrics == {"sampling_rounds": 2, "groups_sampled": 8,
                                                      "groups_dropped": 2, "groups_short": 0}
    assert len(sampled.rows) == 32 and sampled.raw.tolist() == [0.0] * 8 + [1.0, 0.0, 1.0, 0.0] * 6
    # Kept: round 1's groups 2, 3 and round 2's groups 0, 1 (prompts 12, 13, 14, 15), in that order.
    assert [r["prompt"][0]["content"] for r in kept.rows[::4]] == ["q2", "q3", "q4", "q5"]
    assert kept.samples.prompt_ids[::4, -1].tolist() == [12, 13, 14, 15]
    assert kept.raw.tolist() == [1.0, 0.0, 1.0, 0.0] * 4 and kept.samples.texts == ["1", "a", "2", "b"] * 4


def test_dynamic_sampling_stops_at_the_round_limit_and_tops_up_with_flat_groups():
    rl = RLConfig(num_generations=4, max_new_tokens=8, rewards=[RewardSpec(kind="regex", pattern=DIGIT)],
                  dynamic_sampling=True, max_sampling_rounds=3)
    rollouts, (sampled, kept, metrics) = _collect([[FLAT, MIXED], [FLAT, FLAT], [FLAT, FLAT], [MIXED] * 2], rl, 2)
    assert len(rollouts.calls) == 3  # never a fourth round, though it would have had signal
    assert metrics == {"sampling_rounds": 3, "groups_sampled": 6, "groups_dropped": 4, "groups_short": 1}
    # The one group with signal (round 1's second) and the earliest flat one fill the step of two groups.
    assert kept.samples.prompt_ids[::4, -1].tolist() == [10, 11] and kept.raw.tolist() == [0.0] * 4 + [1, 0, 1, 0]


def test_dynamic_sampling_counts_penalties_as_signal_and_is_off_by_default():
    script = [[[("a", 8, False), ("a", 2, True), ("a", 2, True), ("a", 2, True)]]]
    # All rewards 0, but one reply hit the limit: the missing-EOS penalty sets it apart.
    rl = RLConfig(num_generations=4, max_new_tokens=8, rewards=[RewardSpec(kind="regex", pattern=DIGIT)],
                  dynamic_sampling=True, missing_eos_penalty=1.0)
    rollouts, (_, _, metrics) = _collect(script, rl, prompts=1)
    assert len(rollouts.calls) == 1 and metrics["groups_dropped"] == 0 and metrics["groups_short"] == 0
    rl = RLConfig(num_generations=4, max_new_tokens=8, rewards=[RewardSpec(kind="regex", pattern=DIGIT)])
    rollouts, (sampled, kept, metrics) = _collect([[FLAT]], rl, prompts=1)
    assert len(rollouts.calls) == 1 and metrics == {} and kept is sampled


def test_ppo_refuses_dynamic_sampling_and_rounds_are_range_checked():
    from lmforge.config.errors import ConfigError
    from lmforge.config.load import load_config

    base = ["model.scratch=test", "rl.rewards=[{kind: answer_match}]", "rl.num_generations=2"]
    with pytest.raises(ConfigError, match="rl.dynamic_sampling apply to grpo and rloo, not ppo"):
        load_config(None, [*base, "rl.dynamic_sampling=true"], stage="ppo")
    with pytest.raises(ConfigError, match="rl.max_sampling_rounds=0"):
        load_config(None, [*base, "rl.max_sampling_rounds=0"], stage="grpo")


# ---------------------------------------------------------------- through the online loop


def _run(base, world_dir, tmp_path, monkeypatch, script, stage="grpo", *extra):
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS, online

    scripted = ScriptedRollouts(script)
    monkeypatch.setattr(online, "RolloutEngine", lambda policy, tokenizer, *a, **k: setattr(
        scripted, "tokenizer", tokenizer) or scripted)
    out = tmp_path / stage
    cfg = load_config(None, [
        f"model.name_or_path={base}", f"data.train={world_dir}/rl/arith_train.jsonl", "data.max_length=96",
        "rl.max_new_tokens=8", "rl.prompts_per_step=4", "rl.num_generations=4", "rl.eval_prompts=0",
        "rl.rewards=[{kind: regex, pattern: '" + DIGIT + "'}]", "rl.ppo_epochs=1", "train.batch_size=8",
        "train.lr=1e-3", "train.logging_steps=1", f"train.output_dir={out}", "log.progress=false",
        "log.report_to=[]", *extra], stage=stage)
    STAGE_RUNNERS[stage](cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return scripted, [r for r in rows if "iteration" in r]


def test_dynamic_sampling_through_the_loop(base, world_dir, tmp_path, monkeypatch):
    script = [[FLAT, FLAT, MIXED, MIXED], [MIXED] * 4, [FLAT] * 4]  # iteration 2: flat, three rounds
    scripted, rows = _run(base, world_dir, tmp_path, monkeypatch, script, "grpo", "train.max_steps=2",
                          "rl.dynamic_sampling=true", "rl.max_sampling_rounds=3")
    assert len(scripted.calls) == 5  # 2 rounds, then 3
    prompts = [tuple(p) for call in scripted.calls for p in call]
    assert len(set(prompts)) == 20  # every round drew new prompts from the epoch order
    first, second = rows
    assert (first["sampling_rounds"], first["groups_dropped"], first["groups_short"]) == (2, 2, 0)
    assert first["groups_with_signal"] == 1.0 and first["groups_without_signal"] == 0
    assert first["reward"] == pytest.approx(12 / 32)  # over all 32 sampled replies; the trained ones score 0.5
    assert first["score"] == pytest.approx(0.5) and first["loss_count"] == first["reply_tokens"] == 36
    assert (second["sampling_rounds"], second["groups_dropped"], second["groups_short"]) == (3, 8, 4)
    assert second["groups_with_signal"] == 0.0


@pytest.mark.parametrize("loss_type, count", [("dapo", 20), ("grpo", 16)])
def test_mask_truncated_through_the_loop(base, world_dir, tmp_path, monkeypatch, loss_type, count):
    group = [("1", 2, True), ("1 2 3", 8, False), ("a", 3, True), ("a b", 8, False)]
    _, rows = _run(base, world_dir, tmp_path, monkeypatch, [[group] * 4], "rloo", "train.max_steps=1",
                   "rl.mask_truncated=true", f"rl.loss_type={loss_type}", "train.batch_size=16")
    row = rows[0]
    assert row["truncated_masked"] == 8 and row["length"] == pytest.approx(21 / 4)
    # Only the stopped replies' 2 + 3 tokens of each group carry loss; grpo still counts every reply (as TRL).
    assert row["reply_tokens"] == 20 and row["loss_count"] == count
