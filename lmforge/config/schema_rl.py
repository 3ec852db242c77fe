"""Configuration of online RL (ppo, grpo, rloo): the rewards and the `rl` group. Re-exported from
lmforge.config.schema, so `from lmforge.config.schema import RLConfig` keeps working."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config.constraints import check_choice, check_group
from lmforge.config.errors import ConfigError

REWARD_KINDS = ("model", "exact_match", "answer_match", "regex", "length", "function")


@dataclass
class RewardSpec:
    kind: str = "model"
    """model (a reward-model artifact), exact_match (the reply equals the reference), answer_match (the
    reply states the reference answer), regex (the reply matches `pattern`), length (a penalty past
    `target_length` tokens), function (`module:function` or `file.py:function`)."""
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
    backend: str = "auto"
    """Generation engine backend for rollouts and held-out answers: own (lmforge's decoder for Llama,
    Qwen2/3 and Mistral: pre-allocated KV cache, on a GPU a CUDA-graph-captured decoding step), hf (the
    engine's transformers fallback, any causal LM), auto (own where it runs the model exactly, else hf).
    lmforge is the old name of own."""

    def __post_init__(self) -> None:
        check_group(self, "rl")
        check_choice("rl", "kl_estimator", self.kl_estimator, ("k1", "k3"))
        check_choice("rl", "reward_norm", self.reward_norm, ("none", "batch", "running"))
        check_choice("rl", "critic", self.critic, ("separate", "shared"))
        check_choice("rl", "reference", self.reference, ("auto", "copy", "adapter", "none"))
        if self.reference == "none" and (self.kl_coef or self.kl_target):
            raise ConfigError("rl.reference=none leaves no KL to penalise: set rl.kl_coef=0 and rl.kl_target=0")
        check_choice("rl", "backend", self.backend, ("auto", "own", "hf", "lmforge"))

    def reward_specs(self) -> list[RewardSpec]:
        extra = [RewardSpec(kind="model", path=self.reward_model)] if self.reward_model else []
        return extra + list(self.rewards)
