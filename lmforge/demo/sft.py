"""The demo world's SFT records: questions about its facts and sums with polite, checkable answers."""

from __future__ import annotations

import random

from lmforge.demo.world import LANGS, SYSTEM, TEMPLATES, Fact, Problem, World, say, say_arith, solve


def chat_record(
    rid: str,
    lang: str,
    kind: str,
    turn: tuple[str, str],
    answer: str,
    subject: str,
    wrong: list[str],
    system: bool,
) -> dict:
    messages = [{"role": "system", "content": SYSTEM[lang]}] if system else []
    messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    # `distractors` (the attribute's other values, in `lang`) makes every record gradable on its own and
    # hands a later preference-pair stage its wrong answers.
    fields = {
        "answer": answer,
        "lang": lang,
        "kind": kind,
        "id": rid,
        "subject": subject,
        "distractors": wrong,
    }
    return {"messages": messages, **fields}


def _fact_qa(world: World, fact: Fact, lang: str, question: str) -> tuple[str, str]:
    return say(world, fact, lang, question), world.answer(fact, lang)


def fact_record(world: World, fact: Fact, lang: str, question: str, rid: str, system: bool = False) -> dict:
    turn = _fact_qa(world, fact, lang, question)
    wrong = [world.term(v, lang) for v in world.wrong_values(fact)]
    value, subject = world.term(fact.value, lang), world.term(fact.entity, lang)
    return chat_record(rid, lang, fact.attribute, turn, value, subject, wrong, system)


def arith_record(problem: Problem, lang: str, question: str, rid: str, system: bool = False) -> dict:
    a, op, b = problem
    turn = (say_arith(problem, question), say_arith(problem, TEMPLATES["sum", op, lang][0]))
    return chat_record(rid, lang, "arith", turn, str(solve(problem)), f"{a} {op} {b}", [], system)


def _multi_turn(world: World, rng: random.Random, count: int) -> list[dict]:
    """Two questions about one entity; both facts come from the train split so no eval fact leaks."""
    by_entity: dict[str, list[Fact]] = {}
    for f in world.facts:
        if not f.heldout:
            by_entity.setdefault(f.entity, []).append(f)
    names = [n for n, fs in by_entity.items() if len(fs) >= 2]
    records = []
    for i in range(count):
        first, second = rng.sample(by_entity[rng.choice(names)], 2)
        lang = rng.choice(LANGS)
        question, rid = rng.choice(TEMPLATES["ask", second.attribute, lang]), f"train-{lang}-multi-{i}"
        record = fact_record(world, second, lang, question, rid, rng.random() < 0.2)
        q, a = _fact_qa(world, first, lang, rng.choice(TEMPLATES["ask", first.attribute, lang]))
        at = len(record["messages"]) - 2  # the first exchange goes before the final one, after any system
        record["messages"][at:at] = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        records.append(record)
    return records


def sft_records(world: World, arith_train: int = 100) -> tuple[list[dict], list[dict]]:
    """(train, eval) chat records. Train asks every train fact with every phrasing; eval asks held-out facts
    and sums once per language, single-turn and without a system prompt."""
    rng = random.Random(f"demo-sft:{world.seed}")
    train, held = [], []
    for fact in world.facts:
        for lang in LANGS:
            slug = f"{lang}-{fact.entity.lower()}-{fact.attribute}"
            questions = TEMPLATES["ask", fact.attribute, lang]
            if fact.heldout:
                held.append(fact_record(world, fact, lang, rng.choice(questions), f"eval-{slug}"))
                continue
            for k, question in enumerate(questions):
                train.append(
                    fact_record(world, fact, lang, question, f"train-{slug}-{k}", rng.random() < 0.2)
                )
    for problem in world.arith_heldout:
        for lang in LANGS:
            question = rng.choice(TEMPLATES["asksum", problem[1], lang])
            held.append(
                arith_record(problem, lang, question, f"eval-{lang}-arith-{''.join(map(str, problem))}")
            )
    pool = [p for p in world.arith_problems() if p not in set(world.arith_heldout)]
    for problem in sorted(rng.sample(pool, arith_train)):
        for lang in LANGS:
            question = rng.choice(TEMPLATES["asksum", problem[1], lang])
            rid = f"train-{lang}-arith-{''.join(map(str, problem))}"
            train.append(arith_record(problem, lang, question, rid, rng.random() < 0.2))
    train += _multi_turn(world, rng, len(train) // 9)  # about 10% of the final train set
    rng.shuffle(train)
    return train, held
