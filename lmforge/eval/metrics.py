"""Evaluation measurements, each a function of models and already-read records.

Perplexity of held-out text; greedy answers against references; a reward model's pairwise
accuracy; the reward of a policy's replies and its KL to a reference; the win-rate of one model's
replies over another's, judged by a reward model and, where records carry an answer, by ground truth.
"""

from __future__ import annotations

import math

import torch

from lmforge.data import grading
from lmforge.data.packing import pack_stream
from lmforge.data.templates import encode_prompts
from lmforge.data.tokenize import encode_text
from lmforge.generation import Sampling
from lmforge.losses.lm import causal_lm_loss
from lmforge.losses.rl import gather_logps
from lmforge.models.value import reply_logits
from lmforge.rollout.rewards import answer_match, decode_rows, exact_match
from lmforge.rollout.rollouts import RolloutEngine, Samples
from lmforge.rollout.score import score_responses


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], block_size: int, batch_size: int = 8,
               max_tokens: int | None = None) -> dict:
    """exp(mean next-token loss) over the texts packed into blocks, as the PT stage measures it;
    the first `max_tokens` tokens only, when given."""
    rows = list(pack_stream((encode_text(tokenizer, t) for t in texts), block_size))
    if max_tokens:
        rows = rows[:max(1, max_tokens // block_size)]
    if not rows:
        return {}
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    try:
        full = [r for r in rows if len(r["input_ids"]) == block_size]
        chunks = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
        chunks += [[r] for r in rows if len(r["input_ids"]) != block_size]  # the short last block
        for chunk in chunks:
            ids = torch.tensor([r["input_ids"] for r in chunk], device=_device(model))
            positions = torch.tensor([r["position_ids"] for r in chunk], device=_device(model))
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            labels = torch.tensor([r["labels"] for r in chunk], device=_device(model))
            total, count = causal_lm_loss(logits.float(), labels)
            loss_sum, tokens = loss_sum + float(total), tokens + int(count)
    finally:
        model.train(was_training)
    mean = loss_sum / max(tokens, 1)
    return {"perplexity": math.exp(min(mean, 50.0)), "eval_tokens": tokens}


def replies(model, tokenizer, records: list[dict], max_new_tokens: int, temperature: float = 0.0,
            rows: int = 64) -> Samples:
    """The model's replies to each record's prompt from the generation engine (greedy by default)."""
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in records])
    engine = RolloutEngine(model, tokenizer, min(rows, len(prompt_ids)), max(map(len, prompt_ids)), max_new_tokens)
    return engine.sample(prompt_ids, Sampling(temperature=temperature), max_new_tokens)


def greedy_replies(model, tokenizer, records: list[dict], max_new_tokens: int, batch_size: int = 64) -> Samples:
    return replies(model, tokenizer, records, max_new_tokens, rows=batch_size)


def answer_metrics(records: list[dict], replies: Samples) -> dict:
    """Exact match with the reference reply, and `contains`: the short answer (or the reference)
    stated in the reply without any of the record's distractors."""
    prompts = [r["prompt"] for r in records]
    columns = decode_rows(records)
    out = {"stopped_rate": float(replies.stopped.float().mean()), "length": float(replies.lengths.mean())}
    if all(grading.normalise(r["reference"]) for r in records):
        out["exact_match"] = sum(exact_match(prompts, replies.texts, columns)) / len(records)
    if all(grading.final_answer(r["answer"] or r["reference"]) for r in records):
        out["contains"] = sum(answer_match(prompts, replies.texts, columns)) / len(records)
    return out


def ground_truth(records: list[dict], texts: list[str]) -> list[float] | None:
    """1 where a reply states the record's answer, or None when the records carry no answers."""
    if not all(grading.final_answer(r["answer"]) for r in records):
        return None
    return answer_match([r["prompt"] for r in records], texts, decode_rows(records))


@torch.no_grad()
def rm_accuracy(reward_model, tokenizer, pairs: list[dict], max_length: int = 1024) -> dict:
    """Share of pairs whose chosen reply the reward model scores above the rejected one (ties half)."""
    prompts = [p["prompt"] for p in pairs]
    chosen = score_responses(reward_model, tokenizer, prompts, [p["chosen"] for p in pairs], max_length)
    rejected = score_responses(reward_model, tokenizer, prompts, [p["rejected"] for p in pairs], max_length)
    right = sum((c > r) + 0.5 * (c == r) for c, r in zip(chosen, rejected))
    return {"rm_accuracy": right / len(pairs),
            "rm_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)}


@torch.no_grad()
def kl_to_reference(policy, reference, tokenizer, records: list[dict], max_new_tokens: int, seed: int) -> dict:
    """KL(policy ‖ reference) per reply: the mean over replies *sampled from the policy* (temperature 1)
    of Σ_t log π(y_t) − log π_ref(y_t), an unbiased estimate of the sequence-level KL."""
    torch.manual_seed(seed)  # each prompt's sampling seed is drawn from torch's generator
    samples = replies(policy, tokenizer, records, max_new_tokens, temperature=1.0)
    inputs = {k: v.to(_device(policy)) for k, v in samples.model_inputs().items()}
    responses = samples.response_ids.to(_device(policy))
    mask = samples.response_mask.to(_device(policy))
    width = responses.shape[1]
    was_training = policy.training
    policy.eval()
    try:
        own = gather_logps(reply_logits(policy, inputs, width).float(), responses)
        ref_inputs = {k: v.to(_device(reference)) for k, v in inputs.items()}
        ref = gather_logps(reply_logits(reference, ref_inputs, width).float(), responses.to(_device(reference)))
    finally:
        policy.train(was_training)
    per_reply = ((own - ref.to(own.device)) * mask).sum(-1)
    return {"kl": float(per_reply.mean())}


def win_rate(scores: list[float], baseline_scores: list[float], prefix: str = "") -> dict:
    """Wins, ties and losses of one model's replies over the baseline's; a tie counts half."""
    wins = sum(a > b for a, b in zip(scores, baseline_scores))
    ties = sum(a == b for a, b in zip(scores, baseline_scores))
    n = len(scores)
    return {f"{prefix}win_rate": (wins + 0.5 * ties) / n, f"{prefix}wins": wins, f"{prefix}ties": ties,
            f"{prefix}losses": n - wins - ties}


def reward_of(judge, tokenizer, records: list[dict], texts: list[str]) -> list[float]:
    return score_responses(judge, tokenizer, [r["prompt"] for r in records], texts)
