"""Multi-turn rollouts: the model and an environment take turns, as generation-engine sessions.

Each prompt is one session request of `n` samples (the prompt prefilled once); each sample plays its own
environment instance. After a model turn that ended with an end-of-turn token, the reply's text goes to
`env.step`; the messages it answers with are rendered to token ids by the chat template's continuation
(what the template prints after the model's end-of-turn token, the new messages, and the next generation
prompt) and appended to the session with `Engine.continue_session`, so the model's own tokens are never
decoded and re-tokenized: the trajectory is exactly the tokens the model saw. Only model-generated tokens
carry loss and KL (the reply mask marks them); environment tokens are context.

A trajectory ends when the environment says done, when a model turn hits its token limit (the environment
still scores that turn; `stopped` is then False), after `max_turns` model turns, or when the next turn would pass `max_total_tokens` tokens
after the prompt (model and environment tokens together).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lmforge.config.errors import ConfigError
from lmforge.data.templates import end_of_turn_markers, prepare_messages, render_template, reply_end
from lmforge.generation import Engine, Request, Sampling
from lmforge.rollout.environments import checked_reset, checked_step
from lmforge.rollout.generate import to_generation
from lmforge.rollout.groups import Scored
from lmforge.rollout.rewards import decode_rows
from lmforge.rollout.rollouts import Samples, left_pad
from lmforge.rollout.tools_sandbox import OUTCOMES

SENTINEL = "lmforge_reply_sentinel"
STEP_THREADS = 8
"""Environment steps run at once (tool processes waited on side by side), for environments that allow it."""


@dataclass
class Trajectories(Samples):
    """Samples whose replies interleave model and environment tokens: `response_mask` marks the model's
    (loss, KL), `reply_attention` every real token after the prompt."""

    reply_attention: torch.Tensor | None = None
    rewards: list[list[float]] = field(default_factory=list)
    """Per trajectory, the reward of each environment step."""
    transcripts: list[list[dict]] = field(default_factory=list)
    """Per trajectory, the conversation after the prompt (model replies as text, environment messages)."""
    turns: list[int] = field(default_factory=list)
    """Per trajectory, the model's turns."""
    outcomes: list[dict | None] = field(default_factory=list)
    """Per trajectory, how its tool calls ended ({kind: count}; None for an environment without tools)."""

    def model_inputs(self) -> dict:
        attention_mask = torch.cat([self.prompt_mask, self.reply_attention.long()], 1)
        input_ids = torch.cat([self.prompt_ids, self.response_ids], 1)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}


def continuation_ids(tokenizer, history: list[dict], new_messages: list[dict], tools: list | None = None) -> list[int]:
    """Token ids that follow a model reply's end-of-turn token when `new_messages` answer it and the model
    speaks next: rendered by the template (the text after the reply's end marker, the messages, the
    generation prompt), never including the reply itself. `history` is the conversation up to and
    without that reply (for templates whose rendering depends on earlier roles)."""
    probe = prepare_messages(tokenizer, [*history, {"role": "assistant", "content": SENTINEL}], tools)
    after_messages = prepare_messages(tokenizer, new_messages, tools)
    before = render_template(tokenizer, probe, False, tools)
    after = render_template(tokenizer, probe + after_messages, True, tools)
    if not after.startswith(before) or SENTINEL not in before:
        raise ConfigError("rl.environment: the chat template does not render the conversation as a growing "
                          "prefix, so environment turns cannot be appended as tokens; choose another template "
                          "with model.template")
    tail = before[before.rindex(SENTINEL):]
    cut = reply_end(tail, SENTINEL, end_of_turn_markers(tokenizer))
    text = (tail[cut:] if cut is not None else "") + after[len(before):]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class _Play:
    env: object
    history: list[dict]
    ids: list[int] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    transcript: list[dict] = field(default_factory=list)
    turns: int = 0
    stopped: bool = True
    room: int = 0
    """Tokens the trajectory may hold after its prompt: max_total_tokens within the engine's positions."""


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    """Per model turn."""
    max_turns: int
    max_total_tokens: int
    """After the prompt, model and environment tokens together."""


def play(engine: Engine, tokenizer, make_env: Callable, records: list[dict], sampling: Sampling, limits: Limits,
         n: int = 1, logprobs: bool = False) -> Trajectories:
    """`n` trajectories per record (prompt-major), each against a fresh environment."""
    started = time.perf_counter()
    if n > engine.slots:  # a group's samples are admitted together: more than the rows would never start
        raise ConfigError(f"rl.num_generations={n} needs {n} cache rows at once, but the rollout engine holds "
                          f"{engine.slots} (rl.rollout_rows, or the GPU memory left): lower rl.num_generations "
                          "or rl.max_total_tokens")
    plays, prompts, live = [], [], []
    for record in records:
        group = [_Play(make_env(), []) for _ in range(n)]
        firsts = [checked_reset(p.env, record) for p in group]
        if any(f != firsts[0] for f in firsts):
            raise ConfigError(f"rl.environment: {type(group[0].env).__name__}.reset gave different messages for "
                              "the same record; a group's samples must share their prompt")
        tools = getattr(group[0].env, "schemas", None) or None  # the template's tools= argument
        prompt = tokenizer(render_template(tokenizer, prepare_messages(tokenizer, firsts[0], tools), True, tools),
                           add_special_tokens=False)["input_ids"]
        room = min(limits.max_total_tokens, engine.max_len - len(prompt))
        if room < 1:
            raise ConfigError(f"rl.environment: a first turn of {len(prompt)} tokens leaves no room for a reply "
                              f"within the engine's {engine.max_len} positions; shorten the prompts")
        for p in group:
            p.history, p.room = list(firsts[0]), room
        limit = min(limits.max_new_tokens, room)
        handle = engine.submit(Request(prompt, dataclasses.replace(sampling, seed=_seed(sampling)), limit, n=n,
                                       logprobs=logprobs, tempered_logprobs=logprobs, session=True))
        plays += group
        prompts += [prompt] * n
        live.append((handle, [(i, p) for i, p in zip(range(n), group)]))
    while live:
        engine.step()
        finished = [item for item in live if item[0].done]
        live = [item for item in live if not item[0].done]
        for handle, members in finished:
            live += _advance(engine, tokenizer, handle, members, limits)
    return _layout(tokenizer, prompts, plays, time.perf_counter() - started)


def _seed(sampling: Sampling) -> int:
    return sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))


def _advance(engine: Engine, tokenizer, handle, members: list, limits: Limits) -> list:
    """Record each finished sample's turn, step its environment, and continue the sessions that go on (all
    continuations are posted before the handle's rows are released)."""
    going, replies = [], []
    for index, p in members:
        sample = handle.samples[index]
        reply = to_generation(tokenizer, sample.token_ids, sample.finish_reason)
        p.ids += sample.token_ids
        p.mask += [1.0] * len(sample.token_ids)
        p.logps += sample.logprobs if sample.logprobs is not None else [0.0] * len(sample.token_ids)
        p.turns += 1
        p.transcript.append({"role": "assistant", "content": reply.text})
        # A turn cut at its token limit is still scored (as a single-turn reply would be), then the episode ends.
        p.stopped = sample.finish_reason == "stop"
        replies.append(reply.text)
    outcomes = _steps([p.env for _, p in members], replies)
    for (index, p), text, (messages, reward, done) in zip(members, replies, outcomes):
        p.rewards.append(reward)
        p.transcript += messages
        if done or not p.stopped or p.turns >= limits.max_turns:
            continue
        extra = continuation_ids(tokenizer, p.history, messages, getattr(p.env, "schemas", None) or None)
        p.history += [{"role": "assistant", "content": text}, *messages]
        room = p.room - len(p.ids) - len(extra)
        if room < 1:
            continue
        p.ids += extra
        p.mask += [0.0] * len(extra)
        p.logps += [0.0] * len(extra)
        going.append((index, p, extra, min(limits.max_new_tokens, room)))
    continued = [(engine.continue_session(handle, extra, budget, sample=index), [(0, p)])
                 for index, p, extra, budget in going]
    engine.release(handle)
    return continued


def _steps(envs: list, replies: list[str]) -> list[tuple[list[dict], float, bool]]:
    """Each environment's `step` on its reply. Environments whose class sets `concurrent_steps = True` (the
    tool environment: its steps wait on tool processes) step on worker threads, so a group's tool calls run
    side by side instead of one after another; any other class steps here, in order."""
    if len(envs) < 2 or not all(getattr(env, "concurrent_steps", False) for env in envs):
        return [checked_step(env, reply) for env, reply in zip(envs, replies)]
    with ThreadPoolExecutor(max_workers=min(STEP_THREADS, len(envs))) as pool:
        return list(pool.map(checked_step, envs, replies))


def _layout(tokenizer, prompts: list[list[int]], plays: list[_Play], seconds: float) -> Trajectories:
    pad = tokenizer.pad_token_id
    width = max(1, max(len(p.ids) for p in plays))
    ids = torch.full((len(plays), width), pad, dtype=torch.long)
    mask, attention, logps = (torch.zeros(len(plays), width) for _ in range(3))
    for i, p in enumerate(plays):
        ids[i, :len(p.ids)] = torch.tensor(p.ids, dtype=torch.long)
        mask[i, :len(p.ids)] = torch.tensor(p.mask)
        attention[i, :len(p.ids)] = 1.0
        logps[i, :len(p.ids)] = torch.tensor(p.logps, dtype=torch.float32)
    prompt, prompt_mask = left_pad(prompts, pad)
    texts = [next((m["content"] for m in reversed(p.transcript) if m["role"] == "assistant"), "") for p in plays]
    return Trajectories(prompt, prompt_mask, ids, mask, texts, torch.tensor([p.stopped for p in plays]), seconds,
                        logps, reply_attention=attention, rewards=[p.rewards for p in plays],
                        transcripts=[p.transcript for p in plays], turns=[p.turns for p in plays],
                        outcomes=[_outcomes(p.env) for p in plays])


def _outcomes(env) -> dict | None:
    """{kind: count} of a tool environment's calls; None for an environment without tools."""
    calls = getattr(env, "outcomes", None)
    return None if calls is None else dict(Counter(o.kind for o in calls))


def play_metrics(out: Trajectories) -> dict:
    """Per-rollout means: model turns, environment reward; totals: tool calls by how they ended."""
    metrics = {"turns": sum(out.turns) / len(out.turns),
               "env_reward": sum(map(sum, out.rewards)) / len(out.rewards)}
    tools = [o for o in out.outcomes if o is not None]
    if tools:
        metrics.update({f"tool_calls/{kind}": sum(o.get(kind, 0) for o in tools) for kind in OUTCOMES})
    return metrics


def tools_overhead(tokenizer, make_env: Callable, messages: list[dict]) -> int:
    """Tokens the environment's tool schemas add to a first turn (the template prints them in its system
    turn): what the engine's cache must hold beyond the longest prompt."""
    tools = getattr(make_env(), "schemas", None)
    if not tools:
        return 0
    plain = render_template(tokenizer, prepare_messages(tokenizer, messages, None), True, None)
    with_tools = render_template(tokenizer, prepare_messages(tokenizer, messages, tools), True, tools)
    return max(0, len(tokenizer(with_tools, add_special_tokens=False)["input_ids"])
               - len(tokenizer(plain, add_special_tokens=False)["input_ids"]))


def score_play(rollouts, make_env: Callable, rewards, rl, sampling: Sampling, rows: list[dict],
               prompt_ids: list[list[int]], logprobs: bool) -> Scored:
    """rl.num_generations trajectories per record, scored: the environment's reward (summed over turns, times
    the `environment` reward's weight) plus any other rewards of rl.rewards on the last reply."""
    out = play(rollouts.get(), rollouts.tokenizer, make_env, rows, sampling,
               Limits(rl.max_new_tokens, rl.max_turns, rl.max_total_tokens), n=rl.num_generations, logprobs=logprobs)
    per_sample = [r for r in rows for _ in range(rl.num_generations)]
    env = torch.tensor([float(sum(r)) for r in out.rewards])
    weight = sum(spec.weight for spec in rl.reward_specs() if spec.kind == "environment")
    raw, components = weight * env, {"environment": env}
    if rewards is not None:
        columns = decode_rows(per_sample)
        columns.update(response_lengths=out.lengths.long().tolist(), stopped=out.stopped.tolist())
        more, parts = rewards([r["prompt"] for r in per_sample], out.texts, columns)
        raw, components = raw + more.cpu(), {**components, **parts}
    return Scored(out, per_sample, raw, components)


@torch.no_grad()
def evaluate_play(rollouts, make_env: Callable, rows: list[dict], rl) -> dict:
    """Held-out records played greedily: the environment's mean reward, turns, tool-call outcomes, length."""
    if not rows:
        return {}
    out = play(rollouts.get(), rollouts.tokenizer, make_env, rows, Sampling(temperature=0.0),
               Limits(rl.max_new_tokens, rl.max_turns, rl.max_total_tokens))
    metrics = play_metrics(out)
    return {"reward": metrics.pop("env_reward"), **metrics, "length": float(out.lengths.mean()),
            "stopped_rate": float(out.stopped.float().mean()),
            "sample": {"prompt": rows[0]["prompt"][-1]["content"], "transcript": out.transcripts[0]}}
