"""Evaluation: each measurement against numbers known by construction, and `lmforge eval` on artifacts."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.cli import main
from lmforge.config.errors import ConfigError
from lmforge.config.schema import RewardSpec
from lmforge.demo import grading as demo_grading
from lmforge.eval import metrics
from lmforge.eval.spec import EvalSpec
from lmforge.eval.suite import evaluate_model, read_records, wanted_suites
from lmforge.rollout import evaluate
from lmforge.rollout.generate import Generation
from lmforge.rollout.rewards import RewardSet, decode_rows
from lmforge.rollout.rollouts import Samples


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(base, world_dir):
    model, tokenizer = _load(base)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()  # tied: every logit 0, every token 1/V
    texts = (world_dir / "pt" / "eval.txt").read_text(encoding="utf-8").splitlines()[:10]
    result = metrics.perplexity(model, tokenizer, texts, block_size=64)
    assert result["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-4)
    assert result["eval_tokens"] > 100


def test_perplexity_of_the_trained_model_is_far_below_uniform(base, world_dir):
    model, tokenizer = _load(base)
    texts = (world_dir / "pt" / "eval.txt").read_text(encoding="utf-8").splitlines()[:10]
    assert metrics.perplexity(model, tokenizer, texts, block_size=64)["perplexity"] < model.config.vocab_size / 5


def _samples(texts: list[str], stopped: list[bool]) -> Samples:
    n = len(texts)
    return Samples(torch.zeros(n, 1), torch.ones(n, 1), torch.zeros(n, 2), torch.tensor([[1.0, 1.0]] * n), texts,
                   torch.tensor(stopped), 0.0)


def test_answer_metrics_exact_and_contains():
    records = [{"prompt": [{"role": "user", "content": "Where is Fusovel?"}], "reference": "Fusovel lies in the south.",
                "answer": "south", "extra": json.dumps({"distractors": ["north", "east"]})}] * 4
    replies = _samples(["Fusovel lies in the south.", "In the south, I think.", "South or north.", "No idea."],
                       [True, True, True, False])
    out = metrics.answer_metrics(records, replies)
    assert out["exact_match"] == 0.25
    assert out["contains"] == 0.5  # "south or north" names a distractor too: not an answer
    assert out["stopped_rate"] == 0.75


def test_win_rate_counts_ties_half():
    out = metrics.win_rate([1.0, 2.0, 0.5, 3.0], [0.0, 2.0, 1.0, 1.0], prefix="gt_")
    assert out == {"gt_win_rate": 0.625, "gt_wins": 2, "gt_ties": 1, "gt_losses": 1}


def test_kl_to_itself_is_zero_and_to_another_model_positive(base, world_dir):
    model, tokenizer = _load(base)
    records = read_records(str(world_dir / "rl" / "eval.jsonl"), "prompt", 8)
    assert metrics.kl_to_reference(model, model, tokenizer, records, 12, seed=0)["kl"] == pytest.approx(0.0, abs=1e-5)
    other, _ = _load(base)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn_like(param))
    assert metrics.kl_to_reference(model, other, tokenizer, records, 12, seed=0)["kl"] > 0.01


def test_wanted_suites_follow_the_model_kind_and_the_judges():
    spec = EvalSpec(perplexity="a.txt", answers="b.jsonl", pairs="p.jsonl", reward_model="rm", baseline="sft")
    assert wanted_suites(spec, reward_model=True) == ["rm_accuracy"]
    assert wanted_suites(spec, reward_model=False) == ["perplexity", "answers", "reward", "win_rate"]
    with pytest.raises(ConfigError):
        EvalSpec(max_new_tokens=0)


def test_eval_command_stores_results_and_reuses_unchanged_suites(base, world_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(base, model)
    args = ["eval", str(model), "--perplexity", str(world_dir / "pt" / "eval.txt"),
            "--answers", str(world_dir / "rl" / "eval.jsonl"), "--max-samples", "6", "--max-new-tokens", "8"]
    assert main(args) == 0
    stored = json.loads((model / "lmforge.json").read_text())["eval"]
    assert set(stored["suites"]) == {"perplexity", "answers"}
    assert math.isfinite(stored["metrics"]["perplexity"]) and 0 <= stored["metrics"]["exact_match"] <= 1
    assert len(stored["samples"]) == 4 and stored["samples"][0]["reference"]

    capsys.readouterr()
    assert main(args) == 0  # nothing changed: nothing is evaluated again
    assert "evaluating" not in capsys.readouterr().out
    assert main([*args[:-2], "--max-new-tokens", "9"]) == 0
    out = capsys.readouterr().out
    assert "answers" in out and "perplexity," not in out  # only the suite whose settings changed reruns


def test_eval_of_a_reward_model_is_its_pairwise_accuracy(base, world_dir, tmp_path):
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    out = tmp_path / "rm"
    cfg = load_config(None, [f"model.name_or_path={base}", f"data.train={world_dir}/pref/train.jsonl",
                             "data.eval_split=0", "data.max_length=64", "train.max_steps=2", f"train.output_dir={out}",
                             "log.report_to=[]", "log.progress=false"], stage="rm")
    STAGE_RUNNERS["rm"](cfg)
    result = evaluate_model(str(out), EvalSpec(pairs=str(world_dir / "pref" / "eval.jsonl"), max_samples=40))
    assert set(result["suites"]) == {"rm_accuracy"}
    assert 0.0 <= result["metrics"]["rm_accuracy"] <= 1.0 and "rm_margin" in result["metrics"]


FULL_WIDTH_DIGITS = {ord(d): ord(d) + 0xFEE0 for d in "0123456789"}


def _variants(reference: str, i: int) -> str:
    """Replies by construction: the reference; the reference as a model might space and write it (line
    breaks, full-width digits); right but rude (not exact, still states the answer); no answer at all."""
    spaced = "  " + reference.replace(" ", " \n ").translate(FULL_WIDTH_DIGITS) + "\t "
    return (reference, spaced, f"{reference} Everyone knows that.", "I don't know.")[i // 2 % 4]


def test_stage_eval_reward_and_demo_grader_agree_on_the_same_replies(world_dir, monkeypatch):
    path = world_dir / "rl" / "eval.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:40]]
    records = read_records(str(path), "prompt", 40)
    texts = [_variants(r["reference"], i) for i, r in enumerate(records)]
    assert [r["reference"] for r in records] == [r["messages"][-1]["content"] for r in raw]

    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: [Generation(t, [], True) for t in texts])
    stage = evaluate.answer_eval(None, None, [r["prompt"] for r in records], [r["reference"] for r in records], 8)
    pipeline = metrics.answer_metrics(records, _samples(texts, [True] * len(texts)))
    rows = {**decode_rows(records), "response_lengths": [1] * len(texts), "stopped": [True] * len(texts)}
    _, rewards = RewardSet([RewardSpec(kind="exact_match"), RewardSpec(kind="answer_match")])(
        [r["prompt"] for r in records], texts, rows)
    demo_exact = sum(demo_grading.exact_match(r, t) for r, t in zip(raw, texts)) / len(raw)
    demo_stated = sum(demo_grading.answer_is_correct(r, t) for r, t in zip(raw, texts)) / len(raw)

    # Half the replies are the reference up to whitespace; three quarters state the answer.
    assert stage["exact_match"] == pipeline["exact_match"] == float(rewards["exact_match"].mean()) == demo_exact == 0.5
    assert pipeline["contains"] == float(rewards["answer_match"].mean()) == demo_stated == 0.75


def test_evaluation_shows_its_progress_over_the_suites_asked(base, world_dir, capsys, monkeypatch):
    """Issue 24: an evaluation has a progress bar: suites done out of those asked (without a terminal, a line
    at the start and one at the end; quiet under QUIET_S, set to 0 here)."""
    from lmforge.eval import suite

    monkeypatch.setattr(suite, "QUIET_S", 0.0)
    spec = EvalSpec(perplexity=str(world_dir / "pt" / "eval.txt"), answers=str(world_dir / "rl" / "eval.jsonl"),
                    max_samples=4, max_new_tokens=4)
    result = evaluate_model(str(base), spec)
    assert set(result["suites"]) == {"perplexity", "answers"}
    out = capsys.readouterr().out
    assert "Evaluating: 0/2" in out and "Evaluating: 2/2 done in" in out
