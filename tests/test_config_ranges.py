"""Configs that lie: every numeric field of the schema has a range in one table (config/constraints.py),
checked when the config is read, with the dotted key and the allowed range in a one-line ConfigError."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest

from lmforge.config.constraints import RANGES, Bound
from lmforge.config.errors import ConfigError
from lmforge.config.load import load_config
from lmforge.config.load import schema_dataclasses as stage_dataclasses
from lmforge.config.schema import StageConfig, TrainConfig
from lmforge.eval.spec import EvalSpec


def schema_dataclasses() -> list[type]:
    """The stage config's groups and the eval block (read by `lmforge eval --suite` and pipelines)."""
    return [*stage_dataclasses(), EvalSpec]

BASE = ["model.scratch=test"]


def refused(*overrides: str, stage: str = "sft") -> str:
    """The one-line message of the ConfigError that `overrides` must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, *overrides], stage=stage)
    message = str(info.value)
    assert "\n" not in message
    return message


# The cases of the issue, one by one.

@pytest.mark.parametrize("value", [0, -1, -256])
def test_block_size_zero_or_negative_is_refused(value):
    message = refused(f"pt.block_size={value}", stage="pt")
    assert "pt.block_size=" in message and "[8, " in message


def test_negative_max_grad_norm_is_refused_not_gradient_ascent():
    message = refused("train.max_grad_norm=-1.0")
    assert "train.max_grad_norm" in message and "> 0" in message
    # 0 would scale every gradient to nothing: no training at all, without a word.
    assert "train.max_grad_norm" in refused("train.max_grad_norm=0")


def test_logging_steps_zero_is_refused():
    assert "train.logging_steps=0" in refused("train.logging_steps=0")


@pytest.mark.parametrize("value", [".nan", "-1e-3", "-1", ".inf", "-.inf", "nan", "1e400"])
def test_lr_must_be_a_finite_non_negative_number(value):
    assert "train.lr" in refused(f"train.lr={value}")


def test_lr_zero_is_a_deliberate_no_op_and_accepted():
    assert load_config(None, [*BASE, "train.lr=0"]).train.lr == 0.0


@pytest.mark.parametrize("value", [".nan", "-3", "0", ".inf"])
def test_epochs_must_be_finite_and_positive(value):
    assert "train.epochs" in refused(f"train.epochs={value}")


@pytest.mark.parametrize("key", ["train.seed", "data.seed"])
@pytest.mark.parametrize("value", [2**64, 2**32, -1, 10**30])
def test_seed_beyond_what_torch_and_numpy_take_is_refused(key, value):
    message = refused(f"{key}={value}")
    assert key in message and "4294967295" in message


def test_seed_at_the_edges_is_accepted():
    assert load_config(None, [*BASE, "train.seed=0"]).train.seed == 0
    assert load_config(None, [*BASE, f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1


def test_negative_num_workers_is_refused():
    assert "train.num_workers" in refused("train.num_workers=-2")


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    message = refused(f"train.output_dir={path}")
    assert "train.output_dir" in message and "file" in message


def test_warmup_ratio_beyond_one_is_refused():
    assert "train.warmup_ratio" in refused("train.warmup_ratio=5")


@pytest.mark.parametrize("value", [0, -0.1, ".nan"])
def test_dpo_beta_must_be_positive(value):
    assert "dpo.beta" in refused(f"dpo.beta={value}", stage="dpo")


def test_unknown_columns_role_is_refused():
    message = refused("data.train=[{path: a.jsonl, columns: {promt: q}}]")
    assert "promt" in message and "prompt" in message


def test_an_unknown_tracker_is_refused_when_read():
    assert "log.report_to='tensorbord' is not one of tensorboard" in refused("log.report_to=[tensorbord]")
    assert load_config(None, [*BASE, "log.report_to=[]"]).log.report_to == []


def test_unknown_tags_role_is_refused():
    assert "rol_tag" in refused("data.train=[{path: a.jsonl, tags: {rol_tag: from}}]")


@pytest.mark.parametrize("override", ["train.batch_size=2.5", "train.batch_size=true", "lora.r=yes",
                                      "train.max_steps=1.5", "pt.block_size='64'"])
def test_an_int_field_takes_only_an_int(override):
    assert override.split("=")[0] in refused(override)


def test_a_float_field_refuses_a_bool():
    assert "train.lr" in refused("train.lr=true")


def test_the_error_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\nmodel: {scratch: test}\nrl: {temperature: 0}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*rl\.temperature=0.*> 0"):
        load_config(path)


def test_dataset_list_items_are_named_by_index():
    assert "data.train[1].weight" in refused("data.train=[a.jsonl, {path: b.jsonl, weight: -1}]")


def test_a_pipeline_stage_config_is_checked_too(tmp_path):
    from lmforge.pipeline.run import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - stage: sft\n    config: {model: {scratch: test}, train: {lr: -1}}\n")
    with pytest.raises(ConfigError, match=r"stages\.sft\.config\.train\.lr=-1"):
        load_pipeline(path)


def test_an_eval_suite_is_checked_by_the_same_table(tmp_path):
    from lmforge.config.load import from_dict, read_yaml

    path = tmp_path / "suite.yaml"
    path.write_text(f"answers: a.jsonl\nseed: {2**40}\n")
    with pytest.raises(ConfigError, match=rf"suite\.yaml\.seed={2**40}: must be an integer in \[0, 4294967295\]"):
        from_dict(EvalSpec, read_yaml(path), where=str(path))


def test_direct_construction_is_checked_by_the_same_table():
    with pytest.raises(ConfigError, match=r"train\.logging_steps=0"):
        TrainConfig(logging_steps=0)


# The table itself: complete, and every entry enforced at both edges.

def _numeric_fields() -> list[tuple[type, str, type]]:
    """(dataclass, field, int or float) for every numeric field of the schema, lists of numbers included."""
    found = []
    for cls in schema_dataclasses():
        for name, tp in typing.get_type_hints(cls).items():
            kinds = _scalar_kinds(tp)
            # a switch that also takes a count (model.gradient_checkpointing: true or k) checks itself
            if kinds & {int, float} and bool not in kinds:
                found.append((cls, name, float if float in kinds else int))
    return found


def _scalar_kinds(tp) -> set:
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list):
        return set().union(*(_scalar_kinds(t) for t in typing.get_args(tp)))
    return {tp}


def test_every_numeric_field_of_the_schema_has_a_range():
    missing = [f"{cls.__name__}.{name}" for cls, name, _ in _numeric_fields() if name not in RANGES.get(cls.__name__, {})]
    assert not missing, f"add a range to lmforge/config/constraints.py RANGES for {missing}"
    assert len(_numeric_fields()) >= 75


def test_the_table_names_only_fields_that_exist():
    fields = {cls.__name__: {f.name for f in dataclasses.fields(cls)} for cls in schema_dataclasses()}
    for cls_name, entries in RANGES.items():
        assert set(entries) <= fields[cls_name], cls_name


def test_every_default_is_inside_its_range():
    for cls in schema_dataclasses():
        for f in dataclasses.fields(cls):
            bound = RANGES.get(cls.__name__, {}).get(f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if bound is not None and isinstance(default, (int, float)):
                assert bound.allows(default), f"{cls.__name__}.{f.name}={default}"


def _edges(bound: Bound) -> tuple[list, list]:
    """(values just inside, values just outside) the bound."""
    step = 1 if bound.kind is int else 1e-6
    inside, outside = [], [True, "1"]
    for edge, is_open, sign in ((bound.low, bound.low_open, 1), (bound.high, bound.high_open, -1)):
        if math.isinf(edge):
            continue
        inside.append(edge + sign * step if is_open else edge)
        outside.append(edge if is_open else edge - sign * step)
    outside += [math.nan, math.inf, -math.inf] if bound.kind is float else [1.5]
    return inside, outside


CASES = [(cls, name, bound) for cls in schema_dataclasses() for name, bound in RANGES.get(cls.__name__, {}).items()]


@pytest.mark.parametrize("cls,name,bound", CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES])
def test_each_range_accepts_its_edges_and_refuses_beyond(cls, name, bound):
    from lmforge.config.constraints import check_value

    inside, outside = _edges(bound)
    for value in inside:
        check_value(bound, value, f"x.{name}")
    for value in outside:
        with pytest.raises(ConfigError, match=rf"x\.{name}=.*must be"):
            check_value(bound, value, f"x.{name}")


def test_the_stage_config_reads_back_what_it_wrote():
    from lmforge.config.load import from_dict, to_dict

    cfg = load_config(None, BASE)
    assert from_dict(StageConfig, to_dict(cfg), "again") == cfg
