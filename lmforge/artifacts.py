"""What a stage leaves behind, and how lmforge reads it back.

An artifact is a plain Hugging Face folder plus `lmforge.json` (the manifest: stage, config, parent, the
digests of the artifacts it read, data counts, metrics, versions). The manifest is written last, so its
presence marks a complete artifact. Next to it, `checkpoints/checkpoint-N` hold a run that can resume; a
checkpoint is complete when its `trainer_state.json` exists. Stages write these; the pipeline, evaluation,
the report and the web UI read them through this module, so none of them needs the layer that writes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
from pathlib import Path

from lmforge.config.errors import ConfigError
from lmforge.config.load import from_dict, read_yaml, to_dict
from lmforge.config.schema import RL_STAGES, StageConfig

MANIFEST = "lmforge.json"
STATE_FILE = "trainer_state.json"  # its presence marks a complete checkpoint


def write_json_atomic(path: Path, data: dict) -> None:
    """Whole or not at all: written beside, then moved in."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(folder: str | Path | None) -> dict:
    """The artifact's manifest, or {} when the folder holds no complete artifact."""
    path = Path(folder) / MANIFEST if folder else None
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else {}


def parent_manifest_digest(model_path: str | None) -> str | None:
    """A digest of the parent artifact's manifest: it changes whenever the parent is retrained, and not
    when evaluation results are added to it (its "eval" entry)."""
    manifest = read_manifest(model_path)
    if not manifest:
        return None
    manifest.pop("eval", None)
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def input_manifest_digests(cfg: StageConfig) -> dict:
    """Digests of the other artifacts a stage read (RL: its reward models; distill: its teacher): retraining one
    makes it stale."""
    if cfg.stage == "distill":
        return {cfg.distill.teacher: parent_manifest_digest(cfg.distill.teacher)}
    if cfg.stage not in RL_STAGES:
        return {}
    return {spec.path: parent_manifest_digest(spec.path) for spec in cfg.rl.reward_specs() if spec.kind == "model"}


def chain_adapter(model, cfg: StageConfig) -> None:
    """An adapter trained on a merged parent adapter is an adapter over that parent, not over the
    original base: record the parent folder as its base, so loading it merges the whole chain."""
    parent = cfg.model.name_or_path
    if hasattr(model, "peft_config") and cfg.model.parent_adapter == "merge" and parent \
            and (Path(parent) / "adapter_config.json").is_file():
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = parent


def library_versions() -> dict:
    """The versions a manifest records (imported here, on use: readers of artifacts need none of them)."""
    import accelerate
    import peft
    import torch
    import transformers

    import lmforge

    return {"lmforge": lmforge.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}


def comparable_config(config: dict | None) -> dict | None:
    """The config without the resume switches, which say how a run got done, not what it did. A recorded
    config is read back through the schema first, so a field added to lmforge since (at its default)
    does not make every finished stage look changed after an upgrade."""
    if config is None:
        return None
    try:
        config = to_dict(from_dict(StageConfig, copy.deepcopy(config), where="recorded config"))
    except (ConfigError, TypeError, ValueError):
        config = copy.deepcopy(config)  # a field since removed or renamed: compare as written
    config.get("train", {}).pop("resume", None)
    config.get("train", {}).pop("resume_from", None)
    return config


def is_done(cfg: StageConfig) -> bool:
    """Done when the artifact exists with the same config and was built from the parent as it is now
    (a retrained parent, reward model or teacher makes every stage after it stale)."""
    recorded = read_manifest(cfg.train.output_dir)
    if not recorded:
        return False
    same_config = comparable_config(recorded.get("config")) == comparable_config(to_dict(cfg))
    same_inputs = recorded.get("input_manifests", {}) == input_manifest_digests(cfg)
    return same_config and same_inputs and \
        recorded.get("parent_manifest") == parent_manifest_digest(cfg.model.name_or_path)


def same_config_started(cfg: StageConfig) -> bool:
    """Whether the checkpoints in the output folder were written under this config."""
    started = Path(cfg.train.output_dir) / "config.yaml"
    if not started.is_file():
        return False
    return comparable_config(read_yaml(started)) == comparable_config(to_dict(cfg))


def set_aside(folder: Path) -> Path:
    """Move an outdated stage folder out of the way instead of deleting anyone's work."""
    n = 1
    while folder.with_name(f"{folder.name}.old-{n}").exists():
        n += 1
    target = folder.with_name(f"{folder.name}.old-{n}")
    folder.rename(target)
    return target


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Half-written temporary folders are ignored."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoint_dir(output_dir))
    return found[-1] if found else None
