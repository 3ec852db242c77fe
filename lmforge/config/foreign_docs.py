"""The key tables of docs/switching.md, written from foreign_keys.py (tests check the page holds exactly
this text): `python -m lmforge.config.foreign_docs` prints it."""

from __future__ import annotations

from lmforge.config.foreign_keys import COMMON, LLAMAFACTORY, TRL, Ignored, Refused, Rule, Special, Target

SECTIONS = (
    ("Keys of both (transformers' `TrainingArguments` and the model)", COMMON),
    ("LLaMA-Factory keys", LLAMAFACTORY),
    ("TRL keys (`trl sft`, `trl dpo`, ...)", TRL),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row(key: str, rule: Rule) -> str:
    if isinstance(rule, Target):
        return f"| `{key}` | {', '.join(f'`{k}`' for k in rule.keys)} | |"
    if isinstance(rule, Special):
        where = ", ".join(f"`{k}`" for k in rule.keys) or "(lmforge's own behaviour)"
        return f"| `{key}` | {where} | {_cell(rule.note)} |"
    if isinstance(rule, Ignored):
        return f"| `{key}` | ignored | {_cell(rule.why)} |"
    assert isinstance(rule, Refused)
    return f"| `{key}` | **no equivalent** | {_cell(rule.what_to_do)} |"


def mapping_markdown() -> str:
    parts = []
    for title, table in SECTIONS:
        parts += [f"### {title}", "", "| Key | lmforge | Note |", "|---|---|---|"]
        parts += [_row(key, rule) for key, rule in table.items()]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    print(mapping_markdown(), end="")
