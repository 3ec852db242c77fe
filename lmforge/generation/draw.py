"""Drawing the next token of many sequences at once, each with its own request's settings: the host's side.

A step's per-row inputs (token, position, settings, the uniform of this step) are packed on the host into
one int32 array from the `RowTable` (rows.py) and sent in one transfer; the backend runs the forward pass and, for rows without
penalties, the fused draw (`sampling.draw_rows`) in the same (captured) step; one transfer brings back each
row's token, the finite check and the log-prob. Rows with repetition/presence penalties get the forward
pass's logits and are drawn here, through the same fused draw on penalised scores.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmforge.generation.request import GenerationError
from lmforge.generation.rows import RowTable
from lmforge.generation.sampling import (
    OUT_LOGPROB,
    OUT_SPREAD,
    OUT_TOKEN,
    SCALE,
    TEMPERATURE,
    DrawMode,
    draw_rows,
    penalise,
    token_logprobs,
)
from lmforge.generation.sequence import Sequence, TokenEvent


def decode_tokens(backend, table: RowTable, sequences: list[Sequence], events: list[TokenEvent]) -> None:
    """One decoding step of rows 0..B-1 (`sequences`, whose inputs `table` holds): feed each its last token,
    draw and record the next."""
    count = len(sequences)
    mode, penalised = table.mode(count)
    packed = table.pack(count, backend.step_rows(count), backend.pad_position)
    out, logits = backend.decode_step(packed, count, None if penalised else mode)
    for sequence in sequences:
        sequence.cached += 1
    if out is None:
        out = draw_penalised(sequences, logits, torch.from_numpy(packed[:count]).to(logits.device), mode)
    tokens = finish(sequences, logits, out, events)
    table.advance(np.array(tokens, dtype=np.int32))


def draw_tokens(sequences: list[Sequence], logits: torch.Tensor, events: list[TokenEvent]) -> None:
    """Draw each sequence's next token from its row of `logits` [B, V] (a prefill's last logits), record it,
    and add its event."""
    table = RowTable.of(sequences)
    inputs = torch.from_numpy(table.pack(len(sequences), len(sequences), 0)).to(logits.device)
    mode, penalised = table.mode(len(sequences))
    out = draw_penalised(sequences, logits, inputs, mode) if penalised else draw_rows(logits, logits, inputs, mode)
    finish(sequences, logits, out, events)


def draw_penalised(sequences: list[Sequence], logits: torch.Tensor, inputs: torch.Tensor,
                   mode: DrawMode) -> torch.Tensor:
    """The fused draw on penalised scores (repetition over prompt and reply, presence over the reply)."""
    def column(values):
        return torch.tensor(values, dtype=torch.float32, device=logits.device)

    settings = [s.request.sampling for s in sequences]
    scores = penalise(logits, *seen_masks(sequences, logits.shape[-1], logits.device),
                      column([s.repetition_penalty for s in settings]), column([s.presence_penalty for s in settings]))
    return draw_rows(scores, logits, inputs, mode)


def finish(sequences: list[Sequence], logits: torch.Tensor, out: torch.Tensor, events: list[TokenEvent]) -> list[int]:
    """Read the step's outputs back (one transfer), refuse non-finite logits, record every row's token;
    the tokens."""
    rows = out.tolist()
    broken = sum(1 for row in rows if not math.isfinite(row[OUT_SPREAD]))
    if broken:  # a NaN would otherwise draw some token silently
        raise GenerationError(f"the model gave non-finite logits (NaN or inf) for {broken} of {len(sequences)} "
                              "rows: check its weights and dtype; Engine.reset() ends the requests in flight")
    tokens = [int(row[OUT_TOKEN]) for row in rows]
    top = ranked(sequences, logits, tokens)
    for i, (sequence, row) in enumerate(zip(sequences, rows)):
        logprob = row[OUT_LOGPROB] if sequence.asks_logprobs else None
        event = sequence.accept(tokens[i], logprob, top[i])
        events.append(event)
        if event.finish_reason is not None:
            sequence.handle.check_done()
    return tokens


def ranked(sequences: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> list:
    """Per row: (id, log-prob) of its request's `top_logprobs` most likely tokens, None where not asked.
    Computed for the rows that ask only: a vocabulary-wide sort per row is not free at a large batch."""
    asking = [i for i, s in enumerate(sequences) if s.request.top_logprobs]
    out: list = [None] * len(sequences)
    if not asking:
        return out
    index = torch.tensor(asking, device=logits.device)
    scales = torch.tensor([sequences[i].float_settings[SCALE - TEMPERATURE] for i in asking], dtype=torch.float32,
                          device=logits.device)
    top = max(sequences[i].request.top_logprobs for i in asking)
    _, ids, values = token_logprobs(logits[index] / scales[:, None], torch.tensor(tokens, device=logits.device)[index],
                                    top)
    for i, row_ids, row_values in zip(asking, ids.tolist(), values.tolist()):
        wanted = sequences[i].request.top_logprobs
        out[i] = list(zip(row_ids[:wanted], row_values[:wanted]))
    return out


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
