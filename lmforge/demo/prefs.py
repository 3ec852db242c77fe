"""Preference pairs over the demo world, for reward modelling, DPO and KTO.

Each pair asks one question from the SFT templates; `chosen` is exactly the SFT reference answer (the
canonical polite sentence) and `rejected` has one flaw: a `wrong` value, `rude` wording, `rambling` filler
around the right sentence, or a `hedged` answer naming two values. `wrong` and `hedged` grade incorrect
with `answer_is_correct`; `rude` and `rambling` are right but bad, which `is_preferred_style` tells apart.
Train pairs ask the facts and sums SFT trains on; eval pairs ask only the held-out ones (the sft/eval.jsonl
split), so preference eval is on facts no earlier stage saw as questions and answers.

Everything is drawn from its own random stream, so adding pairs shifts nothing in the other corpora.
"""

from __future__ import annotations

import json
import random

from lmforge.demo.grading import exact_match
from lmforge.demo.sft import arith_record, fact_record
from lmforge.demo.world import (
    LANGS,
    TEMPLATES,
    WORDING,
    Fact,
    Problem,
    World,
    solve,
)

# flaw -> (language -> templates), from the `prefs` section of demo_world.yaml
PREF_TEMPLATES: dict[str, dict[str, list[str]]] = {
    kind: {lang: list(texts) for lang, texts in langs.items()} for kind, langs in WORDING["prefs"].items()
}
FLAW_SHARES = {"wrong": 0.50, "rude": 0.20, "rambling": 0.15, "hedged": 0.15}
EVAL_PHRASINGS = 2  # question phrasings per held-out fact and language (train pairs use every phrasing)
PREF_FILES = {
    "pref_train": "pref/train.jsonl",
    "pref_eval": "pref/eval.jsonl",
    "pref_kto": "pref/kto_train.jsonl",
    "pref_eval_seen": "pref/eval_seen.jsonl",
}


def _flaw_plan(count: int, rng: random.Random) -> list[str]:
    """`count` flaws in FLAW_SHARES proportions (exact up to rounding), shuffled."""
    plan: list[str] = []
    total = 0.0
    for flaw, share in FLAW_SHARES.items():
        total += share
        plan += [flaw] * (round(total * count) - len(plan))
    plan += ["wrong"] * (count - len(plan))  # only if float sums fell short of 1
    rng.shuffle(plan)
    return plan


def _wrong_sum(problem: Problem, rng: random.Random) -> int:
    right = solve(problem)
    return rng.choice([right + d for d in (-2, -1, 1, 2) if right + d >= 0])


def _rejected(
    world: World, item: Fact | Problem, chosen: str, answer: str, lang: str, flaw: str, rng: random.Random
) -> str:
    """The rejected answer with `flaw`, given the chosen sentence and the answer value (both in `lang`)."""
    if flaw == "rude":
        return rng.choice(PREF_TEMPLATES["rude"][lang]).format(answer=chosen)
    if flaw == "rambling":
        before, after = rng.randint(2, 3), rng.randint(2, 3)
        filler = rng.sample(PREF_TEMPLATES["filler"][lang], before + after)
        return (" " if lang == "en" else "").join(filler[:before] + [chosen] + filler[before:])
    if isinstance(item, Fact):
        wrong = rng.choice(world.wrong_values(item))
        if flaw == "wrong":
            return world.answer(item, lang, value=wrong)
        wrong = world.term(wrong, lang)
    else:
        wrong = str(_wrong_sum(item, rng))
        if flaw == "wrong":
            a, op, b = item
            return TEMPLATES["sum", op, lang][0].format(a=a, b=b, c=wrong)
    x, y = rng.sample([answer, wrong], 2)  # flaw == "hedged": the right value and a wrong one
    return rng.choice(PREF_TEMPLATES["hedged"][lang]).format(x=x, y=y)


def _pair(world: World, item: Fact | Problem, record: dict, flaw: str, rng: random.Random) -> dict:
    """A single-turn SFT record (no system prompt) as a TRL conversational preference pair."""
    user, assistant = record.pop("messages")
    rejected = _rejected(world, item, assistant["content"], record["answer"], record["lang"], flaw, rng)
    pair = {"prompt": [user], "chosen": [assistant], "rejected": [{"role": "assistant", "content": rejected}]}
    return {**pair, **record, "flaw": flaw}


def pref_pairs(world: World) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference pairs. Train asks every train fact with every question phrasing and every
    other non-held-out sum once, per language, shuffled; eval asks each held-out fact with EVAL_PHRASINGS
    phrasings and each held-out sum once, per language."""
    rng = random.Random(f"demo-pref:{world.seed}")
    held = set(world.arith_heldout)
    splits = []
    for split in ("train", "eval"):
        items: list[tuple[Fact | Problem, dict]] = []
        for fact in world.facts:
            if fact.heldout != (split == "eval"):
                continue
            for lang in LANGS:
                questions = list(enumerate(TEMPLATES["ask", fact.attribute, lang]))
                if split == "eval":
                    questions = sorted(rng.sample(questions, EVAL_PHRASINGS))
                for k, question in questions:
                    rid = f"pref-{split}-{lang}-{fact.entity.lower()}-{fact.attribute}-{k}"
                    items.append((fact, fact_record(world, fact, lang, question, rid)))
        problems = (
            world.arith_heldout if split == "eval" else [p for p in world.arith_problems() if p not in held]
        )
        for problem in problems:
            for lang in LANGS:
                question = rng.choice(TEMPLATES["asksum", problem[1], lang])
                rid = f"pref-{split}-{lang}-arith-{''.join(map(str, problem))}"
                items.append((problem, arith_record(problem, lang, question, rid)))
        plan = _flaw_plan(len(items), rng)
        pairs = [_pair(world, item, record, flaw, rng) for (item, record), flaw in zip(items, plan)]
        if split == "train":
            rng.shuffle(pairs)
        splits.append(pairs)
    return splits[0], splits[1]


def seen_fact_pairs(world: World, train: list[dict], sums: int = 40) -> list[dict]:
    """Held-out pairs about facts the model *was* trained on: one new pair per train fact and language
    (new flaw draw, new wrong value) plus some sums, none equal to a training pair. `pref/eval.jsonl`
    asks about unseen facts; this set tells judging known facts apart from generalising to new ones."""
    rng = random.Random(f"demo-pref-seen:{world.seed}")
    known = {(json.dumps(p["prompt"], ensure_ascii=False), json.dumps(p["rejected"], ensure_ascii=False))
             for p in train}
    items: list[tuple[Fact | Problem, dict]] = []
    for fact in world.facts:
        if fact.heldout:
            continue
        for lang in LANGS:
            k, question = rng.choice(list(enumerate(TEMPLATES["ask", fact.attribute, lang])))
            rid = f"pref-seen-{lang}-{fact.entity.lower()}-{fact.attribute}-{k}"
            items.append((fact, fact_record(world, fact, lang, question, rid)))
    held = set(world.arith_heldout)
    for problem in rng.sample([p for p in world.arith_problems() if p not in held], sums):
        lang = rng.choice(LANGS)
        question = rng.choice(TEMPLATES["asksum", problem[1], lang])
        items.append((problem, arith_record(problem, lang, question, f"pref-seen-{lang}-arith-"
                                             f"{''.join(map(str, problem))}")))
    pairs = [_pair(world, item, record, flaw, rng) for (item, record), flaw in zip(items, _flaw_plan(len(items), rng))]
    return [p for p in pairs if (json.dumps(p["prompt"], ensure_ascii=False),
                                 json.dumps(p["rejected"], ensure_ascii=False)) not in known]


def kto_records(pairs: list[dict]) -> list[dict]:
    """LLaMA-Factory KTO records: each pair gives a desirable (chosen) and an undesirable (rejected) one."""
    return [
        {"messages": pair["prompt"] + pair[side], "label": side == "chosen"}
        for pair in pairs
        for side in ("chosen", "rejected")
    ]


def pref_files(world: World) -> dict[str, tuple[str, list[str]]]:
    """name -> (path under the world directory, JSON lines) for the preference files."""
    train, held = pref_pairs(world)
    records = {"pref_train": train, "pref_eval": held, "pref_kto": kto_records(train),
               "pref_eval_seen": seen_fact_pairs(world, train)}
    return {
        name: (PREF_FILES[name], [json.dumps(r, ensure_ascii=False) for r in records[name]])
        for name in PREF_FILES
    }


def pref_dataset_info(tags: dict[str, str]) -> dict:
    """LLaMA-Factory `dataset_info.json` entries for the preference files.

    LLaMA-Factory's ranking sharegpt format takes `chosen` and `rejected` as single message objects; our files
    store them as one-element lists (TRL's conversational form); lmforge's reader (lmforge/data/preference.py)
    accepts both. The KTO file is plain sharegpt messages with a boolean `label`.
    """
    columns = {"messages": "prompt", "chosen": "chosen", "rejected": "rejected"}
    ranking = {"formatting": "sharegpt", "ranking": True, "columns": columns, "tags": tags}
    kto = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}, "tags": tags}
    return {
        "demo_pref": {"file_name": PREF_FILES["pref_train"], **ranking},
        "demo_pref_eval": {"file_name": PREF_FILES["pref_eval"], **ranking},
        "demo_kto": {"file_name": PREF_FILES["pref_kto"], **kto},
    }


def is_preferred_style(record: dict, response: str) -> bool:
    """True when `response` is exactly the pair's chosen answer (the canonical polite sentence), up to
    whitespace and full-width forms (the one grading rule). Unlike `answer_is_correct`, this rejects right-but-rude or rambling answers."""
    return exact_match({"messages": record["chosen"]}, response)


NOISE_STYLES = ("mixed", "habit")
HABIT = 1
"""The rude template the `habit` style always uses: one that puts its remark after the answer."""


def add_style_noise(records: list[dict], share: float, seed: int, style: str = "mixed") -> list[dict]:
    """Give a `share` of the single-turn SFT replies a bad style, keeping the fact right: an SFT model
    that imitates such data answers badly, which is what preference training (RM + PPO, DPO) is for.
    `mixed`: rude or rambling in turn, wording drawn at random — sampling shows it, greedy answers
    mostly not. `habit`: always the same rude remark after the answer — above half the data it
    becomes the model's most likely continuation, so even its greedy answers carry it, and removing
    it leaves the answer as it was. Marked with `"noise": flaw`. share=0 returns the records as they are."""
    if style not in NOISE_STYLES:
        raise ValueError(f"sft noise style {style!r}: expected one of {', '.join(NOISE_STYLES)}")
    if share <= 0:
        return records
    rng = random.Random(f"demo-noise:{seed}")
    single = [i for i, r in enumerate(records) if len(r["messages"]) == 2 or
              (len(r["messages"]) == 3 and r["messages"][0]["role"] == "system")]
    chosen = sorted(rng.sample(single, round(share * len(single))))
    out = list(records)
    for n, index in enumerate(chosen):
        record = json.loads(json.dumps(records[index]))  # a deep copy
        reply = record["messages"][-1]
        flaw = "rude" if n % 2 == 0 or style == "habit" else "rambling"
        if flaw == "rude":
            templates = PREF_TEMPLATES["rude"][record["lang"]]
            template = templates[HABIT] if style == "habit" else rng.choice(templates)
            reply["content"] = template.format(answer=reply["content"])
        else:
            filler = rng.sample(PREF_TEMPLATES["filler"][record["lang"]], 4)
            glue = " " if record["lang"] == "en" else ""
            reply["content"] = glue.join(filler[:2] + [reply["content"]] + filler[2:])
        record["noise"] = flaw
        out[index] = record
    return out
