"""`lmforge run PIPELINE.yaml`: prepare the data and tokenizer, run the stages, evaluate, report.

A pipeline file names its run folder, an optional demo world and tokenizer to build, a list of
stages and an optional `eval:` block. Each stage holds a normal stage config; `from: NAME` starts it
from an earlier stage's artifact and `reward_model: NAME` scores with one, so stages form a graph
(two stages may start from the same parent). Strings may use `${run_dir}`. A stage whose artifact
exists with the same config and inputs is skipped; one that broke resumes from its newest checkpoint;
`--from`/`--only` force stages to run again. The run folder ends up holding every artifact, the
resolved pipeline (`pipeline.yaml`), the run's record (`run.json`) and `report.html`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console

from lmforge.artifacts import (
    MANIFEST,
    is_done,
    latest_checkpoint,
    read_manifest,
    same_config_started,
    set_aside,
)
from lmforge.config.errors import ConfigError
from lmforge.config.load import apply_override, from_dict, read_yaml
from lmforge.config.schema import StageConfig
from lmforge.eval.spec import EvalSpec
from lmforge.eval.suite import EvalCache
from lmforge.pipeline.evaluate import evaluate_stage, evaluate_start, load_eval_block
from lmforge.pipeline.state import RunState
from lmforge.stages import STAGE_RUNNERS

STAGE_KEYS = {"name", "stage", "config", "from", "reward_model", "teacher", "eval"}


@dataclass
class PipelineStage:
    name: str
    stage: str
    config: dict = field(default_factory=dict)
    from_: str | None = None
    reward_model: str | None = None
    """RL stages: the pipeline stage whose artifact is the reward model (`reward_model: rm`)."""
    eval: bool | dict = True
    """false: no evaluation of this stage; a mapping: changes to the pipeline's eval block for it."""
    teacher: str | None = None
    """distill: the pipeline stage whose artifact is the teacher (`teacher: sft`)."""


@dataclass
class Pipeline:
    run_dir: str
    demo_world: dict | None
    tokenizer: dict | None
    stages: list[PipelineStage]
    eval: EvalSpec | None = None
    source: str = ""
    resolved: dict = field(default_factory=dict)
    """The pipeline as it runs (overrides applied, ${run_dir} filled in): saved as run_dir/pipeline.yaml."""


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> Pipeline:
    raw = read_yaml(path)
    for item in overrides or []:
        _override(raw, item, path)
    unknown = set(raw) - {"run_dir", "demo_world", "tokenizer", "stages", "eval"}
    if unknown:
        raise ConfigError(f"{path}: unknown pipeline keys {sorted(unknown)} "
                          "(run_dir, demo_world, tokenizer, stages, eval)")
    run_dir = str(raw.get("run_dir", "runs/pipeline"))
    stages = []
    for i, item in enumerate(raw.get("stages") or []):
        if not isinstance(item, dict) or set(item) - STAGE_KEYS or "stage" not in item:
            raise ConfigError(f"{path}: stages[{i}] needs `stage` and takes {', '.join(sorted(STAGE_KEYS))} "
                              f"(got {sorted(item) if isinstance(item, dict) else item!r})")
        stage_eval = item.get("eval", True)
        if not isinstance(stage_eval, (bool, dict)):
            raise ConfigError(f"{path}: stages[{i}].eval must be true, false or a mapping of eval settings")
        stages.append(PipelineStage(item.get("name", item["stage"]), item["stage"], item.get("config") or {},
                                    item.get("from"), item.get("reward_model"), stage_eval, item.get("teacher")))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique (got {', '.join(names)})")
    for stage in stages:
        for ref in (stage.from_, stage.reward_model, stage.teacher):
            if ref is not None and ref not in names[:names.index(stage.name)]:
                raise ConfigError(f"{path}: stage {stage.name} refers to {ref!r}, which is not an earlier stage "
                                  f"(earlier: {', '.join(names[:names.index(stage.name)]) or 'none'})")
    eval_spec = load_eval_block(_substitute(raw.get("eval"), run_dir), names, f"{path}: eval")
    pipeline = Pipeline(run_dir, raw.get("demo_world"), raw.get("tokenizer"), stages, eval_spec, str(path),
                        _substitute(raw, run_dir))
    for stage in stages:  # validate every stage config (and its eval changes) before anything runs
        stage_config(pipeline, stage)
        if isinstance(stage.eval, dict) and eval_spec is not None:
            from_dict(EvalSpec, {**dataclasses.asdict(eval_spec), **stage.eval}, where=f"stages.{stage.name}.eval")
    return pipeline


def _override(raw: dict, item: str, path) -> None:
    """Dotted overrides; `stages.NAME.…` (or `stages.INDEX.…`) reaches into one stage:
    `stages.dpo.config.dpo.beta=0.3`."""
    key = item.partition("=")[0].strip()
    if not key.startswith("stages."):
        apply_override(raw, item)
        return
    _, ref, rest = key.split(".", 2) if key.count(".") >= 2 else (*key.split("."), "")
    stages = raw.get("stages") or []
    found = [s for i, s in enumerate(stages) if isinstance(s, dict) and ref in (s.get("name", s.get("stage")), str(i))]
    if not found or not rest:
        names = ", ".join(str(s.get("name", s.get("stage"))) for s in stages if isinstance(s, dict))
        raise ConfigError(f"override {item!r}: expected stages.NAME.key=value with NAME one of {names} ({path})")
    apply_override(found[0], f"{rest}={item.partition('=')[2]}")


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
    if stage.teacher:
        raw.setdefault("distill", {})["teacher"] = str(Path(pipeline.run_dir) / stage.teacher)
    return from_dict(StageConfig, raw, where=f"stages.{stage.name}.config")


def _selected(pipeline: Pipeline, start: str | None, only: str | None) -> tuple[set[str], set[str]]:
    """(stages to visit, stages forced to run again) for `--from STAGE` / `--only STAGE`."""
    names = [s.name for s in pipeline.stages]
    for flag, name in (("--from", start), ("--only", only)):
        if name is not None and name not in names:
            raise ConfigError(f"{flag} {name}: no such stage (stages: {', '.join(names)})")
    if only is not None:
        return {only}, {only}
    if start is not None:
        later = set(names[names.index(start):])
        return later, later
    return set(names), set()


def _prepare(pipeline: Pipeline, state: RunState, console: Console) -> None:
    """The demo world and the tokenizer, built once; rebuilt (the old folder set aside) when their
    settings change, so a changed `sft_noise` never trains on the old data."""
    run_dir = Path(pipeline.run_dir)
    if pipeline.demo_world is not None and _needs_build(run_dir / "world", pipeline.demo_world, console):
        from lmforge.demo.write import write_demo_world

        started, seed = time.time(), int(pipeline.demo_world.get("seed", 0))
        with _built_in_place(run_dir / "world", pipeline.demo_world) as partial:
            write_demo_world(partial, seed=seed, sft_noise=float(pipeline.demo_world.get("sft_noise", 0.0)),
                             arith_reps=int(pipeline.demo_world.get("arith_reps", 1)),
                             sft_noise_style=str(pipeline.demo_world.get("sft_noise_style", "mixed")))
        state.data["prepare"]["world"] = round(time.time() - started, 1)
        console.print(f"[bold]world[/] generated in {run_dir / 'world'} (seed {seed})")
    if pipeline.tokenizer is not None and _needs_build(run_dir / "tokenizer", pipeline.tokenizer, console):
        from lmforge.models.tokenizer import train_tokenizer

        started, spec = time.time(), _substitute(pipeline.tokenizer, str(run_dir))
        with _built_in_place(run_dir / "tokenizer", pipeline.tokenizer) as partial:
            train_tokenizer(spec["train"], partial, vocab_size=int(spec.get("vocab_size", 4000)),
                            split_han_chars=bool(spec.get("split_han_chars", False)))
        state.data["prepare"]["tokenizer"] = round(time.time() - started, 1)
        console.print(f"[bold]tokenizer[/] trained into {run_dir / 'tokenizer'}")
    state.save()


@contextmanager
def _built_in_place(folder: Path, settings: dict):
    """Build into a scratch folder that takes the final name, with its settings record, in one rename:
    a run killed while building leaves no half-built world or tokenizer that the next run would trust."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    _mark_built(partial, settings)
    os.rename(partial, folder)


BUILT = "lmforge-built.json"


def _needs_build(folder: Path, settings: dict, console: Console) -> bool:
    if not folder.exists():
        return True
    marker = folder / BUILT
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == settings:
        return False
    if not marker.is_file() and any(folder.iterdir()):
        return False  # built by an older lmforge that left no record: keep using it
    console.print(f"[yellow]{folder.name}: settings changed; old folder kept as {set_aside(folder)}[/]")
    return True


def _mark_built(folder: Path, settings: dict) -> None:
    (folder / BUILT).write_text(json.dumps(settings, sort_keys=True), encoding="utf-8")


def _run_stage(stage: PipelineStage, cfg: StageConfig, forced: bool, console: Console) -> tuple[dict, bool]:
    """(the stage's metrics, whether it was skipped as done)."""
    if not forced and is_done(cfg):
        console.print(f"[bold]{stage.name}[/]: done before with the same config, skipped")
        return json.loads((Path(cfg.train.output_dir) / MANIFEST).read_text())["metrics"], True
    out = Path(cfg.train.output_dir)
    if out.exists() and forced:
        console.print(f"[yellow]{stage.name}: run again as asked; old folder kept as {set_aside(out)}[/]")
    elif out.exists() and not same_config_started(cfg):
        console.print(f"[yellow]{stage.name}: config or inputs changed; old folder kept as {set_aside(out)}[/]")
    elif out.exists() and (out / MANIFEST).is_file():
        console.print(f"[yellow]{stage.name}: its parent changed; old folder kept as {set_aside(out)}[/]")
    elif latest_checkpoint(out) is not None:
        cfg.train.resume = True
    console.rule(f"[bold]{stage.name}[/] ({stage.stage})")
    return STAGE_RUNNERS[stage.stage](cfg), False


def run_pipeline(pipeline: Pipeline, console: Console | None = None, start: str | None = None,
                 only: str | None = None, report: bool = True) -> dict[str, dict]:
    console = console or Console()
    visit, forced = _selected(pipeline, start, only)
    run_dir = Path(pipeline.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(pipeline.resolved, sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
    state = RunState(run_dir, pipeline.source, pipeline.stages)
    cache = EvalCache()
    _prepare(pipeline, state, console)
    results = {}
    try:
        for stage in pipeline.stages:
            cfg = stage_config(pipeline, stage)
            if stage.name not in visit:
                done = (Path(cfg.train.output_dir) / MANIFEST).is_file()
                state.update(stage.name, status="skipped" if done else "pending",
                             seconds=read_manifest(cfg.train.output_dir).get("seconds", 0.0))
                continue
            for needed in (stage.from_, stage.reward_model, stage.teacher):
                if needed and not (run_dir / needed / MANIFEST).is_file():
                    raise ConfigError(f"stage {stage.name} needs {needed!r}, which has not finished yet: "
                                      f"run it first (lmforge run {pipeline.source} --only {needed})")
            state.update(stage.name, status="running")
            started = time.time()
            try:
                results[stage.name], skipped = _run_stage(stage, cfg, stage.name in forced, console)
            except BaseException as exc:  # a Ctrl-C or SIGTERM is recorded as a stop, resumable as is
                state.stopped(stage.name, exc, round(time.time() - started, 1), f"lmforge run {pipeline.source}")
                raise
            # A skipped stage shows the time it took when it ran (its manifest's), not the check's.
            seconds = read_manifest(cfg.train.output_dir).get("seconds", 0.0) if skipped else round(time.time() - started, 1)
            state.update(stage.name, status="skipped" if skipped else "done", seconds=seconds)
            _evaluate(pipeline, stage, state, cache, console)
        for stage in pipeline.stages:  # what became possible later: the SFT model's reward once the RM exists
            _evaluate(pipeline, stage, state, cache, console)
        before = evaluate_start(pipeline.eval, stage_config(pipeline, pipeline.stages[0]), run_dir, cache,
                                lambda message: console.print(f"[dim]{message}[/]"))
        if before is not None:
            state.data["start_eval"] = before
    finally:
        state.save()
        if report:
            _write_report(run_dir, console)
    return results


def _evaluate(pipeline: Pipeline, stage: PipelineStage, state: RunState, cache: EvalCache, console: Console) -> None:
    evaluate_stage(pipeline.eval, stage, Path(pipeline.run_dir), cache,
                   lambda message: console.print(f"[dim]{message}[/]"))
    recorded = read_manifest(stage_config(pipeline, stage).train.output_dir).get("eval") or {}
    state.update(stage.name, eval_seconds=round(recorded.get("seconds", 0.0), 1))


def _write_report(run_dir: Path, console: Console) -> None:
    from lmforge.report.html import summary_lines, write_report

    try:
        path = write_report(run_dir)
    except Exception as exc:  # a report that cannot be drawn must not hide the run's own outcome
        console.print(f"[yellow]report not written: {exc}[/]")
        return
    console.rule("[bold]summary")
    for line in summary_lines(run_dir):  # whole lines: a wrapped path cannot be copied
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"report: {path}", soft_wrap=True)
