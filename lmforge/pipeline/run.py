"""`lmforge run PIPELINE.yaml`: prepare the data and tokenizer, then run stages in order.

A pipeline file names its run folder, an optional demo world and tokenizer to build, and a list
of stages. Each stage holds a normal stage config; `from: NAME` starts it from an earlier stage's
artifact. Strings may use `${run_dir}`. A stage whose artifact exists with the same config is
skipped; one that broke resumes from its newest checkpoint.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console

from lmforge.config.load import apply_override, from_dict, read_yaml, to_dict
from lmforge.config.schema import ConfigError, StageConfig
from lmforge.loop.checkpoint import latest_checkpoint
from lmforge.stages import STAGE_RUNNERS
from lmforge.stages.common import MANIFEST, input_manifest_digests, parent_manifest_digest


@dataclass
class PipelineStage:
    name: str
    stage: str
    config: dict = field(default_factory=dict)
    from_: str | None = None
    reward_model: str | None = None
    """RL stages: the pipeline stage whose artifact is the reward model (`reward_model: rm`)."""


@dataclass
class Pipeline:
    run_dir: str
    demo_world: dict | None
    tokenizer: dict | None
    stages: list[PipelineStage]


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    unknown = set(raw) - {"run_dir", "demo_world", "tokenizer", "stages"}
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline keys {sorted(unknown)} (run_dir, demo_world, tokenizer, stages)")
    run_dir = str(raw.get("run_dir", "runs/pipeline"))
    stages = []
    for i, item in enumerate(raw.get("stages") or []):
        extra = set(item) - {"name", "stage", "config", "from", "reward_model"}
        if extra or "stage" not in item:
            raise ConfigError(f"{path}: stages[{i}] needs `stage` and takes name/config/from/reward_model "
                              f"(got {sorted(item)})")
        stages.append(PipelineStage(item.get("name", item["stage"]), item["stage"], item.get("config") or {},
                                    item.get("from"), item.get("reward_model")))
    names = [s.name for s in stages]
    for stage in stages:
        for ref in (stage.from_, stage.reward_model):
            if ref is not None and ref not in names[:names.index(stage.name)]:
                raise ConfigError(f"{path}: stage {stage.name} refers to {ref!r}, which is not an earlier stage "
                                  f"(earlier: {', '.join(names[:names.index(stage.name)]) or 'none'})")
    pipeline = Pipeline(run_dir, raw.get("demo_world"), raw.get("tokenizer"), stages)
    for stage in stages:  # validate every stage config before anything runs
        stage_config(pipeline, stage)
    return pipeline


def _substitute(value, run_dir: str):
    if isinstance(value, str):
        return value.replace("${run_dir}", run_dir)
    if isinstance(value, list):
        return [_substitute(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, run_dir) for k, v in value.items()}
    return value


def stage_config(pipeline: Pipeline, stage: PipelineStage) -> StageConfig:
    raw = _substitute(copy.deepcopy(stage.config), pipeline.run_dir)
    raw["stage"] = stage.stage
    raw.setdefault("train", {})["output_dir"] = str(Path(pipeline.run_dir) / stage.name)
    if stage.from_:
        model = raw.setdefault("model", {})
        model["name_or_path"] = str(Path(pipeline.run_dir) / stage.from_)
        model.pop("scratch", None)
        model.pop("tokenizer", None)
    if stage.reward_model:
        raw.setdefault("rl", {})["reward_model"] = str(Path(pipeline.run_dir) / stage.reward_model)
    return from_dict(StageConfig, raw, where=f"stages.{stage.name}.config")


def _is_done(cfg: StageConfig) -> bool:
    """Done when the artifact exists with the same config and was built from the parent as it is now
    (a retrained parent makes every stage after it stale)."""
    manifest = Path(cfg.train.output_dir) / MANIFEST
    if not manifest.is_file():
        return False
    recorded = json.loads(manifest.read_text(encoding="utf-8"))
    same_config = _comparable(recorded.get("config")) == _comparable(to_dict(cfg))
    same_inputs = recorded.get("input_manifests", {}) == input_manifest_digests(cfg)
    return same_config and same_inputs and \
        recorded.get("parent_manifest") == parent_manifest_digest(cfg.model.name_or_path)


def _same_config_started(cfg: StageConfig) -> bool:
    """Whether the checkpoints in the output folder were written under this config."""
    started = Path(cfg.train.output_dir) / "config.yaml"
    if not started.is_file():
        return False
    return _comparable(yaml.safe_load(started.read_text(encoding="utf-8"))) == _comparable(to_dict(cfg))


def _set_aside(folder: Path) -> Path:
    """Move an outdated stage folder out of the way instead of deleting anyone's work."""
    n = 1
    while folder.with_name(f"{folder.name}.old-{n}").exists():
        n += 1
    target = folder.with_name(f"{folder.name}.old-{n}")
    folder.rename(target)
    return target


def _comparable(config: dict | None) -> dict | None:
    """The config without the resume switches, which say how a run got done, not what it did."""
    if config is None:
        return None
    config = copy.deepcopy(config)
    config.get("train", {}).pop("resume", None)
    config.get("train", {}).pop("resume_from", None)
    return config


def run_pipeline(pipeline: Pipeline, console: Console | None = None) -> dict[str, dict]:
    console = console or Console()
    run_dir = Path(pipeline.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if pipeline.demo_world is not None:
        from lmforge.data.demo_world import write_demo_world

        seed = int(pipeline.demo_world.get("seed", 0))
        if not (run_dir / "world" / "world.json").is_file():
            write_demo_world(run_dir / "world", seed=seed,
                             sft_noise=float(pipeline.demo_world.get("sft_noise", 0.0)),
                             arith_reps=int(pipeline.demo_world.get("arith_reps", 1)))
            console.print(f"[bold]world[/] generated in {run_dir / 'world'} (seed {seed})")
    if pipeline.tokenizer is not None and not (run_dir / "tokenizer" / "tokenizer_config.json").is_file():
        from lmforge.models.tokenizer import train_tokenizer

        spec = _substitute(pipeline.tokenizer, str(run_dir))
        train_tokenizer(spec["train"], run_dir / "tokenizer", vocab_size=int(spec.get("vocab_size", 4000)),
                        split_han_chars=bool(spec.get("split_han_chars", False)))
        console.print(f"[bold]tokenizer[/] trained into {run_dir / 'tokenizer'}")
    results = {}
    for stage in pipeline.stages:
        cfg = stage_config(pipeline, stage)
        if _is_done(cfg):
            console.print(f"[bold]{stage.name}[/]: done before with the same config, skipped")
            results[stage.name] = json.loads((Path(cfg.train.output_dir) / MANIFEST).read_text())["metrics"]
            continue
        out = Path(cfg.train.output_dir)
        if out.exists() and not _same_config_started(cfg):
            console.print(f"[yellow]{stage.name}: config or inputs changed; old folder kept as "
                          f"{_set_aside(out)}[/]")
        elif out.exists() and (out / MANIFEST).is_file():
            console.print(f"[yellow]{stage.name}: its parent changed; old folder kept as {_set_aside(out)}[/]")
        elif latest_checkpoint(out) is not None:
            cfg.train.resume = True
        console.rule(f"[bold]{stage.name}[/] ({stage.stage})")
        results[stage.name] = STAGE_RUNNERS[stage.stage](cfg)
    return results
