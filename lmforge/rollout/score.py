"""Reward-model inference: the reward of each (prompt, response), batched.

Used by `lmforge score` and, later, by RL stages that score sampled responses."""

from __future__ import annotations

import torch

from lmforge.data.preference import _sequence, encode_response


@torch.no_grad()
def score_responses(model, tokenizer, prompts: list[list[dict]], responses: list[str], max_length: int = 1024,
                    batch_size: int = 16) -> list[float]:
    """Rewards from an `AutoModelForSequenceClassification` reward model, rendered with its own template."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    rewards: list[float] = []
    for start in range(0, len(prompts), batch_size):
        sequences = []
        for prompt, response in zip(prompts[start:start + batch_size], responses[start:start + batch_size]):
            prompt_ids, response_ids = encode_response(tokenizer, prompt, response)
            sequences.append(_sequence(prompt_ids, response_ids)[0][:max_length])
        width = max(len(s) for s in sequences)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
        rewards += model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float().tolist()
    return rewards
