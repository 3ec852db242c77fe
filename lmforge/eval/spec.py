"""What to evaluate: one `EvalSpec` names the held-out files and the judge models.

The same block is `lmforge eval --suite FILE` and a pipeline's top-level `eval:` (where
`reward_model`, `reference` and `baseline` may name stages instead of folders)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from lmforge.config.errors import ConfigError

SUITE_JUDGES = {"reward": ("reward_model",), "kl": ("reference",), "win_rate": ("reward_model", "baseline")}


@dataclass
class EvalSpec:
    perplexity: str | None = None
    """Held-out text (or dialogues): perplexity in blocks of `block_size` tokens."""
    answers: str | None = None
    """Prompts with reference replies (any SFT or prompt format): greedy exact match, and `contains`
    (the record's short `answer`, or else the reference, stated in the reply)."""
    choice: str | None = None
    """Multiple choice in the C-Eval / CMMLU / MMLU layout, scored by each option's log-likelihood."""
    pairs: str | None = None
    """Preference pairs: pairwise accuracy of a reward model."""
    prompts: str | None = None
    """Prompts for reward, KL and win-rate (default: the `answers` file)."""
    reward_model: str | None = None
    """The judge: reward of greedy replies, and win-rate against `baseline`."""
    reference: str | None = None
    """KL(policy ‖ reference) on replies sampled from the policy (pipeline default: the stage's parent)."""
    baseline: str | None = None
    """The model whose greedy replies a win-rate is measured against."""
    max_samples: int = 128
    """At most this many records from each file."""
    max_new_tokens: int = 64
    block_size: int = 256
    perplexity_tokens: int = 65536
    """At most this many tokens of the perplexity text (long documents make it slow on a CPU)."""
    show_samples: int = 4
    """Held-out prompts whose replies are kept for the report."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.max_new_tokens < 1 or self.block_size < 8:
            raise ConfigError("eval: max_samples and max_new_tokens must be positive, block_size at least 8")

    @property
    def prompt_file(self) -> str | None:
        return self.prompts or self.answers

    def suite_key(self, suite: str, judges: dict[str, str | None]) -> str:
        """A digest of everything a suite's result depends on besides the model itself: rerun when it changes."""
        fields = {"perplexity": ("perplexity", "max_samples", "block_size", "perplexity_tokens"),
                  "answers": ("answers", "max_samples", "max_new_tokens", "show_samples"),
                  "choice": ("choice", "max_samples"), "rm_accuracy": ("pairs", "max_samples"),
                  "reward": ("reward_model", "prompts", "answers", "max_samples", "max_new_tokens"),
                  "kl": ("reference", "prompts", "answers", "max_samples", "max_new_tokens", "seed"),
                  "win_rate": ("reward_model", "baseline", "prompts", "answers", "max_samples",
                               "max_new_tokens")}[suite]
        values = {name: asdict(self)[name] for name in fields}
        # Digests of the judge models' manifests that this suite reads: a retrained judge reruns it.
        values["judges"] = {role: judges.get(role) for role in SUITE_JUDGES.get(suite, ())}
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
