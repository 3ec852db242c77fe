"""Prompt-only data for online RL (ppo, grpo, rloo): each record becomes the prompt to sample from, plus
whatever a reward may check the sampled reply against.

Accepted row forms:
- TRL: `prompt` as a string or a message list (`role`/`content` or ShareGPT `from`/`value`), optional
  `system`; the reference answer from the first present of `completion`, `reference`, `solution`,
  `ground_truth`, `answer` (a string or a number).
- MedicalGPT: `question` (+ `system`) for the prompt, `answer` or `response` for the reference.
- Any SFT record (Alpaca, ShareGPT, OpenAI `messages`, with dataset_info remapping): a dialogue ending with
  an assistant reply gives the prompt before it and that reply as the reference; a dialogue ending with a
  user turn is the prompt itself. Alpaca records may leave out `output` (prompt-only). A raw-text record
  is a single user turn.
- Preference records (LLaMA-Factory `ranking: true`, TRL or MedicalGPT pairs): the chosen reply is the
  reference. KTO records whose label is false have no reference (their reply is the undesirable one).

Every form becomes `{"prompt": [messages ending with a user turn], "reference": str, "answer": str,
"extra": str}` plus `tools`, the JSON text of the record's function schemas (for the template's `tools=`
argument), when it has any; `answer` the record's own short `answer` column (the demo world's "15"),
`extra` the JSON text of its remaining top-level columns (`kind`, `distractors`, `id`, ...) for rewards.
"""

from __future__ import annotations

import json

# The SFT parsers are reused as they are so dataset_info column and tag remapping means the same here;
# they are module-private because SFT insists on a final assistant reply, which a prompt need not have.
from lmforge.data import formats
from lmforge.data.formats import ALPACA_COLUMNS, SHAREGPT_COLUMNS, RowFormat, detect_format
from lmforge.data.preference import check_prompt, prompt_messages, response_text
from lmforge.data.tools import plain_messages

REFERENCE_KEYS = ("completion", "reference", "solution", "ground_truth", "answer", "response")
CHOSEN_KEYS = ("chosen", "response_chosen")
PAIR_KEYS = ("chosen", "rejected", "response_chosen", "response_rejected")
SFT_KEYS = ("instruction", "messages", "conversations", "text")


def to_prompt(row: dict, fmt: RowFormat) -> dict:
    """Normalise one prompt record; raises ValueError naming the problem (the caller adds file and line)."""
    if fmt.replacements:
        row = formats._replace(row, fmt.replacements)
    tools = ""
    if _is_sft_shaped(row, fmt):
        prompt, reply, used, tools = _dialogue_prompt(row, fmt)
    elif "prompt" in row:
        prompt, reply, used = _with_system(prompt_messages(row["prompt"], "prompt"), row), None, {"prompt", "system"}
    elif "question" in row:
        prompt, reply, used = _with_system(prompt_messages(row["question"], "question"), row), None, {"question", "system"}
    else:
        keys = ", ".join(sorted(row)) or "none"
        raise ValueError(f"no prompt found in the keys ({keys}): expected prompt, question, instruction, messages "
                         "or conversations")
    check_prompt(prompt)
    prompt = plain_messages(prompt)  # prompt rows are {role, content}: a tool call is its JSON text
    reference_key = None
    if reply is None:
        reference_key = next((k for k in (*REFERENCE_KEYS, fmt.columns.get("chosen"), *CHOSEN_KEYS)
                              if k and k in row and k not in used and row[k] is not None), None)
        reply = _reply_text(row[reference_key], reference_key) if reference_key else ""
    label = row.get(fmt.columns.get("kto_tag", "label"))
    undesirable = label is False or (isinstance(label, str) and label.strip().lower() == "false")  # CSV: "false"
    if undesirable and reference_key in (None, "completion"):
        reply = ""  # a KTO record's reply is the undesirable one: no reference to reward against
    answer = _scalar_text(row["answer"], "answer") if row.get("answer") is not None else ""
    used |= {reference_key, "answer", *PAIR_KEYS, fmt.columns.get("chosen"), fmt.columns.get("rejected")}
    extra = {k: v for k, v in row.items() if k not in used and isinstance(v, (str, int, float, bool, list))}
    out = {"prompt": prompt, "reference": reply, "answer": answer,
           "extra": json.dumps(extra, ensure_ascii=False, default=str)}
    return {**out, "tools": tools} if tools else out


def _is_sft_shaped(row: dict, fmt: RowFormat) -> bool:
    """TRL and MedicalGPT rows are told apart from SFT rows only when nothing says the row is SFT-shaped."""
    if fmt.formatting != "auto" or fmt.columns.get("messages") in row or fmt.columns.get("prompt") in row:
        return True
    return any(k in row for k in SFT_KEYS)


def _with_system(prompt: list[dict], row: dict) -> list[dict]:
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"field 'system' must be a string, got {type(system).__name__}")
    if system and prompt[0]["role"] != "system":
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def _dialogue_prompt(row: dict, fmt: RowFormat) -> tuple[list[dict], str | None, set, str]:
    """(prompt, the final assistant reply or None, the columns read, the tools' JSON text) of an
    SFT-shaped record."""
    kind = detect_format(row, fmt)
    if kind == "text":
        key, text = formats.text_field(row, fmt)
        return [{"role": "user", "content": text}], None, {key}, ""
    if kind == "alpaca":
        cols = {**ALPACA_COLUMNS, **fmt.columns}
        if row.get(cols["response"]) is None:
            row = {**row, cols["response"]: ""}  # prompt-only and ranking records have no output column
        messages, _ = formats._alpaca(row, fmt)
        used, tools = {cols[k] for k in ALPACA_COLUMNS}, ""
    else:
        messages, tools = formats._conversation(row, fmt, kind)
        cols = {**SHAREGPT_COLUMNS, **fmt.columns}
        used = {cols["messages"], cols["system"], cols["tools"], "messages", "conversations"}
    if messages[-1]["role"] != "assistant":
        return messages, None, used, tools
    reply = plain_messages([messages.pop()])[0]["content"]
    return messages, (reply if reply.strip() else None), used, tools


def _scalar_text(value, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"field {key!r} must be a string or a number, got {type(value).__name__}")


def _reply_text(value, key: str) -> str:
    """A reference given as text or a number; completions and chosen replies may also be assistant
    messages (TRL conversational form, LLaMA-Factory ranking data)."""
    if isinstance(value, (dict, list)) and key not in ("reference", "solution", "ground_truth", "answer", "response"):
        return response_text(value, key)
    return _scalar_text(value, key)
