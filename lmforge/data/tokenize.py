"""Messages → token ids + labels, with the truncation policy stated once.

Labels are -100 on every token that carries no loss. By default only assistant replies
(each with its end-of-turn token) carry loss; `train_on_prompt` puts loss on everything and
`mask_history` keeps it only on the last reply.

Truncation (max_length): segments are kept in order; when a prompt/reply pair no longer fits,
the prompt keeps its head and the reply its head, sharing what is left (the reply gets at least
half). A sample left with no loss-carrying token is dropped and counted — never silently.
"""

from __future__ import annotations

from lmforge.data.templates import Segment, render_segments

IGNORE = -100


def encode_segments(tokenizer, segments: list[Segment]) -> list[tuple[list[int], bool]]:
    # Tokenizing segment by segment matches inference, where the prompt is tokenized on its own
    # and the model continues it.
    return [(tokenizer.encode(s.text, add_special_tokens=False), s.is_assistant) for s in segments]


def encode_sft(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool = False,
               mask_history: bool = False) -> dict | None:
    """Token ids and labels for one dialogue, or None when truncation left nothing to learn."""
    pieces = encode_segments(tokenizer, render_segments(tokenizer, messages))
    if mask_history:
        last = max(i for i, (_, is_reply) in enumerate(pieces) if is_reply)
        pieces = [(ids, is_reply and i == last) for i, (ids, is_reply) in enumerate(pieces)]
    pieces = truncate_pieces(pieces, max_length)
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, is_reply in pieces:
        input_ids += ids
        labels += ids if (is_reply or train_on_prompt) else [IGNORE] * len(ids)
    if not any(is_reply and ids for ids, is_reply in pieces):
        return None
    return {"input_ids": input_ids, "labels": labels}


def truncate_pieces(pieces: list[tuple[list[int], bool]], max_length: int) -> list[tuple[list[int], bool]]:
    total = sum(len(ids) for ids, _ in pieces)
    if total <= max_length:
        return pieces
    kept: list[tuple[list[int], bool]] = []
    room = max_length
    i = 0
    while i < len(pieces) and room > 0:
        ids, is_reply = pieces[i]
        if is_reply or i + 1 >= len(pieces) or not pieces[i + 1][1]:
            kept.append((ids[:room], is_reply))
            room -= len(kept[-1][0])
            i += 1
            continue
        # A prompt followed by its reply: share the room, keeping each one's head.
        reply = pieces[i + 1][0]
        if len(ids) + len(reply) <= room:
            kept += [pieces[i], pieces[i + 1]]
            room -= len(ids) + len(reply)
        else:
            prompt_room = min(len(ids), max(room - len(reply), room // 2))
            reply_room = room - prompt_room
            kept += [(ids[:prompt_room], False), (reply[:reply_room], True)]
            room = 0
        i += 2
    return [(ids, is_reply) for ids, is_reply in kept if ids]


def encode_text(tokenizer, text: str) -> list[int]:
    """A pretraining document: its tokens plus EOS, so the model learns where documents end."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids + [tokenizer.eos_token_id]


def messages_as_text(messages: list[dict]) -> str:
    """Chat data used as pretraining text: the turns' contents joined by newlines."""
    return "\n".join(m["content"] for m in messages)
