"""Rollouts as groups of samples: merging the rollouts of several sampling rounds and keeping some of their
groups, for DAPO's dynamic sampling (Yu et al. 2025). A rollout is prompt-major (prompt 0's n samples, then
prompt 1's, ...), its prompts left-padded and its replies right-padded; rounds differ in both widths, so a
merge re-pads, and a selection trims the columns no kept row uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.config.schema_rl import RLConfig
from lmforge.generation import Sampling
from lmforge.losses.grpo_family import groups_with_signal, overlong_penalty, rows_of_groups
from lmforge.rollout.rewards import RewardSet, decode_rows
from lmforge.rollout.rollouts import RolloutEngine, Samples


def _left(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    return torch.cat([t.new_full((t.shape[0], width - t.shape[1]), fill), t], 1)


def _right(t: torch.Tensor, width: int, fill) -> torch.Tensor:
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), fill)], 1)


PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
"""[N, P] left-padded; every other [N, R] tensor field (replies, masks, log-probs) is right-padded."""


def merge_samples(parts: list[Samples], pad_id: int) -> Samples:
    """The rollouts of several rounds as one, in order, whatever `Samples` subclass they are (multi-turn
    trajectories carry more per-row fields); seconds add up. A tensor field is kept only when every round
    has it (the engine's log-probs)."""
    if len(parts) == 1:
        return parts[0]
    merged = {}
    for f in dataclasses.fields(parts[0]):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "seconds":
            merged[f.name] = sum(values)
        elif any(v is None for v in values):
            merged[f.name] = None
        elif isinstance(values[0], list):
            merged[f.name] = [x for v in values for x in v]
        elif values[0].dim() == 1:
            merged[f.name] = torch.cat(values)
        else:
            width = max(v.shape[1] for v in values)
            fill = pad_id if f.name in ("prompt_ids", "response_ids") else 0
            pad = _left if f.name in PROMPT_FIELDS else _right
            merged[f.name] = torch.cat([pad(v, width, fill) for v in values])
    return type(parts[0])(**merged)


def take_rows(samples: Samples, rows: torch.Tensor) -> Samples:
    """The samples at `rows`, in that order, with the prompt columns (left) and reply columns (right) that
    none of them uses cut off."""
    picked = rows.tolist()
    used = samples.prompt_mask[rows].any(0).nonzero()
    first = int(used[0]) if len(used) else samples.prompt_mask.shape[1]
    real = getattr(samples, "reply_attention", None)  # multi-turn: environment tokens are real too
    real = (samples.response_mask if real is None else real)[rows]
    columns = real.any(0).nonzero()
    width = int(columns[-1]) + 1 if len(columns) else 1
    taken = {}
    for f in dataclasses.fields(samples):
        value = getattr(samples, f.name)
        if value is None or f.name == "seconds":
            continue
        if isinstance(value, list):
            taken[f.name] = [value[i] for i in picked]
        elif value.dim() == 1:
            taken[f.name] = value[rows]
        else:
            taken[f.name] = value[rows][:, first:] if f.name in PROMPT_FIELDS else value[rows][:, :width]
    return dataclasses.replace(samples, **taken)


def pick_groups(signal: torch.Tensor, wanted: int) -> torch.Tensor:
    """Indices (ascending) of `wanted` groups: those with signal first, in order; when fewer have signal,
    the earliest groups without it fill the rest (their advantages are 0, so they add nothing to the
    policy gradient but keep the step's shape and its number of optimizer steps)."""
    with_signal = signal.nonzero().flatten()[:wanted]
    short = wanted - len(with_signal)
    fill = (~signal).nonzero().flatten()[:max(short, 0)]
    return torch.cat([with_signal, fill]).sort().values


@dataclass
class Scored:
    """A rollout with its rewards: `rows` holds each sample's prompt record (prompt-major, like `samples`)."""

    samples: Samples
    rows: list[dict]
    raw: torch.Tensor
    """[N] the rewards' weighted sum, before any shaping."""
    components: dict[str, torch.Tensor]


def score_rollout(rollouts: RolloutEngine, sampling: Sampling, rewards: RewardSet, rl: RLConfig,
                  rows: list[dict], prompt_ids: list[list[int]], logprobs: bool) -> Scored:
    """rl.num_generations replies to each prompt, scored by the run's rewards."""
    samples = rollouts.sample(prompt_ids, sampling, rl.max_new_tokens, rl.num_generations, logprobs=logprobs)
    per_sample = [r for r in rows for _ in range(rl.num_generations)]
    columns = decode_rows(per_sample)
    columns.update(response_lengths=samples.lengths.long().tolist(), stopped=samples.stopped.tolist())
    raw, components = rewards([r["prompt"] for r in per_sample], samples.texts, columns)
    return Scored(samples, per_sample, raw, components)


def merge_scored(parts: list[Scored], pad_id: int) -> Scored:
    if len(parts) == 1:
        return parts[0]
    return Scored(merge_samples([p.samples for p in parts], pad_id), [r for p in parts for r in p.rows],
                  torch.cat([p.raw for p in parts]),
                  {k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components})


def take_scored(scored: Scored, rows: torch.Tensor) -> Scored:
    picked = rows.tolist()
    return Scored(take_rows(scored.samples, rows), [scored.rows[i] for i in picked],
                  scored.raw[rows.to(scored.raw.device)],
                  {k: v[rows.to(v.device)] for k, v in scored.components.items()})


def signal_scores(scored: Scored, rl: RLConfig) -> torch.Tensor:
    """The scores whose spread within a group decides whether it teaches: the raw reward with the per-reply
    shaping (missing-EOS and soft overlong penalties). Batch normalisation and running scaling are affine over
    the whole rollout, so they never make equal scores differ or differing ones equal."""
    samples = scored.samples
    stopped = samples.stopped.to(scored.raw.device)
    penalty = overlong_penalty(samples.lengths, rl.max_new_tokens, rl.overlong_buffer, rl.overlong_penalty)
    return scored.raw.float() - rl.missing_eos_penalty * (~stopped).float() + penalty.to(scored.raw.device)


def any_process(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process: every process then samples the same number of rounds (a round
    gathers sharded parameters, a collective every process must join)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([int(flag)], device=accelerator.device)).max())


def collect_rollout(accelerator, score: Callable[[list[dict], list[list[int]], bool], Scored],
                    draw: Callable[[], tuple[list[dict], list[list[int]]]], rl: RLConfig, pad_id: int,
                    logprobs: bool) -> tuple[Scored, Scored, dict]:
    """(everything sampled, what is trained on, metrics); `score(rows, prompt_ids, logprobs)` samples and scores
    one round (`score_rollout`, or multi-turn `score_play`). Without rl.dynamic_sampling both are the one
    rollout of the next prompts. With it (DAPO), groups whose replies all scored the same are dropped and
    more prompts are drawn until as many groups as the first round had carry signal, for at most
    rl.max_sampling_rounds rounds; the kept groups are then cut to that number (topped up with dropped
    groups when too few differ, see `pick_groups`)."""
    parts = [score(*draw(), logprobs)]
    if not rl.dynamic_sampling:
        return parts[0], parts[0], {}
    wanted = len(parts[0].rows) // rl.num_generations
    while True:
        sampled = merge_scored(parts, pad_id)
        signal = groups_with_signal(signal_scores(sampled, rl), rl.num_generations).cpu()
        short = wanted - int(signal.sum())
        if len(parts) >= rl.max_sampling_rounds or not any_process(accelerator, short > 0):
            break
        parts.append(score(*draw(), logprobs))
    keep = torch.zeros_like(signal)
    keep[pick_groups(signal, wanted)] = True
    kept = take_scored(sampled, rows_of_groups(keep, rl.num_generations))
    metrics = {"sampling_rounds": len(parts), "groups_sampled": len(signal),
               "groups_dropped": int((~signal).sum()) - max(short, 0), "groups_short": max(short, 0)}
    return sampled, kept, metrics
