"""Shared fixtures: the demo world and a small tokenizer trained on it, built once per session."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory"
CJK = re.compile(r"[\u4e00-\u9fff]")


def pytest_collection_modifyitems(items):
    """Everything under tests/chaos carries the `chaos` marker (`pytest -m chaos` runs it alone)."""
    for item in items:
        if "chaos" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.chaos)


def lang_of(line: str) -> str:
    return "zh" if CJK.search(line) else "en"


def jsonl_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assistant_replies(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"] if m["role"] == "assistant"]


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    """The demo world (seed 0), written once: name -> path, as write_demo_world returns it."""
    from lmforge.demo.write import write_demo_world

    return write_demo_world(tmp_path_factory.mktemp("world"), seed=0)


@pytest.fixture(scope="session")
def demo_sft(demo_files) -> tuple[list[dict], list[dict]]:
    return jsonl_records(demo_files["sft_train"]), jsonl_records(demo_files["sft_eval"])


@pytest.fixture(scope="session")
def world_dir(demo_files) -> Path:
    return demo_files["world"].parent


@pytest.fixture(scope="session")
def world_tokenizer_dir(world_dir, tmp_path_factory) -> Path:
    from lmforge.models.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([world_dir / "pt" / "train.txt", world_dir / "sft" / "train.jsonl"], out, vocab_size=1000)
    return out


# A tiny EN+ZH tokenizer for mask and truncation tests.
EN_WORDS = ("the model learns from data and the training loop updates every weight with a small step "
            "hello there you are forge again hi").split()
ZH_WORDS = ["我们", "今天", "学习", "模型", "训练", "数据", "好的"]


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    from lmforge.models.tokenizer import train_tokenizer

    rng = random.Random(0)
    lines = []
    for i in range(400):
        if i % 2:
            lines.append("".join(rng.choices(ZH_WORDS, k=8)) + "。")
        else:
            lines.append(" ".join(rng.choices(EN_WORDS, k=10)).capitalize() + ".")
    root = tmp_path_factory.mktemp("masking-tokenizer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_tokenizer([corpus], root / "tok", vocab_size=400)
    return root / "tok"


@pytest.fixture()
def tok(chat_tokenizer_dir):
    """A fresh ChatML tokenizer per test (some tests change its template or add tokens)."""
    from transformers import AutoTokenizer

    from lmforge.data.templates import apply_template_choice

    tokenizer = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    assert apply_template_choice(tokenizer, "auto") == "tokenizer"  # it ships ChatML
    return tokenizer


@pytest.fixture(scope="session")
def base(tmp_path_factory, world_dir, world_tokenizer_dir) -> Path:
    """A tiny model pretrained briefly on the demo corpus: the start of the RM, DPO and RL runs."""
    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    out = tmp_path_factory.mktemp("base")
    cfg = load_config(None, ["model.scratch=test", f"model.tokenizer={world_tokenizer_dir}",
                             f"data.train={world_dir}/pt/train.txt", "data.eval_split=0", "pt.block_size=128",
                             "train.batch_size=8", "train.max_steps=40", "train.lr=5e-3",
                             f"train.output_dir={out}", "log.report_to=[]", "log.progress=false"], stage="pt")
    STAGE_RUNNERS["pt"](cfg)
    return out
