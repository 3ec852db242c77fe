"""Shared fixtures: the demo world and a small tokenizer trained on it, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llamafactory"


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    from lmforge.data.demo_world import write_demo_world

    out = tmp_path_factory.mktemp("world")
    write_demo_world(out, seed=0)
    return out


@pytest.fixture(scope="session")
def world_tokenizer_dir(world_dir, tmp_path_factory) -> Path:
    from lmforge.models.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([world_dir / "pt" / "train.txt", world_dir / "sft" / "train.jsonl"], out, vocab_size=1000)
    return out
