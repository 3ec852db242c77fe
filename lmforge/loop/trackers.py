"""accelerate and its trackers (tensorboard, wandb, mlflow, ...), with the run's whole config as hyper-parameters.

Trackers only show what they are given at start: without `config=` W&B's and MLflow's run pages list no
hyper-parameters and runs cannot be compared by them. The config is the one the run wrote to
`output_dir/config.yaml` (lmforge.stages.common.start_run), flattened to `group.key` names, since
TensorBoard's and MLflow's parameter tables take scalars only.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml
from accelerate import Accelerator

from lmforge.config.errors import ConfigError
from lmforge.config.schema import LogConfig, TrainConfig

RUN_CONFIG = "config.yaml"
MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",), "clearml": ("clearml",)}
"""The package each tracker needs (by default, the tracker's own name)."""


def check_installed(trackers: list[str]) -> None:
    """accelerate drops a tracker whose package is missing with a warning, and the run then tracks nothing."""
    for name in trackers:
        if name != "all" and not any(importlib.util.find_spec(m) for m in MODULES.get(name, (name,))):
            raise ConfigError(f"log.report_to: {name} is not installed (pip install {MODULES.get(name, (name,))[0]}), "
                              "or leave it out of log.report_to")


def flatten(config: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists, None and other values that are not a number,
    a string or a bool become their text (trackers refuse them)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def run_hparams(output_dir: str | Path) -> dict:
    """The run's resolved config, flattened; {} when the run wrote none (a loop driven without a stage)."""
    path = Path(output_dir) / RUN_CONFIG
    if not path.is_file():
        return {}
    return flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})


def make_accelerator(train: TrainConfig, log: LogConfig, output_dir: str, hparams: dict | None = None) -> Accelerator:
    """accelerate set up for the run; trackers get `hparams` (default: the run's config.yaml, flattened).
    Tracker names were checked when the config was read (log.report_to)."""
    trackers = [t for t in log.report_to if t]
    check_installed(trackers)
    accelerator = Accelerator(mixed_precision=train.mixed_precision, log_with=trackers or None,
                              project_dir=str(Path(output_dir) / "logs"))
    if trackers:
        config = run_hparams(output_dir) if hparams is None else hparams
        accelerator.init_trackers(log.run_name or Path(output_dir).name, config=config or None)
    return accelerator
