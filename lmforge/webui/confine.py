"""What the web UI lets a visitor run. Every path a stage or pipeline config names (models, GGUF files,
tokenizers, data files and globs, the files dataset_info.json entries point at, output and run folders,
checkpoints, reward and critic models, evaluation files and judges) must lie under --root once links are
resolved; nothing may run code shipped with a model (`trust_remote_code`, a Hub attention kernel) or a
reward function from a module or file unless the app was started with --allow-remote-code. Run and Resume
check the text that is about to run and then run that text from a private copy (runs.Launcher), so a file
changed on disk between the check and the start is never what runs.

Files already under --root are the owner's and trusted as such (a model folder's own config.json, a
dataset_info.json); a visitor cannot add one through the UI, whose Save writes only checked pipelines
(see saving.py)."""

from __future__ import annotations

import glob
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.config.errors import ConfigError
from lmforge.config.schema import StageConfig
from lmforge.webui.forms import MAX_CONFIG_BYTES, checked_path, from_yaml  # noqa: F401  (re-exported)

MAX_MATCHES = 10_000
"""Files a data glob or folder may hold before the check gives up (and refuses) rather than walk on."""
KNOWN_ATTENTION = {"auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention",
                   "lmforge_varlen", "paged_attention", "sdpa_paged", "eager_paged"}
"""attn_implementation values that run no downloaded code (transformers fetches `org/repo` kernels)."""
# Files a model folder holds: the UI never writes among them, nor trains or exports over them.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "adapter_config.json", "*.safetensors",
               "*.bin", "*.gguf", "*.py")
# What lmforge leaves in a folder it wrote (a stage's output, a pipeline's run folder).
LMFORGE_MARKS = ("lmforge.json", "config.yaml", "webui-config.yaml", "run.json", "metrics.jsonl", "checkpoint-*")


@dataclass(frozen=True)
class Rules:
    root: Path
    """The folder the app serves (resolved)."""
    allow_code: bool = False
    """`lmforge webui --allow-remote-code`: configs may run code shipped with models or reward functions."""


def parse(text: str, where: str) -> dict:
    """A config's text as a mapping (forms.from_yaml: bounded, alias-free, one-line errors)."""
    return from_yaml(text, where)


def inside(value, rules: Rules, key: str) -> Path:
    """`value` resolved under the root (relative paths are taken from it: runs start there), or refused
    naming the config key."""
    try:
        return rules.root / checked_path(value if isinstance(value, str) else repr(value), rules.root,
                                         must_exist=False)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None


def owned_output(value, rules: Rules, key: str) -> Path:
    """An output folder: under the root, not the root itself, and not someone's model folder (a folder of
    model files that no lmforge run wrote), whose files a run or an export would overwrite."""
    path = inside(value, rules, key)
    if path == rules.root:
        raise ConfigError(f"{key}: the served folder itself; choose a folder under it (e.g. runs/NAME)")
    if foreign_model_folder(path):
        raise ConfigError(f"{key}: {path.relative_to(rules.root)} holds a model that no lmforge run wrote; "
                          "choose a new folder")
    return path


def foreign_model_folder(path: Path) -> bool:
    if not path.is_dir():
        return False
    has = lambda patterns: any(next(path.glob(p), None) is not None for p in patterns)  # noqa: E731
    return has(MODEL_FILES) and not has(LMFORGE_MARKS)


def data_files(value, rules: Rules, key: str) -> None:
    """A data path, folder or glob: the pattern and every file it reaches under the root."""
    path = inside(value, rules, key)
    if any(c in str(value) for c in "*?["):
        matches = glob.iglob(str(value) if os.path.isabs(str(value)) else str(rules.root / str(value)), recursive=True)
    elif path.is_dir():
        matches = (str(p) for p in path.rglob("*"))
    else:
        return
    for count, match in enumerate(matches):
        if count >= MAX_MATCHES:
            raise ConfigError(f"{key}: {value} reaches over {MAX_MATCHES} files; name a smaller folder or glob")
        inside(match, rules, key)


def check_stage(cfg: StageConfig, rules: Rules, where: str) -> StageConfig:
    """Refuse a typed stage config that reads or writes outside the root or runs code it may not."""
    model = cfg.model
    if model.trust_remote_code and not rules.allow_code:
        raise ConfigError(f"{where}.model.trust_remote_code: the web UI runs no code shipped with a model; "
                          "start it with `lmforge webui --allow-remote-code` if you trust every file under --root")
    if model.attn_implementation not in KNOWN_ATTENTION and not rules.allow_code:
        raise ConfigError(f"{where}.model.attn_implementation={model.attn_implementation!r}: one of "
                          f"{', '.join(sorted(KNOWN_ATTENTION))} (a Hub kernel needs --allow-remote-code)")
    if any(c in model.template for c in "/\\") or ".." in model.template:
        raise ConfigError(f"{where}.model.template={model.template!r}: a template name (auto, chatml, plain)")
    from lmforge.models.load import SHORT_NAMES  # imported on use: it brings torch

    if model.name_or_path is not None and model.name_or_path not in SHORT_NAMES:
        inside(model.name_or_path, rules, f"{where}.model.name_or_path")
    if model.gguf_file:
        inside(model.gguf_file, rules, f"{where}.model.gguf_file")
        if model.name_or_path:  # also looked for inside the model's folder
            inside(os.path.join(model.name_or_path, model.gguf_file), rules, f"{where}.model.gguf_file")
    if model.tokenizer is not None:
        inside(model.tokenizer, rules, f"{where}.model.tokenizer")
    _check_data(cfg, rules, where)
    owned_output(cfg.train.output_dir, rules, f"{where}.train.output_dir")
    if cfg.train.resume_from:
        inside(cfg.train.resume_from, rules, f"{where}.train.resume_from")
    if cfg.distill.teacher:  # the distill stage's second model
        inside(cfg.distill.teacher, rules, f"{where}.distill.teacher")
    for key, value in (("reward_model", cfg.rl.reward_model), ("critic_path", cfg.rl.critic_path)):
        if value:
            inside(value, rules, f"{where}.rl.{key}")
    for i, reward in enumerate(cfg.rl.rewards):
        if reward.kind == "function" and not rules.allow_code:
            raise ConfigError(f"{where}.rl.rewards[{i}]: a function reward runs Python code; the web UI runs "
                              "none unless started with --allow-remote-code")
        if reward.path:
            inside(reward.path, rules, f"{where}.rl.rewards[{i}].path")
    return cfg


def _check_data(cfg: StageConfig, rules: Rules, where: str) -> None:
    from lmforge.data.errors import DataError
    from lmforge.data.registry import resolve_spec

    info_dir = inside(cfg.data.dataset_dir or ".", rules, f"{where}.data.dataset_dir")
    for split in ("train", "eval"):
        for i, spec in enumerate(getattr(cfg.data, split)):
            key = f"{where}.data.{split}[{i}]"
            if spec.path is not None:
                data_files(spec.path, rules, key)
                continue
            if not (info_dir / "dataset_info.json").is_file():
                continue  # written by the run itself (a pipeline's demo world); the UI cannot plant one
            try:
                path, _ = resolve_spec(spec, str(info_dir), preference=None)
            except DataError as error:
                raise ConfigError(f"{key}: {error}") from None
            data_files(path, rules, f"{key} (file_name of {spec.name!r} in {info_dir.relative_to(rules.root)}"
                                    "/dataset_info.json)")


def check_stage_text(text: str, rules: Rules, where: str) -> StageConfig:
    """A stage config's text (a run's webui-config.yaml) read through the schema, then checked."""
    from lmforge.config.load import from_dict

    return check_stage(from_dict(StageConfig, parse(text, where), where=where), rules, where)


def check_pipeline_text(text: str, rules: Rules, where: str):
    """A pipeline's text read through lmforge's own pipeline loader (so what is checked is what runs),
    then every stage, the run folder, the tokenizer's corpus and the evaluation files checked."""
    from lmforge.pipeline.run import load_pipeline, stage_config

    parse(text, where)  # size and aliases first: the loader would expand them
    with tempfile.TemporaryDirectory(prefix="lmforge-webui-check-") as folder:
        copy = Path(folder) / "pipeline.yaml"
        copy.write_text(text, encoding="utf-8")
        try:
            pipeline = load_pipeline(copy)
        except ConfigError as error:
            raise ConfigError(str(error).replace(str(copy), where)) from None
    owned_output(pipeline.run_dir, rules, f"{where}: run_dir")
    names = [stage.name for stage in pipeline.stages]
    for stage in pipeline.stages:
        check_stage(stage_config(pipeline, stage), rules, f"{where}: stages.{stage.name}")
        if isinstance(stage.eval, dict):
            check_eval_paths(stage.eval, [], rules, f"{where}: stages.{stage.name}.eval")
    if pipeline.eval is not None:
        check_eval_paths(pipeline.resolved.get("eval") or {}, names, rules, f"{where}: eval")
    corpus = (pipeline.resolved.get("tokenizer") or {}).get("train") or []
    for i, item in enumerate(corpus if isinstance(corpus, list) else [corpus]):
        data_files(item, rules, f"{where}: tokenizer.train[{i}]")
    return pipeline


EVAL_FILES = ("perplexity", "answers", "choice", "pairs", "prompts")
EVAL_JUDGES = ("reward_model", "reference", "baseline")


def check_eval_paths(block: dict, stage_names: list[str], rules: Rules, where: str) -> None:
    """Evaluation files under the root; judges are stage names (the pipeline's block) or folders under it."""
    for key in (*EVAL_FILES, *EVAL_JUDGES):
        value = block.get(key)
        if value is None or (key in EVAL_JUDGES and value in stage_names):
            continue
        data_files(value, rules, f"{where}.{key}") if key in EVAL_FILES else inside(value, rules, f"{where}.{key}")
