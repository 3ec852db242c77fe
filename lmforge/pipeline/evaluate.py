"""Evaluation inside a pipeline: after each stage, and once more at the end for what became possible
later (the SFT model's reward, once the reward model exists). Judges are named by stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lmforge.artifacts import MANIFEST, write_json_atomic
from lmforge.config.errors import ConfigError
from lmforge.config.load import from_dict
from lmforge.eval.spec import EvalSpec
from lmforge.eval.suite import EvalCache, evaluate_model, record_eval

START_EVAL = "start_eval.json"

POLICY_STAGES = ("dpo", "ppo", "grpo", "rloo", "distill")
"""Stages that tune a policy away from a parent: they get KL to it and a win-rate against the baseline."""
JUDGE_ROLES = ("reward_model", "baseline", "reference")


def load_eval_block(raw: dict | None, stage_names: list[str], where: str) -> EvalSpec | None:
    if raw is None:
        return None
    spec = from_dict(EvalSpec, raw, where=where)
    for role in JUDGE_ROLES:
        name = getattr(spec, role)
        if name is not None and name not in stage_names:
            raise ConfigError(f"{where}.{role}: {name!r} is not a stage of this pipeline "
                              f"(stages: {', '.join(stage_names)})")
    return spec


def stage_spec(base: EvalSpec, stage, run_dir: Path) -> EvalSpec:
    """The pipeline's eval block for one stage: judges that are finished artifacts, by path."""
    def finished(name: str | None) -> str | None:
        return str(run_dir / name) if name and name != stage.name and (run_dir / name / MANIFEST).is_file() else None

    policy = stage.stage in POLICY_STAGES
    spec = dataclasses.replace(base, reward_model=finished(base.reward_model),
                               baseline=finished(base.baseline) if policy else None,
                               reference=finished(base.reference or stage.from_) if policy else None)
    return dataclasses.replace(spec, **stage.eval) if isinstance(stage.eval, dict) else spec


def evaluate_stage(base: EvalSpec | None, stage, run_dir: Path, cache: EvalCache, log) -> None:
    """Evaluate a finished stage's artifact and store the result in its manifest (suites already up to
    date are not run again)."""
    manifest_path = run_dir / stage.name / MANIFEST
    if base is None or stage.eval is False or not manifest_path.is_file():
        return 0.0
    previous = json.loads(manifest_path.read_text(encoding="utf-8")).get("eval")
    result = evaluate_model(str(run_dir / stage.name), stage_spec(base, stage, run_dir), previous, cache, log)
    if result != previous:
        record_eval(run_dir / stage.name, result)


def evaluate_start(base: EvalSpec | None, root_cfg, run_dir: Path, cache: EvalCache, log) -> dict | None:
    """The "before" column: the first stage's starting model. A pretrained one is evaluated like a stage
    (cached in run_dir/start_eval.json); a model built from scratch has only what its stage measured
    before training (held-out perplexity)."""
    if base is None:
        return None
    if root_cfg.model.scratch:
        manifest_path = Path(root_cfg.train.output_dir) / MANIFEST
        if not manifest_path.is_file():
            return None
        initial = json.loads(manifest_path.read_text(encoding="utf-8"))["metrics"]
        measured = {"perplexity": initial.get("initial_eval_ppl"), "exact_match": initial.get("initial_eval_exact_match")}
        return {"metrics": {k: v for k, v in measured.items() if v is not None}, "samples": []}
    path = run_dir / START_EVAL
    previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    spec = dataclasses.replace(base, baseline=None, reference=None,
                               reward_model=str(run_dir / base.reward_model)
                               if base.reward_model and (run_dir / base.reward_model / MANIFEST).is_file() else None)
    result = evaluate_model(root_cfg.model.name_or_path, spec, previous, cache, log)
    write_json_atomic(path, result)
    return result
