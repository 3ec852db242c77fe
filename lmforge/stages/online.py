"""Online RL, the part PPO, GRPO and RLOO share.

One iteration: the next prompts → replies sampled by the run's generation engine (each prompt one request
of rl.num_generations samples sharing its prefix; with fp32 numerics the engine also returns each token's
log-prob, the "old" log-probs; with rl.environment, multi-turn trajectories played against an environment
as engine sessions; with rl.dynamic_sampling, more prompts until enough groups differ) → rewards (reward
models, built-ins, user functions, the environment's) shaped by the config →
in inference mode, each reply token's log-prob under the reference, under the policy where the engine's
are not exact, and (PPO) its value → the algorithm's advantages → a few epochs of minibatches, each one
optimizer step of the shared training loop (`Trainer.step`).
Held-out prompts are answered greedily before training, every `train.eval_steps` iterations and
at the end: mean reward, exact match with the reference answer, length, KL to the reference.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from lmforge.config.schema import RLConfig, StageConfig
from lmforge.data import grading
from lmforge.data.build import error_at, load_splits
from lmforge.data.templates import encode_prompts
from lmforge.generation import Sampling
from lmforge.loop.summary import rl_plan_lines
from lmforge.loop.trainer import Trainer, epoch_batches
from lmforge.losses.rl import AdaptiveKLController, FixedKLController, gather_logps, kl_per_token
from lmforge.models.reference import Reference, reference_kind
from lmforge.models.value import PolicyWithValue, critic_values, reply_logits
from lmforge.rollout.environments import load_environment
from lmforge.rollout.gather import whole_parameters
from lmforge.rollout.groups import collect_rollout, score_rollout
from lmforge.rollout.multiturn import Trajectories, evaluate_play, play_metrics, score_play, tools_overhead
from lmforge.rollout.rewards import RewardSet, decode_rows, exact_match
from lmforge.rollout.rollouts import RolloutEngine
from lmforge.rollout.tools_sandbox import ToolLimits
from lmforge.stages.common import load_for_training, save_artifact, start_run
from lmforge.stages.critic import load_critic


@dataclass
class Algorithm:
    name: str
    uses_critic: bool
    advantages: Callable
    """(batch, cfg, kl_coef) -> (advantages [N, R], returns [N, R] or None, metrics)."""
    loss: Callable
    """(model, micro_batch, cfg) -> (loss sum, its count, metrics)."""
    count: Callable | None = None
    """(micro_batch, cfg) -> what the loss's sum is a sum over (GRPO/RLOO: replies, micro-batches or tokens,
    as rl.loss_type says), counted before the forward pass so a step's micro-batches share one normaliser;
    None: reply tokens."""


def response_tokens(batch: dict) -> torch.Tensor:
    return batch["mask"].sum()


response_tokens.metric_name = "reply_tokens"


def step_count(algo: Algorithm, rl: RLConfig) -> Callable[[dict], torch.Tensor]:
    """The training loop's normaliser of a micro-batch: the algorithm's own count, else its reply tokens."""
    if algo.count is None:
        return response_tokens

    def count(batch: dict) -> torch.Tensor:
        return algo.count(batch, rl)

    count.metric_name = "loss_count"  # replies or micro-batches under some loss types: not tokens
    return count


def token_logps(logits: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled tokens under the distribution they were sampled from (logits / T)."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return gather_logps(logits, responses)


def reply_outputs(model, batch: dict, rl: RLConfig):
    """(logits, values or None, per-token log-probs) of the policy on a micro-batch's replies."""
    logits, values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                           width=batch["responses"].shape[1])
    return logits, values, token_logps(logits.float(), batch["responses"], rl.temperature)


def run_online(cfg: StageConfig, algo: Algorithm) -> dict:
    run_, rl = start_run(cfg), cfg.rl
    # Kept even when the KL costs nothing (kl_coef 0): the KL it measures is how a run shows drift and reward hacking.
    kind = reference_kind(cfg.rl.reference, cfg.model, cfg.lora)
    policy, tokenizer, parent, frozen = load_for_training(cfg, frozen_copy=kind == "copy")
    separate_critic = algo.uses_critic and rl.critic == "separate"
    critic = load_critic(cfg, next(policy.parameters()).dtype, len(tokenizer)) if separate_critic else None
    model = PolicyWithValue(policy, critic, shared_value_head=algo.uses_critic and rl.critic == "shared")
    reference = Reference(kind, frozen) if kind else None

    train_rows, eval_rows, fingerprint = load_splits(cfg.data, run_.errors, run_.cache_dir, kind="prompt")
    train_prompts = encode_rl_prompts(tokenizer, train_rows, cfg)
    eval_set = list(eval_rows.select(range(min(rl.eval_prompts, len(eval_rows))))) if eval_rows else []
    eval_prompts = encode_prompts(tokenizer, [r["prompt"] for r in eval_set])
    iterations = cfg.train.max_steps if cfg.train.max_steps > 0 else \
        math.ceil(cfg.train.epochs * len(train_prompts) / rl.prompts_per_step)
    samples_per_step = rl.minibatch_size or rl.prompts_per_step * rl.num_generations
    steps_per_iteration = rl.ppo_epochs * math.ceil(rl.prompts_per_step * rl.num_generations / samples_per_step)
    train_cfg = dataclasses.replace(cfg.train, max_steps=iterations * steps_per_iteration)
    trainer = Trainer(model, train_rows, None, lambda m, b: algo.loss(m, b, rl), train_cfg, cfg.log,
                      perplexity=False, count_fn=step_count(algo, rl))
    if trainer.accelerator.is_main_process:  # the plan before step 1, as offline stages say theirs
        for line in rl_plan_lines(tokenizer, train_prompts, len(eval_set), rl, iterations, steps_per_iteration,
                                  samples_per_step):
            trainer.accelerator.print(line)
    device = trainer.accelerator.device
    if reference is not None:
        reference.to(device)
    specs = [spec for spec in rl.reward_specs() if spec.kind != "environment"]  # the environment pays that one
    rewards = RewardSet(specs, device=device) if specs else None
    make_env = load_environment(rl.environment, tools=rl.tools, limits=tool_limits(rl),
                                args={"call_reward": rl.tool_call_reward} if rl.environment == "tools" else None) \
        if rl.environment else None
    sampling = Sampling(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k)
    kl_ctl = AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon) if rl.kl_target > 0 \
        else FixedKLController(rl.kl_coef)

    trainer.resume_if_asked()
    state = trainer.state
    if "kl" in state.extra:
        kl_ctl.load_state_dict(state.extra["kl"])
    unwrapped = trainer.accelerator.unwrap_model(trainer.prepared)
    # One engine for the whole run (rollouts and held-out replies): its cache holds a rollout's rows.
    # A multi-turn trajectory holds every turn after the prompt in the engine's cache.
    longest = max(map(len, train_prompts + eval_prompts))
    if make_env:
        longest += tools_overhead(tokenizer, make_env, train_rows[0]["prompt"])
    rollouts = RolloutEngine(unwrapped.policy, tokenizer, rl.prompts_per_step * rl.num_generations, longest,
                             rl.max_total_tokens if make_env else rl.max_new_tokens, rl.backend,
                             max_rows=rl.rollout_rows, compile=cfg.train.compile or None)
    exact = engine_logps_are_exact(unwrapped.policy, trainer.accelerator)
    score = partial(score_play, rollouts, make_env, rewards, rl, sampling) if make_env \
        else partial(score_rollout, rollouts, sampling, rewards, rl)

    def evaluate() -> dict:
        with whole_parameters(trainer.prepared):
            if make_env:
                return evaluate_play(rollouts, make_env, eval_set, rl)
            return evaluate_policy(unwrapped.policy, tokenizer, rollouts, eval_set, eval_prompts, rewards,
                                   reference, rl)

    def draw() -> tuple[list[dict], list[list[int]]]:
        """The next prompts (records and token ids); dynamic sampling may draw several times an iteration."""
        prompts = next_prompts(state, len(train_prompts), rl, cfg.train.seed, trainer.accelerator)
        return [train_rows[i] for i in prompts], [train_prompts[i] for i in prompts]

    if state.step == 0:  # kept in every checkpoint: a resumed run reports them too
        state.extra["initial_metrics"] = evaluate()
        trainer.log({f"eval_{k}": v for k, v in state.extra["initial_metrics"].items()})
    before = state.extra.get("initial_metrics", {})
    last: dict = {}
    with trainer.preemption as preemption:
        while state.extra.get("iteration", 0) < iterations:
            last = one_iteration(trainer, unwrapped, score, reference, kl_ctl, algo, rl, draw, samples_per_step,
                                 engine_logps=exact, pad_id=tokenizer.pad_token_id)
            state.extra = {**state.extra, "iteration": state.extra.get("iteration", 0) + 1, "kl": kl_ctl.state_dict()}
            done = state.extra["iteration"]
            if done % cfg.train.logging_steps == 0 or done == iterations:
                trainer.log({"iteration": done, **last})
            if cfg.train.eval_steps and done % cfg.train.eval_steps == 0 and done < iterations:
                trainer.log({f"eval_{k}": v for k, v in evaluate().items()})
            if cfg.train.save_steps and done % cfg.train.save_steps == 0:
                trainer.save_checkpoint()
            if preemption.stop_now(trainer.accelerator):  # SIGTERM: save at this iteration's end, exit 143
                trainer.stop_for_preemption()
        trainer.finish_training(last)  # from here a SIGTERM loses nothing: the final checkpoint is written
        last = state.extra.get("last_train_metrics", {})
        after = evaluate()
        trainer.log({f"eval_{k}": v for k, v in after.items()})
        metrics = {**{f"train_{k}": v for k, v in last.items()}, **{f"eval_{k}": v for k, v in after.items()},
                   **{f"initial_eval_{k}": v for k, v in before.items()}, "iterations": iterations}
        save_artifact(run_, trainer, tokenizer, parent, fingerprint, metrics, model=unwrapped.policy)
    return metrics


def tool_limits(rl: RLConfig) -> ToolLimits:
    return ToolLimits(seconds=rl.tool_timeout, memory_mb=rl.tool_memory_mb, output_chars=rl.tool_output_chars)


def encode_rl_prompts(tokenizer, rows, cfg: StageConfig) -> list[list[int]]:
    """Token ids of each prompt; a prompt leaving no room for the reply within data.max_length is an error."""
    encoded = encode_prompts(tokenizer, rows["prompt"])
    room = cfg.data.max_length - cfg.rl.max_new_tokens
    too_long = [(row["source"], len(ids)) for row, ids in zip(rows, encoded) if len(ids) > room]
    if too_long:
        source, n = too_long[0]
        raise error_at(source, f"prompt of {n} tokens leaves no room for rl.max_new_tokens={cfg.rl.max_new_tokens} "
                               f"within data.max_length={cfg.data.max_length} ({len(too_long)} prompts like it); "
                               "raise data.max_length or shorten the prompts")
    return encoded


def next_prompts(state, n_prompts: int, rl: RLConfig, seed: int, accelerator) -> list[int]:
    """The next prompts of a seeded epoch order (a resumed run continues it); this process's share."""
    batches = epoch_batches(n_prompts, rl.prompts_per_step, seed, state.epoch)
    chosen = batches[state.batch_in_epoch]
    state.batch_in_epoch += 1
    if state.batch_in_epoch >= len(batches):
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    world, rank = accelerator.num_processes, accelerator.process_index
    return chosen[rank::world] if len(chosen) >= world else chosen


def engine_logps_are_exact(policy, accelerator) -> bool:
    """Whether the engine's log-probs equal a teacher-forced forward pass (to ~1e-6): fp32 weights, no mixed
    precision, and on a GPU no TF32 matmuls. Then they are the rollout's old log-probs; otherwise (bf16, say)
    the two passes' kernels round differently, and the old log-probs are recomputed by the training pass's
    own numerics so the first importance ratio is exactly 1."""
    fp32 = all(p.dtype == torch.float32 for p in policy.parameters() if p.is_floating_point())
    tf32 = accelerator.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return fp32 and str(accelerator.mixed_precision) == "no" and not tf32


def one_iteration(trainer, model: PolicyWithValue, score: Callable, reference, kl_ctl, algo: Algorithm,
                  rl: RLConfig, draw: Callable[[], tuple[list[dict], list[list[int]]]], samples_per_step: int,
                  engine_logps: bool = False, pad_id: int = 0) -> dict:
    """One rollout (of one or, with dynamic sampling, several sampling rounds; single- or multi-turn, as
    `score` samples them) and its optimizer steps."""
    device = trainer.accelerator.device
    started = time.perf_counter()
    on_policy = on_policy_step(algo, rl, rl.prompts_per_step * rl.num_generations, samples_per_step, reference)
    engine_logps = engine_logps and not on_policy  # an on-policy step takes its own (detached) log-probs
    with whole_parameters(trainer.prepared), trainer.accelerator.autocast():
        sampled, kept, sampling_metrics = collect_rollout(trainer.accelerator, score, draw, rl, pad_id,
                                                          engine_logps)
    if isinstance(sampled.samples, Trajectories):
        sampling_metrics.update(play_metrics(sampled.samples))
    samples = kept.samples
    batch = {**samples.model_inputs(), "responses": samples.response_ids, "mask": samples.response_mask,
             "stopped": samples.stopped}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["scores"] = shape_scores(kept.raw.to(device), batch["stopped"], rl, trainer.state.extra)
    inferred_at = time.perf_counter()
    if samples.logps is not None:
        batch["old_logps"] = samples.logps.to(device) * batch["mask"]
    batch.update(rollout_views(model, batch, reference, rl, trainer.cfg.batch_size,
                               old_logps=not on_policy and samples.logps is None))
    advantages_at = time.perf_counter()
    # The advantages may drop rows from batch["mask"] (rl.mask_truncated): so from the loss, its count and the KL.
    batch["advantages"], batch["returns"], adv_metrics = algo.advantages(batch, rl, kl_ctl.coef)
    stats = _optimise(trainer, batch, rl, samples_per_step)
    seq_kl = torch.tensor(0.0)
    if "ref_logps" in batch:
        per_reply = (kl_per_token(batch["old_logps"], batch["ref_logps"], "k1") * batch["mask"]).sum(-1)
        seq_kl = per_reply.sum() / (batch["mask"].sum(-1) > 0).sum().clamp(min=1)
    kl_ctl.update(float(seq_kl), len(samples.texts))
    ended = time.perf_counter()
    total = max(ended - started, 1e-9)
    drawn = sampled.samples
    return {
        **stats, **adv_metrics, **sampling_metrics,
        "reward": float(sampled.raw.mean()), **{f"reward/{k}": float(v.mean()) for k, v in sampled.components.items()},
        "score": float(batch["scores"].mean()), "kl": float(seq_kl), "kl_coef": kl_ctl.coef,
        "length": float(drawn.lengths.mean()), "stopped_rate": float(drawn.stopped.float().mean()),
        "time/generate_share": drawn.seconds / total,
        "time/score_share": (inferred_at - started - drawn.seconds) / total,
        "time/inference_share": (advantages_at - inferred_at) / total,
        "time/train_share": (ended - advantages_at) / total, "samples_per_s": len(drawn.texts) / total,
    }


def shape_scores(raw: torch.Tensor, stopped: torch.Tensor, rl: RLConfig, extra: dict) -> torch.Tensor:
    """Reward as the optimiser sees it: missing-EOS penalty, then normalisation, then clipping."""
    scores = raw.float() - rl.missing_eos_penalty * (~stopped).float()
    if rl.reward_norm == "batch" and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    elif rl.reward_norm == "running":
        count, mean, m2 = extra.get("reward_stats", (0, 0.0, 0.0))
        for value in scores.tolist():  # Welford: a running variance without keeping every reward
            count += 1
            delta = value - mean
            mean += delta / count
            m2 += delta * (value - mean)
        extra["reward_stats"] = (count, mean, m2)
        scores = scores / (math.sqrt(m2 / max(count - 1, 1)) + 1e-8)
    if rl.reward_clip > 0:
        scores = scores.clamp(-rl.reward_clip, rl.reward_clip)
    return scores


def on_policy_step(algo: Algorithm, rl: RLConfig, n: int, samples_per_step: int, reference) -> bool:
    """One optimizer step on the whole rollout by the weights that sampled it (GRPO/RLOO with
    rl.ppo_epochs=1): the "old" log-probs are the training pass's own, detached, so the separate
    inference pass that would compute them is skipped. The KL metric needs them beside the reference."""
    return not algo.uses_critic and rl.ppo_epochs == 1 and samples_per_step >= n and reference is None


@torch.no_grad()
def rollout_views(model: PolicyWithValue, batch: dict, reference, rl: RLConfig, chunk: int,
                  old_logps: bool = True) -> dict:
    """Old log-probs, reference log-probs and values of every reply token, in chunks, no gradients."""
    if not (old_logps or reference is not None or model.has_values):
        return {}
    width = batch["responses"].shape[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    was_training = model.training
    model.eval()
    parts: dict[str, list] = {"old_logps": [], "ref_logps": [], "old_values": []}
    try:
        for start in range(0, batch["responses"].shape[0], chunk):
            part = {k: v[start:start + chunk] for k, v in inputs.items()}
            responses = batch["responses"][start:start + chunk]
            values = None
            if old_logps or model.value_head is not None:  # a shared value head needs the policy's pass
                logits, values = model(**part, width=width)
                if old_logps:
                    parts["old_logps"].append(token_logps(logits.float(), responses, rl.temperature))
            elif model.critic is not None:  # the old log-probs came from the engine: the critic alone
                values = critic_values(model.critic, part, width)
            if values is not None:
                parts["old_values"].append(values.float())
            if reference is not None:
                parts["ref_logps"].append(reference_logps(reference, model.policy, part, responses, rl.temperature))
    finally:
        model.train(was_training)
    return {k: torch.cat(v) * batch["mask"] for k, v in parts.items() if v}


def reference_logps(reference, policy, inputs: dict, responses: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token log-probs of `responses` under the reference (the frozen copy, or the adapter-off policy)."""
    with reference.model(policy) as model:
        logits = reply_logits(model, inputs, responses.shape[1])
    return token_logps(logits.float(), responses, temperature)


def _optimise(trainer, batch: dict, rl: RLConfig, samples_per_step: int) -> dict:
    """rl.ppo_epochs passes of minibatches over the rollout; stops early past rl.target_approx_kl."""
    n = batch["responses"].shape[0]
    keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[:1] == (n,)]
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(rl.ppo_epochs):
        order = torch.randperm(n).tolist()
        for start in range(0, n, samples_per_step):
            picked = order[start:start + samples_per_step]
            micro = [{k: batch[k][picked[i:i + trainer.cfg.batch_size]] for k in keys}
                     for i in range(0, len(picked), trainer.cfg.batch_size)]
            out = trainer.step(micro)
            # Reply tokens that carry loss, whatever the loss's normaliser counts (replies, micro-batches).
            out.setdefault("reply_tokens", float(batch["mask"][picked].sum()))
            steps += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if rl.target_approx_kl and out.get("approx_kl", 0.0) > rl.target_approx_kl:
                return {**{k: v / steps for k, v in sums.items()}, "optimizer_steps": steps, "early_stopped": 1}
    return {**{k: v / steps for k, v in sums.items()}, "optimizer_steps": steps, "early_stopped": 0}


@torch.no_grad()
def evaluate_policy(policy, tokenizer, rollouts: RolloutEngine, rows: list[dict], prompt_ids: list[list[int]],
                    rewards: RewardSet, reference, rl: RLConfig) -> dict:
    """Greedy replies to held-out prompts: reward, exact match with the reference, length, KL."""
    if not rows:
        return {}
    prompts = [r["prompt"] for r in rows]
    samples = rollouts.sample(prompt_ids, Sampling(temperature=0.0), rl.max_new_tokens)
    columns = decode_rows(rows)
    columns.update(response_lengths=samples.lengths.long().tolist(), stopped=samples.stopped.tolist())
    total, components = rewards(prompts, samples.texts, columns)
    out = {"reward": float(total.mean()), **{f"reward/{k}": float(v.mean()) for k, v in components.items()},
           "length": float(samples.lengths.mean()), "stopped_rate": float(samples.stopped.float().mean())}
    if all(grading.normalise(r["reference"]) for r in rows):
        out["exact_match"] = sum(exact_match(prompts, samples.texts, columns)) / len(rows)
    if reference is not None:
        device = next(policy.parameters()).device
        inputs = {k: v.to(device) for k, v in samples.model_inputs().items()}
        responses, mask = samples.response_ids.to(device), samples.response_mask.to(device)
        logps = gather_logps(reply_logits(policy, inputs, responses.shape[1]).float(), responses)
        ref = reference_logps(reference, policy, inputs, responses, temperature=0.0)
        out["kl"] = float(((logps - ref) * mask).sum(-1).mean())
    out["sample"] = {"prompt": prompts[0][-1]["content"], "reply": samples.texts[0]}
    return out
