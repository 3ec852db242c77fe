"""`lmforge export MODEL --out DIR`: a plain Hugging Face folder that transformers loads with no lmforge
and no peft installed — LoRA/DoRA adapters (and chains of them) merged into the weights, an optional
dtype cast, safetensors shards, the tokenizer with its chat template, and a generation config that
stops at the end of a turn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmforge.config.schema import ConfigError, ModelConfig
from lmforge.data.templates import end_of_turn_ids
from lmforge.models.gguf_export import gguf_name, write_gguf
from lmforge.models.load import DTYPES, load_model_and_tokenizer

EXPORT_DTYPES = {name: dtype for name, dtype in DTYPES.items() if name != "auto"}


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
    if gguf:
        write_gguf(model, tokenizer, tmp / gguf_name(model.dtype))
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

