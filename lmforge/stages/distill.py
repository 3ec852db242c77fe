"""On-policy distillation (GKD, Agarwal et al. 2024; Thinking Machines' on-policy distillation note, 2025).

One iteration: the next `distill.prompts_per_step` prompts → replies sampled by the student through the run's one
generation engine (the RL stages' rollout plumbing, `RolloutEngine`) → the teacher scores every reply token →
one optimizer step on the per-token divergence between student and teacher (`lmforge/losses/distill.py`): by
default the reverse KL(student || teacher) over the whole vocabulary at each sampled token. A share
1 − `distill.lambda_on_policy` of the iterations trains on the data's own replies instead (GKD's mix; off-policy
iterations are spread evenly, not drawn at random, so the share is exact and a resumed run repeats it).
Held-out prompts are answered greedily before and after: exact match (the one grading rule) and the reverse KL to
the teacher on those replies; the teacher answers them once, so the run reports the gap it closes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from types import SimpleNamespace

import torch

from lmforge.config.errors import ConfigError
from lmforge.config.schema import DistillConfig, ModelConfig, StageConfig
from lmforge.data.build import error_at, load_splits
from lmforge.data.grading import exact_match
from lmforge.data.templates import encode_prompts, end_of_turn_ids, render_segments
from lmforge.generation import Sampling
from lmforge.loop.trainer import Trainer
from lmforge.losses.distill import distill_token_loss, generalized_jsd, reverse_kl, sampled_reverse_kl
from lmforge.models.load import load_model_and_tokenizer
from lmforge.models.reference import Reference
from lmforge.models.value import reply_logits
from lmforge.rollout.evaluate import answer_eval
from lmforge.rollout.gather import whole_parameters
from lmforge.rollout.rollouts import RolloutEngine, Samples, layout
from lmforge.stages.common import load_for_training, save_artifact, start_run
from lmforge.stages.online import (
    encode_rl_prompts,
    next_prompts,
    reference_logps,
    response_tokens,
    token_logps,
)


def load_teacher(cfg: StageConfig, tokenizer):
    """The teacher, frozen, in the student's dtype; refused in one line unless it shares the student's tokenizer
    (the loss compares the two distributions token id by token id)."""
    spec = ModelConfig(name_or_path=cfg.distill.teacher, dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code)
    teacher, teacher_tokenizer, _ = load_model_and_tokenizer(spec, seed=cfg.train.seed)
    check_same_vocabulary(tokenizer, teacher_tokenizer, cfg)
    teacher.config.use_cache = False
    return teacher.eval().requires_grad_(False)


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, cfg: StageConfig) -> None:
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student == teacher:
        return
    differ = sorted(set(student.items()) ^ set(teacher.items()), key=lambda kv: kv[1])
    token = differ[0][0]
    where = f"student {student.get(token)}, teacher {teacher.get(token)}"
    raise ConfigError(f"distill.teacher={cfg.distill.teacher}: its tokenizer differs from the student's "
                      f"(model.{'name_or_path' if cfg.model.name_or_path else 'tokenizer'}): {len(student)} vs "
                      f"{len(teacher)} tokens, {len(differ)} (token, id) pairs differ (e.g. {token!r}: {where}); "
                      "distillation compares token ids, so choose a teacher trained with the student's tokenizer")


def dataset_replies(tokenizer, rows, max_new_tokens: int) -> list[list[int]]:
    """Each prompt's reference reply as the template renders it after the prompt (with its end-of-turn token),
    cut to max_new_tokens: the off-policy replies. Every prompt must have one."""
    replies = []
    for row in rows:
        if not row["reference"].strip():
            raise error_at(row["source"], "distill.lambda_on_policy < 1 trains some iterations on the data's own "
                                          "replies, and this prompt has none: give every prompt a reply, or set "
                                          "distill.lambda_on_policy=1")
        try:
            segments = render_segments(tokenizer, [*row["prompt"], {"role": "assistant", "content": row["reference"]}])
        except ValueError as exc:
            raise error_at(row["source"], str(exc)) from None
        reply = [s for s in segments if s.is_assistant][-1].text
        replies.append(tokenizer.encode(reply, add_special_tokens=False)[:max_new_tokens])
    return replies


def on_policy(iteration: int, share: float) -> bool:
    """Whether iteration k (from 0) samples from the student: after n iterations floor(n·share) have (±1e-9 so
    0.3 × 10 counts as 3)."""
    return math.floor((iteration + 1) * share + 1e-9) > math.floor(iteration * share + 1e-9)


def shared_logits(student: torch.Tensor, teacher: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' logits over the tokenizer's ids: output layers padded past the tokenizer (to a multiple of 64,
    say) may differ in size between a small and a large model; the padding ids are never sampled."""
    if student.shape[-1] != teacher.shape[-1]:
        return student[..., :vocab], teacher[..., :vocab]
    return student, teacher


def distill_loss(model, batch: dict, teacher, d: DistillConfig, vocab: int):
    """(loss summed over reply tokens, their count, metrics) of one micro-batch."""
    width = batch["responses"].shape[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    logits = reply_logits(model, inputs, width)
    if d.estimator == "sampled":
        per_token = sampled_reverse_kl(token_logps(logits.float(), batch["responses"], d.temperature),
                                       batch["teacher_logps"])
    else:
        with torch.no_grad():
            teacher_logits = reply_logits(teacher, inputs, width)
        per_token = generalized_jsd(*shared_logits(logits, teacher_logits, vocab), d.beta, d.temperature)
    return distill_token_loss(per_token, batch["mask"])


def reference_batch(tokenizer, prompt_ids: list[list[int]], replies: list[list[int]]) -> Samples:
    """The data's replies laid out as the engine's samples are (a reply cut at max_new_tokens counts as unstopped)."""
    stops = set(end_of_turn_ids(tokenizer))
    full = [SimpleNamespace(token_ids=r, finish_reason="stop" if r and r[-1] in stops else "length") for r in replies]
    return layout(tokenizer, prompt_ids, full, 0.0, False)


@torch.no_grad()
def held_out(student, teacher, tokenizer, rollouts: RolloutEngine, rows: list[dict], prompt_ids: list[list[int]],
             d: DistillConfig, chunk: int) -> dict:
    """Greedy replies to held-out prompts: exact match with the reference, length, and the student's per-token
    reverse KL to the teacher on them (the divergence the stage lowers, measured on the student's own replies)."""
    if not rows:
        return {}
    samples = rollouts.sample(prompt_ids, Sampling(temperature=0.0), d.max_new_tokens)
    device = next(student.parameters()).device
    inputs = {k: v.to(device) for k, v in samples.model_inputs().items()}
    mask, width = samples.response_mask.to(device), samples.response_ids.shape[1]
    total = torch.zeros((), device=device)
    for start in range(0, len(rows), chunk):
        part = {k: v[start:start + chunk] for k, v in inputs.items()}
        kl = reverse_kl(*shared_logits(reply_logits(student, part, width), reply_logits(teacher, part, width),
                                       len(tokenizer)), d.temperature)
        total += torch.where(mask[start:start + chunk].bool(), kl, torch.zeros_like(kl)).sum()
    out = {"reverse_kl": float(total / mask.sum().clamp(min=1)), "length": float(samples.lengths.mean()),
           "stopped_rate": float(samples.stopped.float().mean())}
    if all(r["reference"].strip() for r in rows):
        out["exact_match"] = sum(exact_match(t, r["reference"]) for t, r in zip(samples.texts, rows)) / len(rows)
    out["sample"] = {"prompt": rows[0]["prompt"][-1]["content"], "reply": samples.texts[0]}
    return out


def teacher_answers(teacher, tokenizer, rows: list[dict], d: DistillConfig) -> dict:
    """The teacher's greedy exact match on the held-out prompts (what the student is distilled toward)."""
    if not rows or not all(r["reference"].strip() for r in rows):
        return {}
    result = answer_eval(teacher, tokenizer, [r["prompt"] for r in rows], [r["reference"] for r in rows],
                         d.max_new_tokens)
    return {"teacher_exact_match": result["exact_match"]}


def one_iteration(trainer, teacher, rollouts: RolloutEngine, tokenizer, d: DistillConfig, prompt_ids: list[list[int]],
                  replies: list[list[int]] | None) -> dict:
    """Sample (or take the data's replies when `replies` is given), score with the teacher where the estimator
    needs it up front, and take one optimizer step over micro-batches of train.batch_size."""
    device = trainer.accelerator.device
    started = time.perf_counter()
    if replies is None:
        with whole_parameters(trainer.prepared), trainer.accelerator.autocast():
            samples = rollouts.sample(prompt_ids, Sampling(temperature=d.temperature), d.max_new_tokens,
                                      d.num_generations)
    else:
        samples = reference_batch(tokenizer, prompt_ids, replies)
    sampled_at = time.perf_counter()
    batch = {**samples.model_inputs(), "responses": samples.response_ids, "mask": samples.response_mask}
    batch = {k: v.to(device) for k, v in batch.items()}
    size = trainer.cfg.batch_size
    if d.estimator == "sampled":  # one log-prob per token from the teacher, in chunks, before the step
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        batch["teacher_logps"] = torch.cat([
            reference_logps(Reference("copy", teacher), None, {k: v[i:i + size] for k, v in inputs.items()},
                            batch["responses"][i:i + size], d.temperature)
            for i in range(0, len(samples.texts), size)]) * batch["mask"]
    n = batch["responses"].shape[0]
    stats = trainer.step([{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)])
    total = max(time.perf_counter() - started, 1e-9)
    return {**stats, "on_policy": int(replies is None), "length": float(samples.lengths.mean()),
            "stopped_rate": float(samples.stopped.float().mean()), "samples_per_s": n / total,
            "time/generate_share": (sampled_at - started) / total}


def run(cfg: StageConfig) -> dict:
    run_, d = start_run(cfg), cfg.distill
    rollout = d.rollout()
    student, tokenizer, parent, _ = load_for_training(cfg)
    teacher = load_teacher(cfg, tokenizer)
    train_rows, eval_rows, fingerprint = load_splits(cfg.data, run_.errors, run_.cache_dir, kind="prompt")
    train_prompts = encode_rl_prompts(tokenizer, train_rows, dataclasses.replace(cfg, rl=rollout))
    replies = dataset_replies(tokenizer, train_rows, d.max_new_tokens) if d.lambda_on_policy < 1 else None
    eval_set = list(eval_rows.select(range(min(d.eval_prompts, len(eval_rows))))) if eval_rows else []
    eval_prompts = encode_prompts(tokenizer, [r["prompt"] for r in eval_set])
    iterations = cfg.train.max_steps if cfg.train.max_steps > 0 else \
        math.ceil(cfg.train.epochs * len(train_prompts) / d.prompts_per_step)
    vocab = len(tokenizer)
    trainer = Trainer(student, train_rows, None, lambda m, b: distill_loss(m, b, teacher, d, vocab),
                      dataclasses.replace(cfg.train, max_steps=iterations), cfg.log, perplexity=False,
                      count_fn=response_tokens)
    teacher.to(trainer.accelerator.device)
    trainer.resume_if_asked()
    state = trainer.state
    unwrapped = trainer.accelerator.unwrap_model(trainer.prepared)
    rollouts = RolloutEngine(unwrapped, tokenizer, d.prompts_per_step * d.num_generations,
                             max(map(len, train_prompts + eval_prompts)), d.max_new_tokens, d.backend,
                             compile=cfg.train.compile or None)

    def evaluate() -> dict:
        with whole_parameters(trainer.prepared):
            return held_out(unwrapped, teacher, tokenizer, rollouts, eval_set, eval_prompts, d, cfg.train.batch_size)

    if state.step == 0:  # kept in every checkpoint: a resumed run reports them too
        state.extra["initial_metrics"] = {**evaluate(), **teacher_answers(teacher, tokenizer, eval_set, d)}
        trainer.log({f"eval_{k}": v for k, v in state.extra["initial_metrics"].items()})
    with trainer.preemption as preemption:
        last = train_iterations(trainer, teacher, rollouts, tokenizer, d, rollout, train_prompts, replies, iterations,
                                evaluate, preemption)
        trainer.finish_training(last)  # from here a SIGTERM loses nothing: the final checkpoint is written
        after = evaluate()
        trainer.log({f"eval_{k}": v for k, v in after.items()})
        metrics = summary(state.extra.get("last_train_metrics", {}), after, state.extra.get("initial_metrics", {}))
        metrics["iterations"] = iterations
        save_artifact(run_, trainer, tokenizer, parent, fingerprint, metrics, model=unwrapped)
    return metrics


def train_iterations(trainer, teacher, rollouts, tokenizer, d: DistillConfig, rollout, train_prompts, replies,
                     iterations: int, evaluate, preemption) -> dict:
    """The iterations left (a resumed run continues its count, prompt order and on/off-policy schedule)."""
    state, cfg = trainer.state, trainer.cfg
    last: dict = {}
    while state.extra.get("iteration", 0) < iterations:
        done = state.extra.get("iteration", 0)
        chosen = next_prompts(state, len(train_prompts), rollout, cfg.seed, trainer.accelerator)
        own = on_policy(done, d.lambda_on_policy) or replies is None
        last = one_iteration(trainer, teacher, rollouts, tokenizer, d, [train_prompts[i] for i in chosen],
                             None if own else [replies[i] for i in chosen])
        state.extra = {**state.extra, "iteration": done + 1}
        if (done + 1) % cfg.logging_steps == 0 or done + 1 == iterations:
            trainer.log({"iteration": done + 1, **last})
        if cfg.eval_steps and (done + 1) % cfg.eval_steps == 0 and done + 1 < iterations:
            trainer.log({f"eval_{k}": v for k, v in evaluate().items()})
        if cfg.save_steps and (done + 1) % cfg.save_steps == 0:
            trainer.save_checkpoint()
        if preemption.stop_now(trainer.accelerator):  # SIGTERM: save at this iteration's end, exit 143
            trainer.stop_for_preemption()
    return last


def summary(last: dict, after: dict, before: dict) -> dict:
    """The stage's metrics; `eval_gap_closed`: the share of the student's exact-match gap to the teacher that
    the run closed, (after − before) / (teacher − before), when the teacher was ahead."""
    metrics = {**{f"train_{k}": v for k, v in last.items()}, **{f"eval_{k}": v for k, v in after.items()},
               **{f"initial_eval_{k}": v for k, v in before.items()}}
    teacher = before.get("teacher_exact_match")
    if teacher is not None and "exact_match" in after and teacher > before.get("exact_match", teacher):
        metrics["eval_teacher_exact_match"] = teacher
        metrics["eval_gap_closed"] = (after["exact_match"] - before["exact_match"]) / (teacher - before["exact_match"])
    return metrics
