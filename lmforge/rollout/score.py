"""Reward-model inference: the reward of each (prompt, response), batched.

Used by `lmforge score`, by RL stages (a `model` reward scores sampled responses) and by evaluation
(reward-model accuracy, mean reward, win rate)."""

from __future__ import annotations

import torch

from lmforge.data.preference import encode_response, pad_sequences, sequence_with_labels


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
            ids, labels = sequence_with_labels(prompt_ids, response_ids)
            sequences.append((ids[:max_length], labels[:max_length]))
        batch = pad_sequences(sequences, pad)
        scores = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        rewards += scores.logits.squeeze(-1).float().tolist()
    return rewards
