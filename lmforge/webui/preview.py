"""The Train tab's Preview: the first records as the chosen stage will train on them, loss-carrying
tokens marked, masked tokens grey, both sides of a preference pair."""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import yaml

from lmforge.webui.forms import validate


def preview_html(config: dict, root: Path, limit: int = 3) -> str:
    """The first records as the stage will train on them: loss-carrying text highlighted, masked text
    grey, one block per record (both sides of a preference pair)."""
    from lmforge.data.build import load_examples
    from lmforge.data.errors import ErrorLog
    from lmforge.data.inspect import loss_runs
    from lmforge.data.preference import PromptTooLong, encode_pair, pair_rows
    from lmforge.data.tokenize import IGNORE, encode_sft, encode_text
    from lmforge.models.load import load_tokenizer, resolve_model_path

    cfg = validate(_rooted(config, root))
    tokenizer = load_tokenizer(cfg.model, None if cfg.model.scratch else resolve_model_path(cfg.model))
    blocks = []
    with tempfile.TemporaryDirectory() as cache:
        paired = cfg.stage in ("rm", "dpo") and cfg.dpo.loss != "kto"
        records, _ = load_examples(cfg.data.train, cfg.data, ErrorLog("skip"), cache, kind="pair" if paired else "sft")
        for index, record in enumerate(records):
            if index >= limit:
                break
            if paired:
                try:
                    encoded = encode_pair(tokenizer, record, cfg.data.max_length)
                except PromptTooLong as exc:  # the stage drops and counts it under on_error: skip
                    blocks.append(f"<p>⚠ {html.escape(record.get('source', f'record {index}'))}: dropped: "
                                  f"{html.escape(str(exc))}</p>")
                    continue
                sequences = list(zip(("chosen", "rejected"), pair_rows(encoded)))
            elif cfg.stage == "pt" or not record.get("messages"):
                ids = encode_text(tokenizer, record.get("text") or "")[:cfg.data.max_length]
                sequences = [("text", (ids, list(ids)))]
            else:
                encoded = encode_sft(tokenizer, record["messages"], cfg.data.max_length)
                sequences = [("dialogue", (encoded["input_ids"], encoded["labels"]))] if encoded else []
            for name, (ids, labels) in sequences:
                body = "".join(f'<mark class="loss">{html.escape(t)}</mark>' if loss else
                               f'<span class="masked">{html.escape(t)}</span>' for t, loss in loss_runs(tokenizer, ids, labels))
                count = sum(label != IGNORE for label in labels)
                blocks.append(f'<div class="record"><div class="head">record {index} · {name} · {len(ids)} tokens, '
                              f'{count} with loss</div><pre>{body}</pre></div>')
    style = ("<style>.record pre{white-space:pre-wrap} mark.loss{background:#c8f7c5} "
             "span.masked{color:#888} .head{font-weight:bold}</style>")
    return style + ("".join(blocks) or "<p>no records</p>")


def _rooted(config: dict, root: Path) -> dict:
    """Relative paths in the config made absolute against `root` (the app may run from elsewhere)."""
    def fix(value):
        return str(root / value) if isinstance(value, str) and (root / value).exists() else value
    config = yaml.safe_load(yaml.safe_dump(config))
    data = config.get("data", {})
    data["train"] = [fix(v) for v in data["train"]] if isinstance(data.get("train"), list) else fix(data.get("train"))
    if data.get("dataset_dir"):  # named entries are read from there
        data["dataset_dir"] = fix(data["dataset_dir"])
    for key in ("name_or_path", "tokenizer"):
        if key in config.get("model", {}):
            config["model"][key] = fix(config["model"][key])
    return config
