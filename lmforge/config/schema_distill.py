"""Configuration of on-policy distillation (`stage: distill`): the `distill` group. Re-exported from
lmforge.config.schema, so `from lmforge.config.schema import DistillConfig` works."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config.constraints import check_choice, check_group
from lmforge.config.errors import ConfigError
from lmforge.config.schema_rl import RLConfig

ESTIMATORS = ("full", "sampled")


@dataclass
class DistillConfig:
    """The student (the stage's model) samples replies; the teacher scores every sampled token; the loss is the
    per-token divergence between them (GKD, Agarwal et al. 2024). See docs/distill.md."""

    teacher: str = ""
    """The teacher: a model folder or an lmforge artifact (a bigger SFT model, say) sharing the student's
    tokenizer. In a pipeline, `teacher: STAGE` fills it in."""
    lambda_on_policy: float = 1.0
    """Share of iterations trained on the student's own samples (GKD's λ); the others train on the data's
    own replies (off-policy, supervised KD). 1: only on-policy, as GKD and Thinking Machines recommend."""
    beta: float = 1.0
    """GKD's generalized JSD: 1 is the reverse KL(student || teacher) (mode-seeking, the default), 0 the
    forward KL(teacher || student), in between JSD(beta)."""
    estimator: str = "full"
    """full: the divergence over the whole vocabulary at each reply token (exact, GKD's); sampled: the
    one-sample reverse-KL estimate log p_student − log p_teacher at the sampled token (Thinking Machines'
    note; needs beta 1 and lambda_on_policy 1)."""
    temperature: float = 1.0
    """Sampling temperature of the student's replies, and of both distributions in the loss."""
    prompts_per_step: int = 16
    """Prompts per iteration; each iteration is one optimizer step. train.max_steps counts iterations."""
    num_generations: int = 1
    """Replies sampled per prompt (they share the prompt's cache)."""
    max_new_tokens: int = 64
    eval_prompts: int = 64
    """Held-out prompts answered greedily before and after (exact match, reverse KL to the teacher), and
    answered once by the teacher."""
    backend: str = "auto"
    """Generation engine backend for the student's replies: auto, own, hf (as rl.backend)."""

    def __post_init__(self) -> None:
        check_group(self, "distill")
        check_choice("distill", "estimator", self.estimator, ESTIMATORS)
        check_choice("distill", "backend", self.backend, ("auto", "own", "hf"))
        if self.estimator == "sampled" and (self.beta != 1.0 or self.lambda_on_policy != 1.0):
            raise ConfigError("distill.estimator=sampled estimates the reverse KL on the student's own samples: "
                              "set distill.beta=1 and distill.lambda_on_policy=1, or use distill.estimator=full")

    def rollout(self) -> RLConfig:
        """These settings as the RL stages' rollout plumbing (lmforge.stages.online) reads them."""
        return RLConfig(prompts_per_step=self.prompts_per_step, num_generations=self.num_generations,
                        max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                        eval_prompts=self.eval_prompts, backend=self.backend, reference="none", kl_coef=0.0)


def check_distill_stage(distill: DistillConfig) -> None:
    """What `stage: distill` needs beyond the group's own ranges."""
    if not distill.teacher:
        raise ConfigError("distill needs a teacher: set distill.teacher to a model folder (in a pipeline: "
                          "teacher: STAGE)")
