"""The Train form as data: the fields users touch most, turned into the same YAML config the CLI takes
(and back), checked by lmforge's own config schema, and a preview of the first records as the chosen
stage will see them, loss-carrying tokens marked."""

from __future__ import annotations

import html
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.config.load import from_dict
from lmforge.config.safe_yaml import safe_load
from lmforge.config.schema import STAGES, ConfigError, StageConfig

METHODS = ["full", "freeze", "lora", "dora", "qlora"]
DPO_LOSSES = ["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"]


@dataclass
class TrainForm:
    stage: str = "sft"
    model: str = "smollm2-135m-instruct"
    """A folder, a GGUF file, a short name, a previous artifact, or `scratch:PRESET`."""
    tokenizer: str = ""
    """For scratch models: a tokenizer folder."""
    data: str = ""
    """Files, folders or dataset_info.json entries, comma-separated."""
    dataset_dir: str = ""
    """The folder of a LLaMA-Factory dataset_info.json, for datasets named by entry."""
    method: str = "lora"
    lr: float = 1e-4
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 1024
    lora_r: int = 8
    dpo_loss: str = "sigmoid"
    output_dir: str = "runs/webui"
    seed: int = 42


def form_to_config(form: TrainForm, root: Path) -> dict:
    """The YAML-ready config for `lmforge train STAGE`; every path checked to lie under `root`."""
    if form.stage not in STAGES:
        raise ConfigError(f"stage {form.stage!r}: expected one of {', '.join(STAGES)}")
    model: dict = {}
    if form.model.startswith("scratch:"):
        model = {"scratch": form.model.split(":", 1)[1], "tokenizer": checked_path(form.tokenizer, root)}
    else:
        from lmforge.models.load import SHORT_NAMES  # imported on use: it brings torch

        # Anything but a short name is a path, even without a slash: ".." names the parent folder.
        name = form.model.strip()
        model = {"name_or_path": name if name in SHORT_NAMES else checked_path(name, root)}
    if form.method != "full":
        model["finetuning"] = form.method
    info_dir = checked_path(form.dataset_dir, root) if form.dataset_dir.strip() else None
    files = [dataset_spec(part.strip(), root, info_dir) for part in form.data.split(",") if part.strip()]
    if not files:
        raise ConfigError("choose at least one dataset (a file, a folder or a dataset_info.json entry)")
    data = {"train": files if len(files) > 1 else files[0], "max_length": int(form.max_length)}
    if info_dir is not None:
        data["dataset_dir"] = info_dir
    config = {"stage": form.stage, "model": model, "data": data,
              "train": {"output_dir": checked_path(form.output_dir, root, must_exist=False), "lr": float(form.lr),
                        "epochs": float(form.epochs), "batch_size": int(form.batch_size), "seed": int(form.seed)}}
    if form.method in ("lora", "dora", "qlora"):
        config["lora"] = {"r": int(form.lora_r)}
    if form.stage == "dpo":
        config["dpo"] = {"loss": form.dpo_loss}
    validate(config)
    return config


def config_to_form(config: dict) -> TrainForm:
    """Fill the form from a config (a YAML pasted or loaded back); fields it does not set keep defaults."""
    model, data, train = config.get("model", {}), config.get("data", {}), config.get("train", {})
    form = TrainForm()
    form.stage = config.get("stage", form.stage)
    if model.get("scratch"):
        form.model, form.tokenizer = f"scratch:{model['scratch']}", model.get("tokenizer", "")
    elif model.get("name_or_path"):
        form.model = model["name_or_path"]
    form.method = model.get("finetuning", "full")
    specs = data.get("train", [])
    specs = specs if isinstance(specs, list) else [specs]
    form.data = ", ".join(s if isinstance(s, str) else s.get("path") or s.get("name", "") for s in specs)
    form.dataset_dir = data.get("dataset_dir", "") or ""
    form.max_length = data.get("max_length", form.max_length)
    for name in ("lr", "epochs", "batch_size", "seed", "output_dir"):
        setattr(form, name, train.get(name, getattr(form, name)))
    form.lora_r = config.get("lora", {}).get("r", form.lora_r)
    form.dpo_loss = config.get("dpo", {}).get("loss", form.dpo_loss)
    return form


def dataset_spec(part: str, root: Path, info_dir: str | None):
    """A file or folder under `root`, or, with a dataset_info.json folder chosen, an entry of it by name."""
    if info_dir is not None and not (root / part).exists() and "/" not in part:
        import json

        entries = json.loads((root / info_dir / "dataset_info.json").read_text(encoding="utf-8"))
        if part not in entries:
            raise ConfigError(f"{part}: not a file under {root} nor an entry of {info_dir}/dataset_info.json")
        return {"name": part}
    return checked_path(part, root)


def validate(config: dict) -> StageConfig:
    """The typed config the CLI would build from this dict: the same errors, raised here."""
    return from_dict(StageConfig, yaml.safe_load(yaml.safe_dump(config)), where="the form")


def to_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


MAX_CONFIG_BYTES = 256 * 1024
"""A config longer than this is not something a person typed: refused unread."""


def from_yaml(text: str, where: str = "the YAML") -> dict:
    """A config's text as a mapping: bounded, without YAML aliases (a few bytes of anchors expand to
    gigabytes), every problem in one line naming the line."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected YAML text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: over {MAX_CONFIG_BYTES // 1024} KiB; a config is shorter than that")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"{where}: line {event.start_mark.line + 1} uses a YAML alias (*name); the web UI "
                                  "takes configs without anchors and aliases: write the values out")
        config = safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{where}: the YAML does not parse{line}: {problem}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: the YAML must be a mapping of config groups (stage, model, data, train, ...)")
    return config


def checked_path(value: str, root: Path, must_exist: bool = True) -> str:
    """`value` as a path under `root` (the folder the app was started for): typed paths may not reach
    outside it, through `..`, an absolute path or a link."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("a path is empty")
    root = root.resolve()
    try:  # a NUL byte, an unpaired surrogate, a link loop or a name too long: refused like any bad path
        path = Path(value.strip())
        os.fsencode(path)
        resolved = (path if path.is_absolute() else root / path).resolve()
        exists = resolved.exists()
        # resolve() stops at a link loop and returns the rest unresolved ("loop/../out/x" comes back as
        # root/out/x with `out` still a link): a result with a link left in it is not trusted.
        unresolved = any(part.is_symlink() for part in (resolved, *resolved.parents))
    except (ValueError, OSError, RuntimeError) as error:  # UnicodeError is a ValueError
        raise ConfigError(f"{value!r}: not a usable path ({error})") from None
    if unresolved:
        raise ConfigError(f"{value}: goes through a link loop")
    if resolved != root and root not in resolved.parents:
        raise ConfigError(f"{value}: outside the folder this app serves ({root})")
    if must_exist and not exists:
        raise ConfigError(f"{value}: no such file or folder under {root}")
    return str(resolved.relative_to(root)) if resolved != root else "."


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
