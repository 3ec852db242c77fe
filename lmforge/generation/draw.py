"""Drawing the next token of many sequences at once, each with its own request's settings."""

from __future__ import annotations

import torch

from lmforge.generation.request import GenerationError
from lmforge.generation.sampling import choose_tokens, counter_uniform, penalise, token_logprobs
from lmforge.generation.sequence import Sequence, TokenEvent


def draw_tokens(sequences: list[Sequence], logits: torch.Tensor, events: list[TokenEvent]) -> None:
    """Draw each sequence's next token from its row of `logits` [B, V], record it, and add its event."""
    settings = [s.request.sampling for s in sequences]
    device = logits.device

    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)

    scores = logits
    if any(s.penalised for s in settings):
        scores = penalise(logits, *seen_masks(sequences, logits.shape[-1], device),
                          column([s.repetition_penalty for s in settings]),
                          column([s.presence_penalty for s in settings]))
    uniforms = counter_uniform(column([s.seed for s in sequences], torch.long),
                               column([s.steps for s in sequences], torch.long))
    # Which filters run is known here on the host: no device sync to find out.
    tokens = choose_tokens(scores, column([s.temperature for s in settings]),
                           column([s.top_k for s in settings], torch.long), column([s.top_p for s in settings]),
                           column([s.min_p for s in settings]), uniforms,
                           all_greedy=all(s.greedy for s in settings),
                           truncating=any(s.top_k > 0 or s.top_p < 1 for s in settings),
                           flooring=any(s.min_p > 0 for s in settings))
    logprobs, top_ids, top_values = asked_logprobs(sequences, logits, tokens)
    # One transfer brings the tokens and whether each row's logits were finite (a NaN would draw token 0).
    drawn, finite = torch.stack([tokens, torch.isfinite(logits).all(-1).long()]).tolist()
    broken = [s for s, ok in zip(sequences, finite) if not ok]
    if broken:
        raise GenerationError(f"the model gave non-finite logits (NaN or inf) for {len(broken)} of {len(sequences)} "
                              "rows: check its weights and dtype; Engine.reset() ends the requests in flight")
    for i, (sequence, token) in enumerate(zip(sequences, drawn)):
        wanted = sequence.request.top_logprobs
        ranked = list(zip(top_ids[i][:wanted], top_values[i][:wanted])) if wanted else None
        events.append(sequence.accept(token, logprobs[i], ranked))
        sequence.handle.check_done()


def asked_logprobs(sequences: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> tuple[list, list, list]:
    """Per row: the drawn token's log-prob, and the ids and log-probs of its request's `top_logprobs` most likely
    tokens (None where not asked). Computed for the rows that ask only: a vocabulary-wide log-softmax and
    sort per row is not free at a large batch."""
    count = len(sequences)
    logprobs, top_ids, top_values = [None] * count, [None] * count, [None] * count
    asking = [i for i, s in enumerate(sequences) if s.request.logprobs or s.request.top_logprobs]
    if not asking:
        return logprobs, top_ids, top_values
    picked = [sequences[i] for i in asking]
    if len(asking) < count:
        index = torch.tensor(asking, device=logits.device)
        logits, tokens = logits[index], tokens[index]
    top = max(s.request.top_logprobs for s in picked)
    chosen, ids, values = token_logprobs(tempered(logits, picked), tokens, top)
    for i, value in zip(asking, chosen.tolist()):
        logprobs[i] = value
    if top:
        for i, row_ids, row_values in zip(asking, ids.tolist(), values.tolist()):
            top_ids[i], top_values[i] = row_ids, row_values
    return logprobs, top_ids, top_values


def tempered(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """The logits the log-probs are read from: each row divided by its temperature where its request asks
    for tempered log-probs (and samples at a temperature other than 0 and 1), else as they are."""
    scales = [s.request.sampling.temperature if s.request.tempered_logprobs and s.request.sampling.temperature > 0
              else 1.0 for s in sequences]
    if all(scale == 1.0 for scale in scales):
        return logits
    return logits.float() / torch.tensor(scales, dtype=torch.float32, device=logits.device)[:, None]


def seen_masks(sequences: list[Sequence], vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, V] bool: tokens in each sequence's prompt and reply; tokens in its reply alone. Each sequence
    keeps its own two masks and marks only the tokens added since the last step (not its whole history)."""
    for sequence in sequences:
        if sequence.seen is None:
            sequence.seen = (torch.zeros(vocab, dtype=torch.bool, device=device),
                             torch.zeros(vocab, dtype=torch.bool, device=device), 0)
        in_context, in_reply, marked = sequence.seen
        new = sequence.history[marked:]
        if new:
            in_context[torch.tensor(new, device=device)] = True
            reply_new = sequence.history[max(marked, sequence.reply_start):]
            if reply_new:
                in_reply[torch.tensor(reply_new, device=device)] = True
        sequence.seen = (in_context, in_reply, len(sequence.history))
    return (torch.stack([s.seen[0] for s in sequences]), torch.stack([s.seen[1] for s in sequences]))
