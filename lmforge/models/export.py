"""`lmforge export MODEL --out DIR`: a plain Hugging Face folder that transformers loads with no lmforge
and no peft installed — LoRA/DoRA adapters (and chains of them) merged into the weights, an optional
dtype cast, safetensors shards, the tokenizer with its chat template, and a generation config that
stops at the end of a turn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmforge.config.errors import ConfigError
from lmforge.config.schema import ModelConfig
from lmforge.data.templates import end_of_turn_ids
from lmforge.models.gguf_export import gguf_name, write_gguf
from lmforge.models.load import DTYPES, SHORT_NAMES, load_model_and_tokenizer
from lmforge.models.load import packaged_file as packaged_file

EXPORT_DTYPES = {name: dtype for name, dtype in DTYPES.items() if name != "auto"}


def source_gguf(source: str) -> Path | None:
    """The GGUF file the weights of `source` first came from, followed through the artifacts' manifests
    (each names the model it was trained from), or None when they did not come from one."""
    seen: set[str] = set()
    current: str | None = source
    while current and current not in seen:
        seen.add(current)
        if current in SHORT_NAMES:
            return packaged_file(*SHORT_NAMES[current])
        if current.endswith(".gguf") and Path(current).is_file():
            return Path(current)
        manifest = Path(current) / "lmforge.json"
        if not manifest.is_file():
            return None
        try:
            model = json.loads(manifest.read_text(encoding="utf-8")).get("config", {}).get("model", {})
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(model, dict):
            return None
        if model.get("gguf_file"):
            found = [Path(model["gguf_file"]), Path(model.get("name_or_path") or ".") / model["gguf_file"]]
            return next((path for path in found if path.is_file()), None)
        current = model.get("name_or_path")
    return None


def export_model(source: str, out: str | Path, dtype: str | None = None, max_shard_size: str = "2GB",
                 gguf: bool = False) -> Path:
    """Write `source` (a folder, an adapter artifact, a GGUF short name) to `out` as a merged HF folder,
    and with `gguf` also as `out/model-<dtype>.gguf`."""
    out = Path(out)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new folder (nothing is overwritten)")
    # Loading an adapter artifact merges it (and every adapter it was trained on) into its base.
    model, tokenizer, _ = load_model_and_tokenizer(ModelConfig(name_or_path=source))
    if dtype is not None:
        model = model.to(EXPORT_DTYPES[dtype])
    model.config.use_cache = True
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if gguf:  # named as the export is, not as its temporary folder
        write_gguf(model, tokenizer, tmp / gguf_name(model.dtype), name=out.name, source=source_gguf(source))
    manifest = Path(source) / "lmforge.json"
    if manifest.is_file():  # where the weights came from, for whoever deploys them
        record = json.loads(manifest.read_text(encoding="utf-8"))
        (tmp / "lmforge_source.json").write_text(json.dumps(
            {"source": str(source), "stage": record.get("stage"), "parent": record.get("parent"),
             "dtype": str(model.dtype).replace("torch.", "")}, indent=2), encoding="utf-8")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out

