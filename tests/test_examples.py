"""Every YAML under examples/ runs from a clone of the repository alone: no path outside it, and every data
path it names exists after the preparation its header documents (`lmforge data demo data/demo`, or the
demo world a pipeline writes itself), and reads as the stage reads it. LLaMA-Factory's own data, which
the SmolLM2 examples name in their headers as the alternative, is checked against them from ../shared.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA

from lmforge.config.load import load_config
from lmforge.config.schema import DatasetSpec, StageConfig
from lmforge.data.build import load_examples
from lmforge.data.errors import ErrorLog
from lmforge.data.readers import resolve_files
from lmforge.data.registry import resolve_spec
from lmforge.demo.write import write_demo_world
from lmforge.pipeline.run import load_pipeline, stage_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
KIND = {"pt": "sft", "sft": "sft", "rm": "pair", "dpo": "pair", "ppo": "prompt", "grpo": "prompt", "rloo": "prompt"}
EVAL_KINDS = {"perplexity": "sft", "answers": "prompt", "pairs": "pair", "prompts": "prompt", "choice": None}


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_no_example_names_a_path_outside_the_repository(path):
    outside = [s for s in strings(yaml.safe_load(path.read_text(encoding="utf-8")))
               if s.startswith(("/", "~")) or "../" in s or s.startswith("..")]
    assert outside == []


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A user's clone after the documented preparation: `lmforge data demo data/demo`."""
    root = tmp_path_factory.mktemp("clone")
    (root / "examples").symlink_to(ROOT / "examples")
    write_demo_world(root / "data" / "demo", seed=0)
    return root


def stage_configs(path: Path, root: Path) -> tuple[list[StageConfig], list[tuple[str, str]]]:
    """(the stage configs, the (eval suite, path) pairs) of an example; a pipeline's demo world is
    written where it writes it, as `lmforge run` does before its first stage."""
    if "stages:" not in path.read_text(encoding="utf-8"):
        return [load_config(path)], []
    pipeline = load_pipeline(path)
    if pipeline.demo_world is not None:
        world = root / pipeline.run_dir / "world"
        if not world.exists():
            write_demo_world(world, seed=int(pipeline.demo_world.get("seed", 0)))
    evals = [(name, getattr(pipeline.eval, name)) for name in EVAL_KINDS
             if pipeline.eval is not None and getattr(pipeline.eval, name)]
    evals += [("tokenizer", p) for p in (pipeline.tokenizer or {}).get("train", [])]
    return [stage_config(pipeline, stage) for stage in pipeline.stages], \
        [(name, p.replace("${run_dir}", pipeline.run_dir)) for name, p in evals]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_data_path_of_an_example_exists_and_reads_after_its_preparation(path, clone, monkeypatch):
    monkeypatch.chdir(clone)
    configs, evals = stage_configs(path, clone)
    read = 0
    for cfg in configs:
        kind = "kto" if cfg.stage == "dpo" and cfg.dpo.loss == "kto" else KIND[cfg.stage]
        for spec in cfg.data.train + cfg.data.eval:
            resolve_files(resolve_spec(spec, cfg.data.dataset_dir, preference=None)[0])
            with tempfile.TemporaryDirectory() as cache:
                rows, _ = load_examples([spec], cfg.data, ErrorLog(cfg.data.on_error), cache, kind=kind)
            assert len(rows) > 0
            read += 1
    for name, file in evals:
        assert Path(file).is_file(), f"{path.name}: {name} {file} does not exist after the preparation"
        if EVAL_KINDS.get(name):
            with tempfile.TemporaryDirectory() as cache:
                rows, _ = load_examples([DatasetSpec(path=file)], cfg.data, ErrorLog(), cache, kind=EVAL_KINDS[name])
            assert len(rows) > 0
    assert read >= len(configs)  # every stage reads at least one data set


LLAMAFACTORY_ALTERNATIVES = {
    "sft_smollm2_identity.yaml": [],
    "sft_alpaca_lora.yaml": ["data.train=[alpaca_en_demo, alpaca_zh_demo, glaive_toolcall_en_demo]"],
    "dpo_smollm2_lora.yaml": ["data.train=[dpo_en_demo]"],
    "sft_smollm2_tools.yaml": ["data.train=[glaive_toolcall_en_demo]"],
}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="LLaMA-Factory's demo data is not beside the repository")
@pytest.mark.parametrize("name", sorted(LLAMAFACTORY_ALTERNATIVES))
def test_the_smollm2_examples_read_llamafactory_data_as_their_headers_say(name, tmp_path):
    """The header's alternative (data.dataset_dir at LLaMA-Factory's data folder) reads every record."""
    overrides = [f"data.dataset_dir={SHARED_DATA}", *LLAMAFACTORY_ALTERNATIVES[name]]
    cfg = load_config(ROOT / "examples" / name, overrides)
    errors = ErrorLog("raise")
    rows, _ = load_examples(cfg.data.train, cfg.data, errors, str(tmp_path), kind=KIND[cfg.stage])
    assert len(rows) == errors.total_loaded and errors.total_skipped == 0
    if name == "sft_smollm2_identity.yaml":
        text = " ".join(m["content"] for r in rows for m in r["messages"])
        assert "Forge" in text and "{{name}}" not in text and "{{author}}" not in text


# The single-stage examples that need no GPU, in the order their headers chain them, each run for its
# first step from the clone (models shrunk to the suite's tiny base; the data is the example's own).
FIRST_STEPS = ["pt_demo", "sft_demo", "rm_demo", "dpo_demo", "ppo_demo", "grpo_demo", "rloo_demo", "grpo_tools_demo",
               "sft_smollm2_identity", "sft_alpaca_lora", "dpo_smollm2_lora", "sft_smollm2_tools"]
SHRINK = ["train.max_steps=1", "train.eval_steps=0", "train.batch_size=2", "train.grad_accum=1", "log.report_to=[]",
          "log.progress=false", "sft.eval_generate=0", "dpo.eval_generate=0", "rl.prompts_per_step=2",
          "rl.max_new_tokens=4", "rl.eval_prompts=0", "rl.minibatch_size=0", "data.max_length=128"]


def test_the_examples_run_their_first_step_from_a_clone(clone, base, world_tokenizer_dir, monkeypatch):
    from lmforge.stages import STAGE_RUNNERS

    assert set(FIRST_STEPS) | {"demo", "smollm2", "demo_tools"} == {p.stem for p in EXAMPLES}  # a new example is listed here
    monkeypatch.chdir(clone)
    runs = clone / "first-steps"
    for name in FIRST_STEPS:
        model = [f"model.tokenizer={world_tokenizer_dir}", "model.scratch=test", "model.name_or_path=null"] \
            if name == "pt_demo" else [f"model.name_or_path={base}"]
        rl = [f"rl.reward_model={runs / 'rm_demo'}", "rl.critic=shared"] if name == "ppo_demo" else []
        generations = ["rl.num_generations=2"] if name in ("grpo_demo", "rloo_demo", "grpo_tools_demo") else []
        # tool records carry their function schemas in the system turn: longer than SHRINK's 128 tokens
        longer = ["data.max_length=1024"] if name in ("sft_alpaca_lora", "sft_smollm2_tools") else []
        cfg = load_config(clone / "examples" / f"{name}.yaml",
                          [*model, *SHRINK, *rl, *generations, *longer, f"train.output_dir={runs / name}"])
        STAGE_RUNNERS[cfg.stage](cfg)
        manifest = json.loads((runs / name / "lmforge.json").read_text(encoding="utf-8"))
        files = manifest["data"]["by_file"]
        assert files and all(counts["kept"] > 0 for counts in files.values()), name
        # every file it read lies inside the clone (paths relative to it), none beside the repository
        assert all(not Path(f).is_absolute() and (clone / f).resolve().is_relative_to(clone.resolve())
                   or Path(f).resolve().is_relative_to(ROOT / "examples") for f in files), (name, list(files))
