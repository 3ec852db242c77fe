"""The policy and (for PPO) its value function, as one module the training loop optimises.

Both read a [N, P + R] sequence (left-padded prompt, right-padded reply) and return one output per
reply token: the policy's logits for that token, and the value of the state just before it. The
critic is either a separate sequence-classification model (usually initialised from the reward
model, as in InstructGPT) or a linear head on the policy's own last hidden states (`shared`).
"""

from __future__ import annotations

import torch
from torch import nn


def _base(model):
    """The underlying transformers model (peft injects LoRA layers in place, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def reply_logits(policy, inputs: dict, width: int) -> torch.Tensor:
    """[N, R, V] logits predicting the R reply tokens (only the last R + 1 positions are computed)."""
    out = policy(**inputs, use_cache=False, logits_to_keep=width + 1)
    return out.logits[:, :-1]


class PolicyWithValue(nn.Module):
    def __init__(self, policy: nn.Module, critic: nn.Module | None = None, shared_value_head: bool = False):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = None
        if shared_value_head:
            hidden = _base(policy).config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)  # start from V = 0: no made-up baseline before learning
            nn.init.zeros_(self.value_head.bias)

    @property
    def has_values(self) -> bool:
        return self.critic is not None or self.value_head is not None

    def forward(self, input_ids, attention_mask, position_ids, width: int):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.value_head is not None:
            out = self.policy(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=width + 1)
            hidden = out.hidden_states[-1][:, -width - 1:-1]
            return out.logits[:, :-1], self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        logits = reply_logits(self.policy, inputs, width)
        if self.critic is None:
            return logits, None
        return logits, critic_values(self.critic, inputs, width)


def critic_values(critic, inputs: dict, width: int) -> torch.Tensor:
    """Per-token values from a sequence-classification model: its scalar head on every position."""
    base = _base(critic)
    hidden = getattr(base, base.base_model_prefix)(**inputs, use_cache=False).last_hidden_state
    return base.score(hidden[:, -width - 1:-1]).squeeze(-1).float()
