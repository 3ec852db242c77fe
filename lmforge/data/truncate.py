"""The truncation policy for SFT dialogues: cut what the user wrote, never the template's structure.

A rendered dialogue is split into *pieces*, each tagged with what it is:

- `frame`: template text around a message (`<|im_start|>user\\n`, `<|im_end|>\\n`, role headers);
- `header`: the template text that opens the assistant turn, right before a reply;
- `system` / `text`: a system prompt's or another message's content;
- `reply`: an assistant reply's content; `end`: its end-of-turn token (EOS when the template has none).

When a dialogue is longer than max_length, whole turns (context + reply) are kept in order while they
fit; the first turn that does not fit is cut to fit and the turns after it are dropped:

1. its frames, its header and the reply's end-of-turn token are always kept whole;
2. the reply keeps its head, and gets at least half of the room left once those are kept (all it
   needs if less), so it still ends in its end-of-turn token;
3. the context (everything between the previous reply and the header) fits in the rest: older
   messages' text is cut first (oldest first); then the system prompt and the message the reply
   answers share what is left, that message getting at least half; a message that must shrink loses
   its middle (its first and last tokens stay), so an instruction and its question both survive;
4. when there is no room for the kept structure plus one reply token, the turn is dropped; a sample
   left with no reply that carries loss is dropped.

Every sample that is cut or dropped is counted by kind: `prompt_cut`, `reply_cut`, `turns_dropped`,
`dropped_no_room`. Template text after the last end-of-turn token (a newline) is cut first, uncounted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.data.templates import end_of_turn_markers, prepare_messages, render_segments, render_template

KEPT_WHOLE = ("frame", "header", "end")
SENTINEL = re.compile("\ue000(\\d+)\ue001")


@dataclass
class Piece:
    ids: list[int]
    kind: str
    loss: bool


def render_parts(tokenizer, messages: list[dict], tools: list | None = None, template_kwargs: dict | None = None,
                 reasoning_loss: bool = True) -> list[list[tuple[str, str]]]:
    """Each segment of `render_segments` as (text, kind) parts whose texts join to the segment's."""
    segments = render_segments(tokenizer, messages, tools, template_kwargs, reasoning_loss)
    full = "".join(s.text for s in segments)
    spans = _content_spans(tokenizer, prepare_messages(tokenizer, messages, tools), full, tools, template_kwargs)
    ends = end_of_turn_markers(tokenizer)
    out, at = [], 0
    for index, segment in enumerate(segments):
        if segment.is_assistant:
            marker = next((m for m in ends if m and segment.text.endswith(m)), "")
            parts = [(segment.text[: len(segment.text) - len(marker)], "reply"), (marker, "end")]
        else:
            parts = _split_context(segment.text, at, spans)
            before_reply = index + 1 < len(segments) and segments[index + 1].is_assistant
            if before_reply and parts[-1][1] == "frame":
                parts[-1] = (parts[-1][0], "header")
        out.append([p for p in parts if p[0]])
        at += len(segment.text)
    return out


def _content_spans(tokenizer, messages: list[dict], full: str, tools: list | None = None,
                   template_kwargs: dict | None = None) -> list[tuple[int, int, str]]:
    """(start, end, kind) of each non-assistant message's content in the rendered text. The template
    is rendered once more with numbered placeholders for those contents: what lies between them is
    template text. Any doubt (a template that reorders or rewrites text) gives no spans: nothing of
    the context is then cut, and a turn that cannot fit is dropped rather than cut blind."""
    marked = [m if m["role"] == "assistant" else {**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
    try:
        template = render_template(tokenizer, marked, False, tools, template_kwargs)
    except Exception:  # noqa: BLE001 - a template may reject odd content; fall back to no spans
        return []
    pieces = SENTINEL.split(template)
    frames, order = pieces[0::2], [int(k) for k in pieces[1::2]]
    spans, pos = [], 0
    for k, index in enumerate(order):
        if not full.startswith(frames[k], pos) or index >= len(messages):
            return []
        pos += len(frames[k])
        content = messages[index]["content"]
        length = next((len(c) for c in (content, content.strip()) if c and full.startswith(c, pos)), None)
        if length is None:
            nxt = full.find(frames[k + 1], pos) if frames[k + 1] else -1
            if nxt < 0:
                return []
            length = nxt - pos
        kind = "system" if messages[index]["role"] == "system" else "text"
        spans.append((pos, pos + length, kind))
        pos += length
    return spans if full[pos:] == frames[-1] else []


def _split_context(text: str, offset: int, spans: list[tuple[int, int, str]]) -> list[tuple[str, str]]:
    parts, pos = [], 0
    for start, end, kind in spans:
        start, end = max(start - offset, pos), min(end - offset, len(text))
        if start >= end:
            continue
        parts += [(text[pos:start], "frame"), (text[start:end], kind)]
        pos = end
    parts.append((text[pos:], "frame"))
    return parts


def encode_parts(tokenizer, segments: list[list[tuple[str, str]]], is_reply: list[bool]) -> list[Piece]:
    """Tokenize each segment whole (as before: boundaries inside a segment must not change its ids)
    and give each token to the part its first character lies in."""
    pieces = []
    for parts, reply in zip(segments, is_reply):
        text = "".join(t for t, _ in parts)
        if not getattr(tokenizer, "is_fast", False):
            pieces += [Piece(tokenizer.encode(t, add_special_tokens=False), k, reply) for t, k in parts]
            continue
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        bounds, pos = [], 0
        for part_text, _ in parts:
            pos += len(part_text)
            bounds.append(pos)
        owned: list[list[int]] = [[] for _ in parts]
        which = 0
        for token, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            while which + 1 < len(parts) and start >= bounds[which]:
                which += 1
            owned[which].append(token)
        pieces += [Piece(ids, kind, reply) for ids, (_, kind) in zip(owned, parts)]
    return [p for p in pieces if p.ids]


def truncate_pieces(pieces: list[Piece], max_length: int) -> tuple[list[Piece], set[str]]:
    """The pieces cut to max_length by the policy above, and the kinds of cut it made."""
    if sum(len(p.ids) for p in pieces) <= max_length:
        return pieces, set()
    turns, current = [], []
    for i, piece in enumerate(pieces):
        current.append(piece)
        if piece.loss and (i + 1 == len(pieces) or not pieces[i + 1].loss):
            turns.append(current)
            current = []
    kept: list[Piece] = []
    cuts: set[str] = set()
    room = max_length
    for index, turn in enumerate(turns):
        size = sum(len(p.ids) for p in turn)
        if size <= room:
            kept += turn
            room -= size
            continue
        fitted = _fit_turn(turn, room, cuts)
        kept += fitted or []
        if (index + 1 < len(turns) or fitted is None) and any(p.loss for p in kept):
            cuts.add("turns_dropped")
        break
    else:
        for piece in current:  # the template's text after the last reply: cut from its end
            if room > 0:
                kept.append(Piece(piece.ids[:room], piece.kind, piece.loss))
                room -= len(kept[-1].ids)
    if not any(p.loss and p.ids for p in kept):
        cuts = {"dropped_no_room"}
    return [p for p in kept if p.ids], cuts


def _fit_turn(turn: list[Piece], room: int, cuts: set[str]) -> list[Piece] | None:
    reply_at = max(i for i, p in enumerate(turn) if p.loss and p.kind != "end") if \
        any(p.loss and p.kind != "end" for p in turn) else None
    fixed = sum(len(p.ids) for i, p in enumerate(turn) if p.kind in KEPT_WHOLE and i != reply_at)
    reply = turn[reply_at].ids if reply_at is not None else []
    avail = room - fixed
    if avail < min(1, len(reply)):
        return None
    context = [i for i, p in enumerate(turn) if p.kind not in KEPT_WHOLE and i != reply_at]
    context_total = sum(len(turn[i].ids) for i in context)
    reply_room = min(len(reply), max(avail - context_total, (avail + 1) // 2))
    excess = context_total - (avail - reply_room)
    out = [Piece(list(p.ids), p.kind, p.loss) for p in turn]
    if reply_room < len(reply):
        out[reply_at].ids = reply[:reply_room]
        cuts.add("reply_cut")
    if excess > 0:
        cuts.add("prompt_cut")
        _cut_context(out, context, excess)
    return out


def _cut_context(out: list[Piece], context: list[int], excess: int) -> None:
    """Remove `excess` tokens from the context pieces: older messages first (oldest first); then the
    system prompt and the message the reply answers share what is left, the answered message getting
    at least half of it. A message that shrinks loses its middle."""
    answered = max((i for i in context if out[i].kind == "text"), default=None)
    last = [i for i in context if i == answered or out[i].kind == "system"]
    for i in [i for i in context if i not in last]:
        take = min(excess, len(out[i].ids))
        _middle_cut(out[i], len(out[i].ids) - take)
        excess -= take
    if excess <= 0:
        return
    room = sum(len(out[i].ids) for i in last) - excess
    if answered is not None:
        others = sum(len(out[i].ids) for i in last if i != answered)
        answer_room = min(len(out[answered].ids), max(room - others, (room + 1) // 2))
        _middle_cut(out[answered], answer_room)
        room -= answer_room
    for i in last:  # the system prompt(s), in order
        if i != answered:
            _middle_cut(out[i], min(len(out[i].ids), room))
            room -= len(out[i].ids)


def _middle_cut(piece: Piece, keep: int) -> None:
    head = (keep + 1) // 2
    piece.ids = piece.ids[:head] + piece.ids[len(piece.ids) - (keep - head):]
