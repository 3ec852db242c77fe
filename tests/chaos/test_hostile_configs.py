"""Configs that lie, and YAML that explodes. Every numeric field of the schema is given hostile values
(NaN, infinities, negatives, zero, 2**64, a bool, a string, a list, a mapping, a fraction for an integer)
through dotted overrides and through a YAML file; each is either refused with one ConfigError line naming
the key, or accepted inside its range — never a traceback, never a silent out-of-range value. YAML
"billion laughs" (config, pipeline, override, the web UI's pasted YAML), self-containing aliases, deep
nesting and oversized files are refused fast, naming the file; ordinary anchors still load."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from chaos_trials import FULL

from lmforge.config.constraints import RANGES
from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config, schema_dataclasses

HOSTILE = [".nan", ".inf", "-.inf", "-1", "0", "1", "2.5", "-0.5", str(2**64), str(-2**64), "1e400", "true",
           "'12'", "word", "[]", "{}", "[1, 2]", "null", "0x10", "1_000", "1" + "0" * 400, "-" + "9" * 400,
           "'" + "7" * 5000 + "'", "1:30", "0b101", "~", "1.0e+999"]
BASE = ["model.scratch=test"]
# Where each group sits in a stage config (the stage that reads it).
GROUPS = {"ModelConfig": "model", "DataConfig": "data", "TrainConfig": "train", "PTConfig": "pt", "SFTConfig": "sft",
          "RMConfig": "rm", "DPOConfig": "dpo", "RLConfig": "rl", "LoraConfig": "lora", "GaloreConfig": "galore",
          "ModConfig": "mod", "ExpandConfig": "expand"}
RL_EXTRA = ["rl.rewards=[{kind: answer_match}]", "rl.num_generations=2"]
FIGURES: Counter = Counter()
"""What the tests below saw, case by case; test_figures checks and records them."""
RESULTS = Path(__file__).parent / "results" / "hostile_configs.json"


def _field_cases() -> list[tuple[str, str, str]]:
    cases = []
    for cls in schema_dataclasses():
        group = GROUPS.get(cls.__name__)
        for name in RANGES.get(cls.__name__, {}):
            if group is not None:
                cases += [(cls.__name__, f"{group}.{name}", value) for value in HOSTILE]
    return cases


FIELD_CASES = _field_cases()


def _in_range(value, bound) -> bool:
    values = value if isinstance(value, list) else [value]
    return value is None or value in bound.words or all(bound.allows(v) for v in values)


@pytest.mark.parametrize("cls_name,key,text", FIELD_CASES, ids=[f"{k}={t[:16]}" for _, k, t in FIELD_CASES])
def test_a_hostile_number_is_refused_by_name_or_accepted_in_range(cls_name, key, text):
    stage = "grpo" if key.startswith("rl.") else "dpo" if key.startswith("dpo.") else "sft"
    try:
        cfg = load_config(None, [*BASE, *(RL_EXTRA if stage == "grpo" else []), f"{key}={text}"], stage=stage)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 400
        assert key.split(".")[-1] in message or key.split(".")[0] in message, message
        FIGURES["numbers_refused_naming_the_key"] += 1
        return
    group, name = key.split(".")
    value = getattr(getattr(cfg, group), name)
    assert _in_range(value, RANGES[cls_name][name]), f"{key}={text} accepted as {value!r}"
    FIGURES["numbers_accepted_in_range"] += 1


def test_the_listed_lies_in_a_yaml_file_are_each_refused(tmp_path):
    lies = {"pt: {block_size: 0}": "pt.block_size", "pt: {block_size: -5}": "pt.block_size",
            "train: {max_grad_norm: -1.0}": "train.max_grad_norm", "train: {logging_steps: 0}": "train.logging_steps",
            "train: {lr: .nan}": "train.lr", "train: {lr: -0.001}": "train.lr", "train: {epochs: .nan}": "train.epochs",
            f"train: {{seed: {2**64}}}": "train.seed", "train: {num_workers: -1}": "train.num_workers",
            "train: {epochs: -3}": "train.epochs", "train: {warmup_ratio: 5}": "train.warmup_ratio",
            "dpo: {beta: 0}": "dpo.beta", "dpo: {beta: -0.1}": "dpo.beta",
            "data: {train: [{path: a.jsonl, columns: {answer: out}}]}": "data.train[0].columns"}
    for i, (text, key) in enumerate(lies.items()):
        path = tmp_path / f"lie{i}.yaml"
        path.write_text(f"stage: pt\nmodel: {{scratch: test}}\n{text}\n")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value).startswith(f"{path}.{key}"), str(info.value)
        FIGURES["listed_lies_refused_naming_the_key"] += 1


def test_an_output_dir_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"train\.output_dir=.*f/run.*is a file"):
        load_config(None, [*BASE, f"train.output_dir={tmp_path / 'f' / 'run'}"])
    with pytest.raises(ConfigError, match=r"data\.dataset_dir=.*must be a folder"):
        load_config(None, [*BASE, f"data.dataset_dir={tmp_path / 'f'}"])
    FIGURES["folders_that_are_files_refused"] += 2


# YAML that explodes.

LAUGHS = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)])


def _refused_fast(call, path: Path | str, limit: float = 1.0) -> str:
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        call()
    assert time.perf_counter() - started < limit
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    FIGURES["yaml_refused_fast_naming_the_file"] += 1
    return message


def test_a_billion_laughs_config_is_refused_fast_naming_the_file(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(f"stage: sft\nmodel: {{scratch: test}}\nlog: {{run_name: x}}\n{LAUGHS}\n")
    assert "expand to more than" in _refused_fast(lambda: load_config(path), path)


def test_a_billion_laughs_pipeline_is_refused_fast_naming_the_file(tmp_path):
    from lmforge.pipeline.run import load_pipeline

    path = tmp_path / "pipe.yaml"
    body = LAUGHS.replace("\n", "\n  ")
    path.write_text(f"run_dir: runs/x\ndemo_world:\n  {body}\nstages:\n  - stage: sft\n    config: {{}}\n")
    assert "expand to more than" in _refused_fast(lambda: load_pipeline(path), path)


def test_the_cli_refuses_a_bomb_in_one_line(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(f"model: {{scratch: test}}\n{LAUGHS}\n")
    done = subprocess.run([sys.executable, "-m", "lmforge.cli", "train", "sft", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "laughs.yaml" in line]
    assert lines and "expand to more than" in lines[0]
    assert not (tmp_path / "runs").exists()
    FIGURES["yaml_refused_fast_naming_the_file"] += 1


@pytest.mark.parametrize("text,reason", [
    ("a: &a [*a]\n", "contains it"),
    ("a: &a {b: *a}\n", "contains it"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    ("a: " + "[" * 150 + "]" * 150 + "\n", "nested deeper"),
    ("".join(f"a{i}: &a{i} [*a{i - 1}]\n" if i else "a0: &a0 [x]\n" for i in range(150)), "nested deeper"),
    ("stage: sft\ntrain: {lr: 1.0e-3}\nmodel: {scratch: test}\ntrain: {lr: 1.0}\n", "given twice (lines 2 and 4)"),
    ("model: {scratch: test, scratch: tiny}\n", "given twice (lines 1 and 1)"),
    ("s: &s " + "x" * 20000 + "\nl: [" + ", ".join(["*s"] * 400) + "]\n", "more than 4 MiB of text"),
    ("base: &b {" + ", ".join(f"k{i}: {i}" for i in range(400)) + "}\n"
     + "\n".join(f"m{i}: {{<<: *b}}" for i in range(400)) + "\n", "expand to more than"),
])
def test_other_yaml_bombs_are_refused(tmp_path, text, reason):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    # Thousands of nested `[` cost PyYAML's scanner about a second (it keeps every open bracket as a possible
    # key until 1024 characters later), then the composer stops at MAX_DEPTH: bounded, whatever the length.
    assert reason in _refused_fast(lambda: load_config(path), path, limit=3.0)


def test_an_oversized_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (5 * 2**20) + "\n")
    assert "larger than a config" in _refused_fast(lambda: load_config(path), path)


def test_an_override_bomb_is_refused():
    bomb = "{" + LAUGHS.replace("\n", ", ") + "}"
    with pytest.raises(ConfigError, match="expand to more than"):
        load_config(None, [*BASE, f"log.run_name={bomb}"])
    FIGURES["yaml_refused_naming_the_override"] += 1


def test_the_web_ui_refuses_pasted_laughs():
    from lmforge.webui.forms import from_yaml

    started = time.perf_counter()
    with pytest.raises(ConfigError, match="alias"):  # the web UI refuses aliases outright
        from_yaml(f"stage: sft\n{LAUGHS}\n")
    assert time.perf_counter() - started < 1.0
    FIGURES["web_ui_yaml_refused"] += 1


@pytest.mark.parametrize("text,reason", [("a: " + "[" * 5000 + "]" * 5000, "nested deeper"),
                                         ("stage: sft\nstage: dpo\n", "given twice")])
def test_the_web_ui_refuses_deep_or_doubled_yaml_in_one_line(text, reason):
    from lmforge.webui.forms import from_yaml

    with pytest.raises(ConfigError, match=reason):
        from_yaml(text)
    FIGURES["web_ui_yaml_refused"] += 1


def test_ordinary_anchors_and_merge_keys_still_load(tmp_path):
    from lmforge.pipeline.run import load_pipeline

    path = tmp_path / "anchors.yaml"
    path.write_text("stage: sft\nmodel: {scratch: test}\ndata:\n  train: &sets [a.jsonl, b.jsonl]\n  eval: *sets\n")
    cfg = load_config(path)
    assert [s.path for s in cfg.data.eval] == ["a.jsonl", "b.jsonl"]
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text("stages:\n  - stage: sft\n    config: &c {model: {scratch: test}, train: {lr: 1.0e-3, seed: 7}}\n"
                    "  - stage: sft\n    name: again\n    config: {<<: *c, data: {max_length: 64}}\n")
    stages = load_pipeline(pipe).stages
    assert stages[1].config["train"] == {"lr": 1e-3, "seed": 7} and stages[1].config["data"] == {"max_length": 64}
    assert math.isclose(stages[0].config["train"]["lr"], 1e-3)
    # A merge source that overrides a key it merges is not a key given twice, even once flattened.
    from lmforge.config.safe_yaml import safe_load

    assert safe_load("base: &b {a: 1}\nx: {<<: &m {<<: *b, a: 2}}\ny: *m\n")["y"] == {"a": 2}


def test_figures():
    """The figures the tests above add to (cases tried, refused naming the key or file, accepted inside the
    range; a traceback or an out-of-range value fails its own test). Printed; written to
    tests/chaos/results/hostile_configs.json under LMFORGE_CHAOS=full when the whole file ran."""
    figures = dict(sorted(FIGURES.items()))
    print("hostile_configs figures:", json.dumps(figures))
    numbers = figures.get("numbers_refused_naming_the_key", 0) + figures.get("numbers_accepted_in_range", 0)
    if FULL and numbers == len(FIELD_CASES):
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"cases_tried": sum(figures.values()), **figures, "tracebacks": 0,
                                       "silent": 0}, indent=2) + "\n")
