"""LLaMA-Factory's `dataset_info.json` as a dataset source: `name:` entries resolve to files + formats."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.config.schema import DatasetSpec
from lmforge.data.errors import DataError
from lmforge.data.formats import RowFormat

KNOWN_KEYS = {"file_name", "formatting", "columns", "tags", "ranking", "hf_hub_url", "ms_hub_url", "om_hub_url",
              "script_url", "subset", "split", "folder", "num_samples", "cloud_file_name"}


def resolve_spec(spec: DatasetSpec, dataset_dir: str | None, preference: bool | None = False) -> tuple[str, RowFormat]:
    """A dataset spec → (path, row format), reading dataset_info.json for `name:` specs. `preference`: whether
    the entry must be preference data (True), must not be (False), or may be either (None: RL prompts)."""
    if spec.path is not None:
        return spec.path, RowFormat(spec.formatting, dict(spec.columns), dict(spec.tags), dict(spec.replacements),
                                    spec.max_samples)
    info_dir = Path(dataset_dir or ".")
    info_path = info_dir / "dataset_info.json"
    entry = read_registry(info_path).get(spec.name)
    if entry is None:
        raise DataError(str(info_path), f"entry {spec.name!r}", "no such dataset (check the name and data.dataset_dir)")
    if not isinstance(entry, dict):
        raise DataError(str(info_path), f"entry {spec.name!r}", f"must be an object, got {type(entry).__name__}")
    if "file_name" not in entry:
        hub = entry.get("hf_hub_url") or entry.get("ms_hub_url") or "a hub"
        raise DataError(str(info_path), f"entry {spec.name!r}",
                        f"points to {hub}; lmforge reads local files only (download it and set file_name)")
    unknown = set(entry) - KNOWN_KEYS
    if unknown:
        raise DataError(str(info_path), f"entry {spec.name!r}", f"unknown keys {sorted(unknown)}")
    _check_entry_types(entry, f"entry {spec.name!r}", str(info_path))
    unsupported = {k for k in ("subset", "folder", "script_url", "cloud_file_name") if k in entry}
    if entry.get("split", "train") != "train":
        unsupported.add("split")
    if unsupported:
        raise DataError(str(info_path), f"entry {spec.name!r}",
                        f"uses {sorted(unsupported)}, which only apply to hub datasets; point file_name at the local file")
    is_preference = bool(entry.get("ranking")) or "kto_tag" in entry.get("columns", {})
    if preference is not None and is_preference != preference:
        problem = ("is preference data (ranking or KTO labels); PT and SFT cannot train on it" if is_preference
                   else "is not preference data (no `ranking: true` or kto_tag column); rm/dpo need pairs")
        raise DataError(str(info_path), f"entry {spec.name!r}", problem)
    columns = {**entry.get("columns", {}), **spec.columns}
    tags = {**entry.get("tags", {}), **spec.tags}
    formatting = spec.formatting if spec.formatting != "auto" else entry.get("formatting", "alpaca")
    if formatting == "alpaca" and set(columns) == {"prompt"}:
        # LLaMA-Factory marks raw-text corpora (wiki_demo, c4_demo) as alpaca with only a prompt column.
        formatting = "text"
    if formatting not in ("alpaca", "sharegpt", "openai", "text"):
        raise DataError(str(info_path), f"entry {spec.name!r}", f"unknown formatting {formatting!r}")
    limit = spec.max_samples if spec.max_samples is not None else entry.get("num_samples")
    fmt = RowFormat(formatting, columns, tags, dict(spec.replacements), limit)
    return str(info_dir / entry["file_name"]), fmt


def _check_entry_types(entry: dict, where: str, source: str) -> None:
    """The types LLaMA-Factory documents for an entry, so a typo fails here, naming the key, and not
    later as a Python error about some record."""
    if not isinstance(entry["file_name"], str) or not entry["file_name"].strip():
        raise DataError(source, where, f"file_name must be a file or folder name, got {entry['file_name']!r}")
    for key in ("columns", "tags"):
        value = entry.get(key, {})
        if not isinstance(value, dict):
            raise DataError(source, where, f"{key} must be an object of names, got {type(value).__name__}")
        bad = {k: v for k, v in value.items() if not isinstance(v, str)}
        if bad:
            name, value = next(iter(bad.items()))
            raise DataError(source, where, f"{key}.{name} must be a column or tag name (a string), got {value!r}")
    if not isinstance(entry.get("formatting", "alpaca"), str):
        raise DataError(source, where, f"formatting must be a string, got {entry['formatting']!r}")
    samples = entry.get("num_samples")
    if samples is not None and (type(samples) is not int or samples < 1):
        raise DataError(source, where, f"num_samples must be a positive whole number, got {samples!r}")


def read_registry(path: Path) -> dict:
    if not path.is_file():
        raise DataError(str(path), "file", "dataset_info.json not found (set data.dataset_dir)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(str(path), f"line {line}", f"invalid UTF-8 ({exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), f"line {exc.lineno}", f"invalid JSON ({exc.msg})") from None
    except (RecursionError, ValueError) as exc:  # nested past the recursion limit, over-long integers
        problem = "values nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(":")[0]
        raise DataError(str(path), "line 1", f"invalid JSON ({problem})") from None
    if not isinstance(data, dict):
        raise DataError(str(path), "top level", "expected an object of dataset entries")
    return data
