"""Preference data: pairs (prompt, chosen, rejected) and unpaired KTO records (prompt, completion, label).

Accepted row forms (column names remappable like SFT data):
- TRL: `prompt`/`chosen`/`rejected` as strings, or as message lists; the implicit-prompt form, where
  `chosen` and `rejected` are whole conversations sharing their opening turns.
- LLaMA-Factory ranking data: ShareGPT `conversations` for the prompt with `chosen`/`rejected` as one
  message object each (`{"from": "gpt", "value": ...}`), or Alpaca `instruction`/`input` with
  `chosen`/`rejected` strings.
- MedicalGPT: `conversations` (or `question`/`system`) for the prompt, `chosen`/`rejected` strings
  (`response_chosen`/`response_rejected` too).
- KTO: LLaMA-Factory `messages` ending with the assistant reply plus a boolean `label` (`kto_tag`), or
  TRL `prompt`/`completion`/`label`.

Every form becomes `{"prompt": [messages ending with a user turn], "chosen": str, "rejected": str}` or
`{"prompt": [...], "completion": str, "label": bool}`; then the prompt is rendered with the chat
template once and each response appended, with labels on the response only.
"""

from __future__ import annotations

import torch

from lmforge.data.formats import RowFormat, check_dialogue
from lmforge.data.templates import render_segments
from lmforge.data.tokenize import IGNORE
from lmforge.data.tools import parse_tools, tools_text

ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
              "observation": "tool", "tool": "tool", "function_call": "assistant"}


def _message(turn, where: str) -> dict:
    if not isinstance(turn, dict):
        raise ValueError(f"{where} must be a message object, got {type(turn).__name__}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role not in ROLE_NAMES:
        raise ValueError(f"{where} has unknown role {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"{where} content must be a string, got {type(content).__name__}")
    return {"role": ROLE_NAMES[role], "content": content}


def prompt_messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict):
        return [_message(value, where)]
    if isinstance(value, list) and value:
        return [_message(t, f"{where}[{i}]") for i, t in enumerate(value)]
    raise ValueError(f"{where} must be a string or a non-empty list of messages")


def response_text(value, where: str) -> str:
    """A response given as a string, a message object or a one-message list (assistant)."""
    if isinstance(value, str):
        return value
    messages = prompt_messages(value, where)
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where} must end with an assistant message")
    return messages[-1]["content"]


def _prompt(row: dict, fmt: RowFormat) -> list[dict]:
    cols = fmt.columns
    system = row.get(cols.get("system", "system"))
    key = next((k for k in (cols.get("messages"), "conversations", "prompt", "messages", "question")
                if k and k in row), None)
    if key is None and cols.get("prompt", "instruction") in row:
        parts = [row.get(cols.get("prompt", "instruction")), row.get(cols.get("query", "input"))]
        if not all(isinstance(p, str) for p in parts if p is not None):
            raise ValueError("instruction and input must be strings")
        prompt = _history(row.get(cols.get("history", "history"))) + [
            {"role": "user", "content": "\n".join(p for p in parts if p)}]
    elif key is None:
        raise ValueError(f"no prompt column found (keys: {', '.join(sorted(row))})")
    else:
        prompt = prompt_messages(row[key], key)
    if isinstance(system, str) and system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return prompt


def _history(value) -> list[dict]:
    """Alpaca-style `history` ([[question, answer], ...]) as earlier turns of the prompt."""
    if not value:
        return []
    if not isinstance(value, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2
                                              and all(isinstance(x, str) for x in p) for p in value):
        raise ValueError("history must be a list of [question, answer] pairs of strings")
    return [m for q, a in value for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def _split_implicit(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """TRL's implicit prompt: two whole conversations that differ only in their last reply."""
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("chosen and rejected conversations must share every turn but the last assistant reply")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def to_pair(row: dict, fmt: RowFormat) -> dict:
    """Normalise one pairwise record; raises ValueError naming the problem."""
    cols = fmt.columns
    chosen_key = next((k for k in (cols.get("chosen"), "chosen", "response_chosen") if k and k in row), None)
    rejected_key = next((k for k in (cols.get("rejected"), "rejected", "response_rejected") if k and k in row), None)
    if chosen_key is None or rejected_key is None:
        raise ValueError(f"a preference pair needs chosen and rejected (keys: {', '.join(sorted(row))})")
    chosen, rejected = row[chosen_key], row[rejected_key]
    has_prompt = any(k in row for k in (cols.get("messages"), cols.get("prompt"), "prompt", "conversations",
                                         "instruction", "question", "messages") if k)
    if not has_prompt and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, good, bad = _split_implicit(prompt_messages(chosen, chosen_key), prompt_messages(rejected, rejected_key))
    else:
        prompt = _prompt(row, fmt)
        good, bad = response_text(chosen, chosen_key), response_text(rejected, rejected_key)
    check_prompt(prompt)
    if not good.strip() or not bad.strip():
        raise ValueError("empty response: chosen and rejected must both have text")
    if good.strip() == bad.strip():
        raise ValueError("chosen and rejected are identical")
    return _with_tools({"prompt": prompt, "chosen": good, "rejected": bad}, row, fmt)


def to_kto(row: dict, fmt: RowFormat) -> dict:
    """Normalise one unpaired record with a desirable/undesirable label."""
    label_key = fmt.columns.get("kto_tag", "label")
    label = row.get(label_key)
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        label = label.strip().lower() == "true"  # CSV has no booleans: its cells say "true" or "false"
    if not isinstance(label, bool):
        raise ValueError(f"field {label_key!r} must be true or false, got {label!r}")
    if "completion" in row:
        prompt, completion = _prompt(row, fmt), response_text(row["completion"], "completion")
    else:
        key = fmt.columns.get("messages") or ("messages" if "messages" in row else "conversations")
        turns = row.get(key)
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"field {key!r} must be a non-empty list of turns")
        role_key, content_key = fmt.tags.get("role_tag"), fmt.tags.get("content_tag")
        if role_key and content_key and role_key not in ("role", "from"):  # remapped keys
            turns = [{"role": t.get(role_key), "content": t.get(content_key)} if isinstance(t, dict) else t
                     for t in turns]
        messages = [_message(t, f"{key}[{i}]") for i, t in enumerate(turns)]
        if messages[-1]["role"] != "assistant":
            raise ValueError("a KTO record must end with the assistant reply being judged")
        prompt, completion = messages[:-1], messages[-1]["content"]
    check_prompt(prompt)
    if not completion.strip():
        raise ValueError("empty completion")
    return _with_tools({"prompt": prompt, "completion": completion, "label": label}, row, fmt)


def _with_tools(record: dict, row: dict, fmt: RowFormat) -> dict:
    """The row's function schemas (a `tools` column, JSON text or a list) as JSON text, for the template's
    tools= argument as in SFT: a pair about tool use is judged with the tools in view."""
    tools = parse_tools(row.get(fmt.columns.get("tools", "tools")))
    return {**record, "tools": tools_text(tools)} if tools else record


def check_prompt(prompt: list[dict]) -> None:
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        raise ValueError("the prompt must end with a user turn")
    check_dialogue([*prompt, {"role": "assistant", "content": "x"}])


def encode_response(tokenizer, prompt: list[dict], response: str,
                    tools: list | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids incl. the end-of-turn token) with the chat template (and its tools=)."""
    segments = render_segments(tokenizer, [*prompt, {"role": "assistant", "content": response}], tools)
    reply_at = max(i for i, s in enumerate(segments) if s.is_assistant)
    prompt_text = "".join(s.text for s in segments[:reply_at])
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False)
    return prompt_ids, tokenizer.encode(segments[reply_at].text, add_special_tokens=False)


class PromptTooLong(ValueError):
    """A preference record whose prompt alone leaves no room for a response under max_length: dropped
    and counted under on_error: skip, like an SFT sample with no room."""


def encode_pair(tokenizer, pair: dict, max_length: int) -> dict:
    """Token ids of prompt+chosen and prompt+rejected; responses cut to fit, prompt never cut."""
    tools = parse_tools(pair.get("tools")) or None
    prompt_ids, chosen = encode_response(tokenizer, pair["prompt"], pair["chosen"], tools)
    _, rejected = encode_response(tokenizer, pair["prompt"], pair["rejected"], tools)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens, no room left under max_length={max_length}")
    if chosen[:room] == rejected[:room]:
        raise ValueError(f"chosen and rejected are identical once cut to max_length={max_length}")
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen[:room], "rejected_ids": rejected[:room],
            "truncated": len(chosen) > room or len(rejected) > room}


def encode_kto(tokenizer, record: dict, max_length: int) -> dict:
    prompt_ids, completion = encode_response(tokenizer, record["prompt"], record["completion"],
                                             parse_tools(record.get("tools")) or None)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens, no room left under max_length={max_length}")
    return {"prompt_ids": prompt_ids, "completion_ids": completion[:room], "label": record["label"],
            "truncated": len(completion) > room}


def sequence_with_labels(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], list[int]]:
    return prompt_ids + response_ids, [IGNORE] * len(prompt_ids) + response_ids


def pair_rows(row: dict) -> list[tuple[list[int], list[int]]]:
    """The chosen and the rejected sequence of a tokenized pair, as (ids, labels)."""
    return [sequence_with_labels(row["prompt_ids"], row["chosen_ids"]), sequence_with_labels(row["prompt_ids"], row["rejected_ids"])]


def pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in sequences)
    ids = [s + [pad_id] * (width - len(s)) for s, _ in sequences]
    labels = [lab + [IGNORE] * (width - len(lab)) for _, lab in sequences]
    mask = [[1] * len(s) + [0] * (width - len(s)) for s, _ in sequences]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def pad_shared(prompts: list[list[int]], firsts: list[list[int]], seconds: list[list[int]],
               pad_id: int) -> dict[str, torch.Tensor]:
    """[B, L]: each record as one row [prompt, first reply, second reply] (models.shared_prompt), with
    `segments` [B, 3] (the three lengths) and `position_ids` that restart the second reply after the
    prompt. `attention_mask` marks real tokens only: the model gets a prefix-sharing mask built from
    `segments`."""
    rows = [p + a + b for p, a, b in zip(prompts, firsts, seconds)]
    width = max(len(r) for r in rows)
    positions = [list(range(len(p) + len(a))) + list(range(len(p), len(p) + len(b)))
                 for p, a, b in zip(prompts, firsts, seconds)]
    return {"input_ids": torch.tensor([r + [pad_id] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
            "position_ids": torch.tensor([q + [0] * (width - len(q)) for q in positions]),
            "segments": torch.tensor([[len(p), len(a), len(b)] for p, a, b in zip(prompts, firsts, seconds)])}


def collate_pairs(rows: list[dict], pad_id: int, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """[2B, L]: the B chosen sequences, then the B rejected ones — one forward pass for both; or, with
    `share_prompt`, [B, L] rows [prompt, chosen, rejected] (see pad_shared)."""
    if share_prompt:
        batch = pad_shared([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows],
                           [r["rejected_ids"] for r in rows], pad_id)
    else:
        pairs = [pair_rows(r) for r in rows]
        batch = pad_sequences([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    if "ref_chosen" in rows[0]:
        batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows], dtype=torch.float32)
    return batch


def collate_kto(rows: list[dict], pad_id: int, share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """[2B, L]: the B judged completions, then B mismatched prompt/completion pairs (each prompt with
    the next record's completion, fixed at tokenization) from which KTO estimates the KL term; with
    `share_prompt`, [B, L] rows [prompt, completion, mismatched completion]."""
    if share_prompt:
        batch = pad_shared([r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows],
                           [r["kl_completion_ids"] for r in rows], pad_id)
    else:
        judged = [sequence_with_labels(r["prompt_ids"], r["completion_ids"]) for r in rows]
        mismatched = [sequence_with_labels(r["prompt_ids"], r["kl_completion_ids"]) for r in rows]
        batch = pad_sequences(judged + mismatched, pad_id)
    batch["label"] = torch.tensor([bool(r["label"]) for r in rows])
    if "ref_logps" in rows[0]:
        batch["ref_logps"] = torch.tensor([r["ref_logps"] for r in rows], dtype=torch.float32)
        batch["ref_kl_logps"] = torch.tensor([r["ref_kl_logps"] for r in rows], dtype=torch.float32)
    return batch
