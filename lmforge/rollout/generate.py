"""Batched generation with a KV cache: the one engine that evaluation (and later RL, chat and the
server) samples from. Prompts are rendered with the model's chat template and left-padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.data.templates import end_of_turn_ids, render_prompt


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stopped: bool
    """True when the model ended its turn itself (an end-of-turn/EOS token), not at the length limit."""


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 16,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> list[Generation]:
    """Answer each conversation (a list of messages ending with a user turn)."""
    stop_ids = end_of_turn_ids(tokenizer)
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end aligned
    device = next(model.parameters()).device
    results: list[Generation] = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [render_prompt(tokenizer, c) for c in conversations[start:start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} \
                if temperature > 0 else {"do_sample": False}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                results.append(_trim(row, stop_ids, tokenizer))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return results


def _trim(row: list[int], stop_ids: list[int], tokenizer) -> Generation:
    for i, token in enumerate(row):
        if token in stop_ids:
            ids = row[:i]
            return Generation(tokenizer.decode(ids, skip_special_tokens=True), ids, True)
    # Cut at the length limit, the last token can hold half a multi-byte character: drop the fragment.
    return Generation(tokenizer.decode(row, skip_special_tokens=True).rstrip("\ufffd"), row, False)
