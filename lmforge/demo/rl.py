"""The demo world's prompts for online RL (PPO, GRPO, RLOO), each with its reference reply.

- `rl/train.jsonl`: a question on every trained fact (one phrasing per language) and every sum or
  difference that SFT never asked: the policy explores replies the SFT data did not spell out.
- `rl/eval.jsonl`: the SFT held-out questions (facts held out of SFT, held-out sums).
- `rl/arith_train.jsonl`, `rl/arith_eval.jsonl`: the arithmetic part of each, for verifiable-reward
  runs (GRPO with exact match).

Records are SFT records (messages ending with the reference reply, plus `answer`, `kind`,
`distractors`), so they also serve as SFT data, and reward functions can read their columns.
"""

from __future__ import annotations

import json
import random

from lmforge.demo.sft import arith_record, fact_record
from lmforge.demo.world import LANGS, TEMPLATES, World

RL_FILES = {
    "rl_train": "rl/train.jsonl",
    "rl_eval": "rl/eval.jsonl",
    "rl_arith_train": "rl/arith_train.jsonl",
    "rl_arith_eval": "rl/arith_eval.jsonl",
}


def rl_prompts(world: World, sft_train: list[dict], sft_eval: list[dict]) -> dict[str, list[dict]]:
    rng = random.Random(f"demo-rl:{world.seed}")
    asked = {r["subject"] for r in sft_train if r["kind"] == "arith"}
    held = set(world.arith_heldout)
    arith = []
    for problem in world.arith_problems():
        a, op, b = problem
        if problem in held or f"{a} {op} {b}" in asked:
            continue
        for lang in LANGS:
            question = rng.choice(TEMPLATES["asksum", op, lang])
            arith.append(arith_record(problem, lang, question, f"rl-{lang}-arith-{a}{op}{b}"))
    facts = []
    for fact in world.facts:
        if fact.heldout:
            continue
        for lang in LANGS:
            question = rng.choice(TEMPLATES["ask", fact.attribute, lang])
            facts.append(fact_record(world, fact, lang, question, f"rl-{lang}-{fact.entity.lower()}-{fact.attribute}"))
    train = arith + facts
    rng.shuffle(train)
    return {
        "rl_train": train,
        "rl_eval": sft_eval,
        "rl_arith_train": arith,
        "rl_arith_eval": [r for r in sft_eval if r["kind"] == "arith"],
    }


def rl_files(world: World, sft_train: list[dict], sft_eval: list[dict]) -> dict[str, tuple[str, list[str]]]:
    """name -> (path under the world directory, JSON lines)."""
    records = rl_prompts(world, sft_train, sft_eval)
    return {name: (RL_FILES[name], [json.dumps(r, ensure_ascii=False) for r in records[name]]) for name in RL_FILES}
