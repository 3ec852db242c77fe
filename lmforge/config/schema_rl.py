"""Configuration of online RL (ppo, grpo, rloo): the rewards and the `rl` group. Re-exported from
lmforge.config.schema, so `from lmforge.config.schema import RLConfig` keeps working."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config.constraints import check_choice, check_group
from lmforge.config.errors import ConfigError

# The GRPO loss family's choices (lmforge/losses/grpo_family.py reads them from here: config is the lowest layer).
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
REWARD_SCALES = ("group", "batch", "none")

REWARD_KINDS = ("model", "exact_match", "answer_match", "think_format", "regex", "length", "function", "environment")


@dataclass
class RewardSpec:
    kind: str = "model"
    """model (a reward-model artifact), exact_match (the reply equals the reference), answer_match (the
    reply states the reference answer), think_format (1 for a <think> block, then an answer), regex (the
    reply matches `pattern`), length (a penalty past `target_length` tokens), function (`module:function`
    or `file.py:function`), environment (the sum of rl.environment's per-turn rewards; implied when
    rl.environment is set and no other reward is)."""
    weight: float = 1.0
    path: str = ""
    """kind=model: the reward-model folder (an RM artifact)."""
    pattern: str = ""
    """kind=regex: a Python regular expression searched in the reply."""
    function: str = ""
    """kind=function: `package.module:function` or `path/to/file.py:function`, called as
    function(prompts, responses, **columns) -> list[float]."""
    target_length: int = 0
    """kind=length: replies longer than this many tokens lose (length - target) / target."""

    def __post_init__(self) -> None:
        check_group(self, "rl.rewards")
        check_choice("rl.rewards", "kind", self.kind, REWARD_KINDS)
        needs = {"model": "path", "regex": "pattern", "function": "function", "length": "target_length"}
        if self.kind in needs and not getattr(self, needs[self.kind]):
            raise ConfigError(f"a reward of kind {self.kind} needs {needs[self.kind]}")


@dataclass
class RLConfig:
    """Online RL (ppo, grpo, rloo): sample, score, and optimise against the reward with a KL leash."""

    reward_model: str = ""
    """Shorthand for one `model` reward of weight 1 (a pipeline stage writes `reward_model: rm`)."""
    rewards: list[RewardSpec] = field(default_factory=list)
    """Rewards summed with their weights."""
    prompts_per_step: int = 16
    """Prompts sampled per rollout (one RL iteration); train.max_steps counts iterations."""
    num_generations: int = 1
    """Samples per prompt; GRPO and RLOO compare a prompt's samples, so they need at least 2."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    minibatch_size: int = 0
    """Samples per optimizer step (0: the whole rollout); micro-batches of train.batch_size accumulate."""
    clip_range: float = 0.2
    """PPO/GRPO/RLOO ratio clip ε: the ratio is kept within [1 - ε, 1 + ε] (TRL's epsilon)."""
    clip_range_low: float | None = None
    """GRPO/RLOO: ε of the lower clip, 1 - ε (unset: clip_range)."""
    clip_range_high: float | None = None
    """GRPO/RLOO: ε of the upper clip, 1 + ε (unset: clip_range). Above clip_range_low it is DAPO's
    clip-higher (Yu et al. 2025, who use 0.28 over 0.2): unlikely tokens can still gain probability
    (TRL's epsilon_high)."""
    loss_type: str = "dapo"
    """GRPO/RLOO aggregation of the per-token loss: dapo (a token mean over the whole optimizer step; the
    default, as before), grpo (each reply's token mean, then the mean over replies), bnpo (each
    micro-batch's token mean, then their mean), dr_grpo (token sum over replies x rl.max_new_tokens; with
    rl.scale_rewards auto also no std scaling). See docs/grpo.md."""
    importance_sampling: str = "token"
    """GRPO/RLOO importance ratio: token (per token, PPO/GRPO) or sequence (GSPO, Zheng et al. 2025: the exp
    of each reply's mean per-token log-ratio, clipped per reply; TRL's importance_sampling_level)."""
    scale_rewards: str = "auto"
    """GRPO advantages: reward minus its group's mean, divided by the group's std (group), the whole
    rollout's std (batch) or nothing (none); auto is none for loss_type dr_grpo, else group."""
    entropy_coef: float = 0.0
    """GRPO/RLOO: subtract this times the per-token entropy of the sampling distribution from the loss
    (an exploration bonus, aggregated like the policy term); 0 turns it off."""
    mask_truncated: bool = False
    """GRPO/RLOO: replies cut at max_new_tokens (no stop token) carry no loss (DAPO's overlong filtering;
    TRL's mask_truncated_completions)."""
    overlong_buffer: int = 0
    """GRPO/RLOO: DAPO's soft overlong penalty. Over the last this-many tokens before max_new_tokens the
    score falls linearly, reaching -rl.overlong_penalty at max_new_tokens; 0 turns it off."""
    overlong_penalty: float = 1.0
    """GRPO/RLOO: the largest soft overlong penalty (see overlong_buffer)."""
    dynamic_sampling: bool = False
    """GRPO/RLOO: DAPO's dynamic sampling. Groups whose replies all scored the same teach nothing: they are
    dropped and more prompts are sampled until rl.prompts_per_step groups differ, for at most
    rl.max_sampling_rounds rollouts per iteration (then the step is topped up with dropped groups)."""
    max_sampling_rounds: int = 3
    """GRPO/RLOO with rl.dynamic_sampling: the most rollouts one iteration samples (the first included)."""
    clip_range_value: float = 0.2
    value_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_coef: float = 0.05
    """KL penalty coefficient (PPO, RLOO: in the reward; GRPO: β of the k3 loss term; 0 disables)."""
    kl_estimator: str = "k1"
    """Per-token KL estimate for PPO/RLOO: k1 (log-ratio) or k3 (always ≥ 0). GRPO uses k3."""
    kl_target: float = 0.0
    """> 0: adapt kl_coef so the per-sequence KL stays near this value (Ziegler et al. 2019)."""
    kl_horizon: int = 10000
    reward_norm: str = "none"
    """none, batch (whiten each rollout's rewards), running (divide by a running std)."""
    reward_clip: float = 0.0
    """> 0: clip rewards to [-reward_clip, reward_clip] after normalisation."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of a reply cut at max_new_tokens instead of ending its turn."""
    target_approx_kl: float = 0.0
    """> 0: stop a rollout's remaining epochs once the approximate policy KL passes this."""
    critic: str = "separate"
    """PPO value model: separate (a copy of the reward model, or critic_path) or shared (a value head
    on the policy's own hidden states)."""
    critic_path: str = ""
    reference: str = "auto"
    """auto (the adapter-disabled policy under LoRA, else a frozen copy), copy, adapter, or none (no
    reference and no KL: saves a model copy, needs kl_coef 0 and no kl_target)."""
    eval_prompts: int = 64
    """Held-out prompts answered greedily before, during (train.eval_steps iterations) and after."""
    environment: str = ""
    """PPO/GRPO/RLOO: a multi-turn environment, `package.module:Class`, `path/to/file.py:Class` or the built-in
    `tools`: the model and the environment take turns (reset(record) -> messages; step(reply) -> (messages,
    reward, done)); only the model's tokens carry loss. Empty: single-turn rollouts."""
    tools: list[str] = field(default_factory=list)
    """rl.environment=tools: the functions the model may call, `module:function` or `file.py:function`."""
    max_turns: int = 4
    """rl.environment: the most model turns of one trajectory."""
    max_total_tokens: int = 256
    """rl.environment: the most tokens after the prompt (model and environment turns together)."""
    tool_timeout: float = 5.0
    """rl.environment=tools: seconds one tool call may run (its process is killed past it)."""
    tool_memory_mb: int = 512
    """rl.environment=tools: address-space limit of a tool call's process."""
    tool_output_chars: int = 2000
    """rl.environment=tools: characters of a tool's printed output and of its result the model reads."""
    tool_call_reward: float = 0.0
    """rl.environment=tools: reward of every tool call that ran without an error (per-turn shaping)."""
    backend: str = "auto"
    """Generation engine backend for rollouts and held-out answers: own (lmforge's decoder for Llama,
    Qwen2/3 and Mistral: pre-allocated KV cache, on a GPU a CUDA-graph-captured decoding step), hf (the
    engine's transformers fallback, any causal LM), auto (own where it runs the model exactly, else hf).
    lmforge is the old name of own."""
    rollout_rows: int = 0
    """The most samples the rollout engine decodes at once (its KV cache rows); 0: prompts_per_step ×
    num_generations, within half the GPU memory free at the first rollout. More samples queue for rows."""

    def __post_init__(self) -> None:
        check_group(self, "rl")
        check_choice("rl", "kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_choice("rl", "reward_norm", self.reward_norm, ("none", "batch", "running"))
        check_choice("rl", "critic", self.critic, ("separate", "shared"))
        check_choice("rl", "reference", self.reference, ("auto", "copy", "adapter", "none"))
        if self.reference == "none" and (self.kl_coef or self.kl_target):
            raise ConfigError("rl.reference=none leaves no KL to penalise: set rl.kl_coef=0 and rl.kl_target=0")
        check_choice("rl", "backend", self.backend, ("auto", "own", "hf", "lmforge"))
        if isinstance(self.rollout_rows, bool) or not isinstance(self.rollout_rows, int) or self.rollout_rows < 0:
            raise ConfigError(f"rl.rollout_rows={self.rollout_rows!r}: must be an integer >= 0 (0: as many as fit)")
        check_choice("rl", "loss_type", self.loss_type, LOSS_TYPES)
        check_choice("rl", "importance_sampling", self.importance_sampling, IMPORTANCE_LEVELS)
        check_choice("rl", "scale_rewards", self.scale_rewards, ("auto", *REWARD_SCALES))
        kinds = [spec.kind for spec in self.rewards]
        if "environment" in kinds and not self.environment:
            raise ConfigError("a reward of kind environment needs rl.environment")
        if self.environment == "tools" and not self.tools:
            raise ConfigError("rl.environment=tools needs rl.tools: a list of module:function or file.py:function")
        if self.overlong_buffer > self.max_new_tokens:
            raise ConfigError(f"rl.overlong_buffer={self.overlong_buffer} is longer than rl.max_new_tokens="
                              f"{self.max_new_tokens}: the penalty ramps over the last tokens before the limit")

    def clip_bounds(self) -> tuple[float, float]:
        """(ε low, ε high) of the ratio clip: clip_range where unset."""
        low = self.clip_range if self.clip_range_low is None else self.clip_range_low
        return low, self.clip_range if self.clip_range_high is None else self.clip_range_high

    def reward_scale(self) -> str:
        """scale_rewards with auto resolved: none under Dr. GRPO (Liu et al. 2025), else group."""
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "none" if self.loss_type == "dr_grpo" else "group"

    def grpo_family_settings(self) -> list[str]:
        """The GRPO/RLOO-only settings changed from their defaults (PPO refuses them)."""
        defaults = RLConfig()
        names = ("loss_type", "importance_sampling", "scale_rewards", "clip_range_low", "clip_range_high",
                 "entropy_coef", "mask_truncated", "overlong_buffer", "dynamic_sampling")
        return [f"rl.{n}" for n in names if getattr(self, n) != getattr(defaults, n)]

    def reward_specs(self) -> list[RewardSpec]:
        extra = [RewardSpec(kind="model", path=self.reward_model)] if self.reward_model else []
        specs = extra + list(self.rewards)
        if self.environment and not specs:
            return [RewardSpec(kind="environment")]
        return specs
