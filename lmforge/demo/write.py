"""`lmforge data demo`: the demo world written to disk (PT text, SFT dialogues, preference pairs, RL prompts,
choice questions, tool traces) with a LLaMA-Factory `dataset_info.json` beside them. This module sits on top of
the world's other modules and imports them; none of them imports it.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.demo.choice import choice_files
from lmforge.demo.prefs import add_style_noise, pref_dataset_info, pref_files
from lmforge.demo.rl import rl_files
from lmforge.demo.sft import sft_records
from lmforge.demo.tool_data import tool_files
from lmforge.demo.world import build_world, pt_corpus


def dataset_info() -> dict:
    """LLaMA-Factory `dataset_info.json` entries for the corpus and preference files."""
    tags = {f"{name}_tag": name for name in ("role", "content", "user", "assistant", "system")}
    sharegpt = {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}
    return {
        "demo_pt": {"file_name": "pt/train.txt", "columns": {"prompt": "text"}},
        "demo_pt_eval": {"file_name": "pt/eval.txt", "columns": {"prompt": "text"}},
        "demo_sft": {"file_name": "sft/train.jsonl", **sharegpt},
        "demo_sft_eval": {"file_name": "sft/eval.jsonl", **sharegpt},
        **pref_dataset_info(tags),
    }


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Bytes with "\n", not text mode: the same seed must give byte-identical files on every platform.
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))


def write_demo_world(out_dir: str | Path, seed: int = 0, sft_noise: float = 0.0, arith_reps: int = 1,
                     sft_noise_style: str = "mixed") -> dict[str, Path]:
    """Generate the demo world under `out_dir`; returns name -> path of every file written.
    `sft_noise`: share of single-turn SFT train replies given a bad style; `sft_noise_style`: how
    (see `add_style_noise`: mixed rude/rambling, or one rude habit)."""
    out_dir = Path(out_dir)
    world = build_world(seed)
    pt_train, pt_eval = pt_corpus(world, arith_reps=arith_reps)
    sft_train, sft_eval = sft_records(world)

    sft_train = add_style_noise(sft_train, sft_noise, seed, sft_noise_style)
    more = {**pref_files(world), **rl_files(world, sft_train, sft_eval), **choice_files(world, sft_eval),
            **tool_files(world)}
    names = {
        "world": "world.json",
        "pt_train": "pt/train.txt",
        "pt_eval": "pt/eval.txt",
        "sft_train": "sft/train.jsonl",
        "sft_eval": "sft/eval.jsonl",
        **{name: rel for name, (rel, _) in more.items()},
        "dataset_info": "dataset_info.json",
    }
    contents = {
        "world": [json.dumps(world.to_dict(), ensure_ascii=False, indent=1)],
        "pt_train": pt_train,
        "pt_eval": pt_eval,
        "sft_train": [json.dumps(r, ensure_ascii=False) for r in sft_train],
        "sft_eval": [json.dumps(r, ensure_ascii=False) for r in sft_eval],
        **{name: lines for name, (_, lines) in more.items()},
        "dataset_info": [json.dumps(dataset_info(), ensure_ascii=False, indent=2)],
    }
    paths = {key: out_dir / rel for key, rel in names.items()}
    for key, path in paths.items():
        _write_lines(path, contents[key])
    return paths
