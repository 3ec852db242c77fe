"""What to set when `formatting: auto` cannot read a record: a guess from the keys and values seen.

Data sets in the wild (MedicalGPT's, LLaMA-Factory's, Firefly, BELLE, COIG, HuatuoGPT, role-play seed
files, summarisation and knowledge-graph sets) put the same few things under many names. A record that
auto-detection refuses gets one line saying which `formatting`/`columns`/`tags` on its dataset entry
would read it, or why no setting would (and what to convert it to).
"""

from __future__ import annotations

# Candidate names, most specific first. A key may serve as prompt or reply (`content` is the document of
# {content, summary} and the body of {title, content}): the first prompt found is kept out of the replies.
PROMPT_KEYS = ("instruction", "prompt", "query", "question", "questions", "input", "title", "content", "src",
               "source", "context", "ask", "human", "user")
REPLY_KEYS = ("output", "response", "answer", "answers", "target", "summary", "completion", "content", "reply",
              "tgt", "label", "gpt", "assistant", "bot")
SYSTEM_KEYS = ("system", "system_prompt", "seed", "character", "persona", "role", "background", "profile")
TEXT_KEYS = ("text", "content", "document", "passage", "article", "body", "raw_text")
TRIPLE_KEYS = ({"head", "relation", "tail"}, {"subject", "predicate", "object"}, {"h", "r", "t"},
               {"entity1", "relation", "entity2"})
ROLE_TAGS = ("from", "role", "speaker", "sender", "author")
CONTENT_TAGS = ("value", "content", "text", "utterance", "message")


def format_hint(row: dict) -> str:
    """One clause saying how to read `row` (what to set on its dataset entry), or why it cannot be read."""
    keys = set(row)
    if keys & {"chosen", "rejected", "response_chosen", "response_rejected"}:
        return ("they look like preference pairs: train them with rm or dpo (docs/preference.md), or for SFT "
                "give columns {prompt: ..., response: chosen}")
    if any(triple <= keys for triple in TRIPLE_KEYS):
        return ("they look like knowledge-graph triples, not text to train on: turn each into a question/answer "
                "record or a sentence of text first")
    for key, value in row.items():
        hint = _list_hint(key, value, row)
        if hint:
            return hint
    return _pair_hint(row) or _text_hint(row) or "set formatting and columns"


def _list_hint(key: str, value, row: dict) -> str | None:
    """A list-valued column: dialogue turns as objects, or alternating strings."""
    if not isinstance(value, list) or not value:
        return None
    system = _system_key(row, exclude={key})
    system_col = f", system: {system}" if system else ""
    if all(isinstance(turn, dict) for turn in value):
        turn_keys = set().union(*(set(turn) for turn in value))
        role = next((t for t in ROLE_TAGS if t in turn_keys), None)
        content = next((t for t in CONTENT_TAGS if t in turn_keys and t != role), None)
        if role and content:
            seen = list(dict.fromkeys(str(turn.get(role)) for turn in value if turn.get(role) is not None))
            roles = [r for r in seen if r.lower() not in ("system",)]
            tags = f"role_tag: {role}, content_tag: {content}"
            if len(roles) >= 2:
                tags += f", user_tag: {roles[0]}, assistant_tag: {roles[1]}"
            return (f"set formatting: sharegpt, columns: {{messages: {key}{system_col}}}, tags: {{{tags}}} "
                    f"(the first speaker in {key} taken as the user)")
        pair = sorted(turn_keys)
        return (f"each turn of {key} holds a whole exchange ({', '.join(pair)}), which no setting reads: convert it "
                "to conversations of {from, value} turns (docs/data.md)")
    if all(isinstance(turn, str) for turn in value):
        return (f"{key} is a list of strings (alternating user and assistant turns?), which no setting reads: "
                "convert it to conversations of {from, value} turns (docs/data.md)")
    return None


def _pair_hint(row: dict) -> str | None:
    """A prompt column and a reply column under other names: an Alpaca record after remapping."""
    strings = {k for k, v in row.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    prompt = next((k for k in PROMPT_KEYS if k in strings), None)
    reply = next((k for k in REPLY_KEYS if k in strings and k != prompt), None)
    if prompt is None or reply is None:
        return None
    columns = [f"prompt: {prompt}", f"response: {reply}"]
    if prompt != "input" and "input" in row and reply != "input":
        columns.insert(1, "query: input")
    system = _system_key(row, exclude={prompt, reply})
    if system:
        columns.append(f"system: {system}")
    if "history" in row:
        columns.append("history: history")
    hint = f"set formatting: alpaca, columns: {{{', '.join(columns)}}}"
    if prompt == "title" or (prompt == "content" and reply != "summary"):
        hint += f"; or, as pretraining text, formatting: text, columns: {{prompt: {reply}}}"
    return hint


def _text_hint(row: dict) -> str | None:
    key = next((k for k in TEXT_KEYS if isinstance(row.get(k), str)), None)
    if key is None:
        return None
    return f"for pretraining text set formatting: text, columns: {{prompt: {key}}}"


def _system_key(row: dict, exclude: set) -> str | None:
    return next((k for k in SYSTEM_KEYS if k not in exclude and isinstance(row.get(k), str) and row[k].strip()),
                None)
