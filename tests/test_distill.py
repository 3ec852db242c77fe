"""On-policy distillation: the divergences against hand computations and TRL's GKD loss, the config, the
vocabulary check, and the stage learning on the demo world's tiny models."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config
from lmforge.losses.distill import distill_token_loss, generalized_jsd, reverse_kl, sampled_reverse_kl
from lmforge.stages import STAGE_RUNNERS
from lmforge.stages.distill import on_policy, summary

QUIET = ["log.progress=false", "log.report_to=[]"]
REPLY = "I will work it out."


# -- the losses -------------------------------------------------------------------------------------------------
def hand_divergences(student: list[float], teacher: list[float], beta: float) -> float:
    """JSD(beta) of one position from its definition, in plain Python."""
    def softmax(xs):
        top = max(xs)
        e = [math.exp(x - top) for x in xs]
        return [v / sum(e) for v in e]

    p, q = softmax(student), softmax(teacher)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    if beta == 0:
        return kl(q, p)
    if beta == 1:
        return kl(p, q)
    m = [(1 - beta) * x + beta * y for x, y in zip(p, q)]
    return beta * kl(q, m) + (1 - beta) * kl(p, m)


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_generalized_jsd_equals_the_hand_computation(beta):
    student = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 3.0]]
    teacher = [[0.5, 2.5, -0.5, 0.0], [2.0, -1.0, 0.0, 0.0]]
    got = generalized_jsd(torch.tensor(student, dtype=torch.float64), torch.tensor(teacher, dtype=torch.float64), beta)
    expected = [hand_divergences(s, t, beta) for s, t in zip(student, teacher)]
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert (got > 0).all()  # the two distributions differ at both positions


def test_reverse_kl_by_hand_with_temperature_and_zero_on_equal_distributions():
    s, t = torch.tensor([[2.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    p = 1 / (1 + math.exp(-2.0 / 0.5))  # softmax([4, 0])[0] at temperature 0.5
    expected = p * math.log(p / (1 - p)) + (1 - p) * math.log((1 - p) / p)
    assert reverse_kl(s, t, temperature=0.5).item() == pytest.approx(expected, abs=1e-12)
    assert reverse_kl(s, s + 7.0).item() == pytest.approx(0.0, abs=1e-12)  # a shift of the logits changes nothing


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_chunked_backward_equals_autograd_through_log_softmax(beta, monkeypatch):
    """The hand-written backward, run in chunks of 2 rows, against autograd through the plain formula."""
    import lmforge.losses.distill as distill

    monkeypatch.setattr(distill, "LOGSOFTMAX_CHUNK_ELEMENTS", 2 * 11)
    torch.manual_seed(0)
    student = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, 11, dtype=torch.float64)
    weights = torch.rand(3, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad((generalized_jsd(student, teacher, beta, 0.8) * weights).sum(), student)
    s, t = torch.log_softmax(student / 0.8, -1), torch.log_softmax(teacher / 0.8, -1)
    if beta == 0:
        plain = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        plain = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
        plain = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    (expected,) = torch.autograd.grad((plain * weights).sum(), student)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_bf16_logits_keep_their_dtype_and_the_teacher_gets_no_gradient():
    student = torch.randn(2, 3, 9).bfloat16().requires_grad_()
    teacher = torch.randn(2, 3, 9).bfloat16().requires_grad_()
    out = reverse_kl(student, teacher)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert student.grad.dtype == torch.bfloat16 and teacher.grad is None


def test_matches_trls_generalized_jsd_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    torch.manual_seed(1)
    student = torch.randn(2, 4, 13, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 13, dtype=torch.float64)
    for beta in (0.0, 0.5, 0.1, 1.0):
        for temperature in (1.0, 0.7):
            ours = generalized_jsd(student, teacher, beta, temperature)
            theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature,
                                                         reduction="none").sum(-1)
            assert (ours - theirs).abs().max().item() < 1e-6, (beta, temperature)
            (g_ours,) = torch.autograd.grad(ours.sum(), student)
            (g_theirs,) = torch.autograd.grad(theirs.sum(), student)
            assert (g_ours - g_theirs).abs().max().item() < 1e-6, (beta, temperature)


def test_sampled_estimate_value_and_score_function_gradient():
    logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, -9.0]])
    per_token = sampled_reverse_kl(logps, teacher)
    assert per_token[0].tolist() == pytest.approx([0.5, -1.0, 8.5])
    per_token.sum().backward()
    assert logps.grad[0].tolist() == pytest.approx([0.5, -1.0, 8.5])  # (log p_s - log p_t) * d log p_s


def test_token_loss_sums_real_tokens_only():
    per_token = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, count, metrics = distill_token_loss(per_token, mask)
    assert total.item() == 7.0 and count.item() == 3 and metrics["divergence"].item() == pytest.approx(7 / 3)


def test_on_policy_schedule_gives_the_exact_share():
    for share, n in ((1.0, 7), (0.0, 7), (0.5, 10), (0.3, 10), (0.25, 8)):
        picked = [on_policy(k, share) for k in range(n)]
        assert sum(picked) == round(share * n), (share, picked)
    assert [on_policy(k, 0.5) for k in range(4)] == [False, True, False, True]  # spread, not bunched


def test_gap_closed_reads_the_initial_and_final_exact_match():
    metrics = summary({}, {"exact_match": 0.4}, {"exact_match": 0.1, "teacher_exact_match": 0.7})
    assert metrics["eval_gap_closed"] == pytest.approx(0.5) and metrics["eval_teacher_exact_match"] == 0.7
    assert "eval_gap_closed" not in summary({}, {"exact_match": 0.4}, {"exact_match": 0.7, "teacher_exact_match": 0.5})


# -- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ([], "distill needs a teacher: set distill.teacher"),
    (["distill.teacher=x", "distill.beta=1.5"], "distill.beta=1.5: must be a finite number in [0, 1]"),
    (["distill.teacher=x", "distill.lambda_on_policy=-0.1"], "distill.lambda_on_policy=-0.1"),
    (["distill.teacher=x", "distill.estimator=sampled", "distill.beta=0.5"], "set distill.beta=1"),
    (["distill.teacher=x", "distill.estimator=topk"], "distill.estimator='topk' is not one of full, sampled"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(None, ["model.scratch=test", *overrides], stage="distill")
    assert message in str(caught.value) and "\n" not in str(caught.value)


# -- the stage --------------------------------------------------------------------------------------------------
def prompts_file(path, rows: list[dict]) -> str:
    """The demo world's questions, each answered with REPLY: a behaviour a test-size model learns in seconds."""
    path.write_text("".join(json.dumps({"messages": [*r["messages"][:-1], {"role": "assistant", "content": REPLY}]},
                                       ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def task(world_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_task")
    read = lambda name: [json.loads(line) for line in (world_dir / "rl" / name).read_text().splitlines()]  # noqa: E731
    return prompts_file(root / "train.jsonl", read("arith_train.jsonl")), \
        prompts_file(root / "eval.jsonl", read("arith_eval.jsonl"))


def sft(base, task, out, steps: int):
    STAGE_RUNNERS["sft"](load_config(None, [f"model.name_or_path={base}", f"data.train={task[0]}", "data.eval_split=0",
                                            "data.max_length=96", "sft.eval_generate=0", "train.batch_size=16",
                                            f"train.max_steps={steps}", "train.lr=3e-3", f"train.output_dir={out}",
                                            *QUIET], stage="sft"))
    return out


@pytest.fixture(scope="module")
def teacher(base, task, tmp_path_factory):
    """The base SFT'd until it answers every held-out question with REPLY."""
    return sft(base, task, tmp_path_factory.mktemp("teacher"), 120)


@pytest.fixture(scope="module")
def student(base, task, tmp_path_factory):
    """The base SFT'd half as long: it says 'I w w work it out.' (exact match 0)."""
    return sft(base, task, tmp_path_factory.mktemp("student"), 60)


def distill_args(student, teacher, task, out, *extra) -> list[str]:
    return [f"model.name_or_path={student}", f"distill.teacher={teacher}", f"data.train={task[0]}",
            f"data.eval={task[1]}", "data.max_length=96", "distill.max_new_tokens=12", "distill.prompts_per_step=16",
            "distill.eval_prompts=32", "train.lr=3e-3", "train.batch_size=16", "train.logging_steps=1",
            f"train.output_dir={out}", *QUIET, *extra]


def test_distillation_halves_the_reverse_kl_to_the_teacher_on_held_out_prompts(student, teacher, task, tmp_path):
    """30 iterations, half on the student's samples and half on the data's replies (GKD's mix, lambda 0.5): on
    held-out questions the student's reverse KL to the teacher (on its own greedy replies) falls by more than
    half and it ends its turn as the teacher does. (Exact match needs far more steps at this model size: the
    measured figures of a real student and teacher are in docs/distill.md.)"""
    out = tmp_path / "distill"
    metrics = STAGE_RUNNERS["distill"](load_config(None, distill_args(
        student, teacher, task, out, "train.max_steps=30", "distill.lambda_on_policy=0.5"), stage="distill"))
    print({k: round(v, 3) for k, v in metrics.items() if k.startswith(("eval", "initial")) and isinstance(v, float)})
    assert metrics["initial_eval_teacher_exact_match"] == 1.0 and metrics["initial_eval_exact_match"] == 0.0
    assert metrics["eval_reverse_kl"] < 0.6 * metrics["initial_eval_reverse_kl"]
    assert metrics["eval_stopped_rate"] == 1.0 > metrics["initial_eval_stopped_rate"]
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "iteration" in r]
    assert [r["on_policy"] for r in rows] == [0, 1] * 15  # the exact share, spread evenly
    off = [r["divergence"] for r in rows if not r["on_policy"]]  # the same replies every epoch: comparable
    assert off[-1] < 0.7 * off[0]
    manifest = json.loads((out / "lmforge.json").read_text())
    assert manifest["stage"] == "distill" and manifest["metrics"]["iterations"] == 30
    assert manifest["input_manifests"] == {str(teacher): manifest["input_manifests"][str(teacher)]} and \
        manifest["input_manifests"][str(teacher)]  # a retrained teacher makes the artifact stale
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(student, chat_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from lmforge.models.load import build_scratch_model

    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    build_scratch_model("test", tokenizer, seed=0).save_pretrained(other)
    tokenizer.save_pretrained(other)
    cfg = load_config(None, distill_args(student, other, ("unused", "unused"), tmp_path / "out"), stage="distill")
    with pytest.raises(ConfigError) as caught:
        STAGE_RUNNERS["distill"](cfg)
    message = str(caught.value)
    assert "\n" not in message and f"distill.teacher={other}" in message and "model.name_or_path" in message
    assert "its tokenizer differs from the student's" in message and "(token, id) pairs differ" in message


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_a_model_distilled_into_itself_does_not_change(base, task, tmp_path, estimator):
    """Teacher = student: every divergence is 0 (the full one exactly, the sampled estimate up to rounding), so
    no gradient moves a weight."""
    out = tmp_path / estimator
    metrics = STAGE_RUNNERS["distill"](load_config(None, distill_args(
        base, base, task, out, "train.max_steps=2", "distill.eval_prompts=4", f"distill.estimator={estimator}",
        "distill.prompts_per_step=4"), stage="distill"))
    assert abs(metrics["train_divergence"]) < 1e-5 and metrics["eval_reverse_kl"] < 1e-5
    assert metrics["train_grad_norm"] < 1e-4
    before, after = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (base, out))
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_the_mini_student_preset_sits_between_test_and_tiny(world_tokenizer_dir):
    """docs/distill.md's student: with the demo tokenizer (tied embeddings) a few times smaller than the `tiny`
    teacher, several times larger than `test` (too small to learn the world's facts)."""
    from transformers import AutoTokenizer

    from lmforge.models.load import build_scratch_model, count_parameters

    tokenizer = AutoTokenizer.from_pretrained(world_tokenizer_dir)
    size = {p: count_parameters(build_scratch_model(p, tokenizer, seed=0))[0] for p in ("test", "mini", "tiny")}
    assert 3 * size["test"] < size["mini"] < size["tiny"] / 2, size


def test_a_pipeline_stage_names_its_teacher(tmp_path):
    from lmforge.pipeline.run import load_pipeline, stage_config

    def pipeline(teacher: str):
        path = tmp_path / f"{teacher}.yaml"
        stages = [{"name": "sft", "stage": "sft", "config": {"model": {"scratch": "test"}}},
                  {"name": "small", "stage": "sft", "config": {"model": {"scratch": "test"}}},
                  {"name": "distill", "stage": "distill", "from": "small", "teacher": teacher}]
        path.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "stages": stages}), encoding="utf-8")
        return load_pipeline(path)

    loaded = pipeline("sft")
    cfg = stage_config(loaded, loaded.stages[2])
    assert cfg.distill.teacher == str(tmp_path / "run" / "sft")
    assert cfg.model.name_or_path == str(tmp_path / "run" / "small")
    with pytest.raises(ConfigError, match="stage distill refers to 'later', which is not an earlier stage"):
        pipeline("later")
