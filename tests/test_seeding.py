"""train.seed decides every random draw of a run: two runs of the same config give the same artifact bit
for bit (LoRA, DoRA and PiSSA initialisation, dropout, data order), whatever the process's random state
was before; another seed gives another adapter."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config.load import load_config
from lmforge.stages import STAGE_RUNNERS

QUIET = ["log.progress=false", "log.report_to=[]"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, world_tokenizer_dir):
    """A tiny model saved as a Hugging Face folder: loading it draws nothing, so the adapter's start is the
    first random draw of the run (a scratch model is built right after a seed and would hide it)."""
    from transformers import AutoTokenizer

    from lmforge.models.load import build_scratch_model

    out = tmp_path_factory.mktemp("pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(world_tokenizer_dir))
    build_scratch_model("test", tokenizer, seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train(pretrained, world_dir, out, *extra) -> dict[str, torch.Tensor]:
    random.seed()  # another process: whatever state the global generators are in before the run
    torch.manual_seed(random.randrange(2**32))
    cfg = load_config(None, [f"model.name_or_path={pretrained}", "model.finetuning=lora", "lora.r=4",
                             "lora.dropout=0.1", f"data.train={world_dir}/sft/train.jsonl", "data.eval_split=0",
                             "data.max_length=64", "train.max_steps=3", "train.batch_size=4", "train.lr=1e-2",
                             "train.logging_steps=1", "sft.eval_generate=0", f"train.output_dir={out}", *QUIET, *extra], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    return out


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", [[], ["model.finetuning=dora"], ["lora.init=gaussian"],
                                    ["lora.init=pissa_niter_2"]], ids=["lora", "dora", "gaussian", "pissa_niter"])
def test_the_same_seed_gives_the_same_artifact_bit_for_bit(pretrained, world_dir, tmp_path, method):
    one = train(pretrained, world_dir, tmp_path / "one", *method)
    two = train(pretrained, world_dir, tmp_path / "two", *method)
    weights = [sorted(run.glob("*.safetensors")) for run in (one, two)]  # PiSSA saves its residual model too
    assert weights[0] and [p.name for p in weights[0]] == [p.name for p in weights[1]]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*weights))
    losses = [[(row["step"], row["loss"], row["grad_norm"]) for row in map(json.loads, (run / "metrics.jsonl")
               .read_text().splitlines()) if "loss" in row] for run in (one, two)]
    assert [step for step, _, _ in losses[0]] == [1, 2, 3] and losses[0] == losses[1]  # from the first step on


def test_another_seed_gives_another_lora_a(pretrained, world_dir, tmp_path):
    one = adapter(train(pretrained, world_dir, tmp_path / "one", "train.seed=1"))
    two = adapter(train(pretrained, world_dir, tmp_path / "two", "train.seed=2"))
    names = [k for k in one if "lora_A" in k]
    assert names and all(not torch.equal(one[k], two[k]) for k in names)
