"""The demo world generator: determinism, budgets, the train/eval split, and answer grading."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from conftest import assistant_replies as _assistant
from conftest import lang_of as _lang

from lmforge.demo.grading import answer_is_correct, exact_match
from lmforge.demo.world import ATTRIBUTES, TEMPLATES, build_world, load_world
from lmforge.demo.write import write_demo_world
from lmforge.eval.choice import read_choice_file


def test_returns_every_file(demo_files: dict[str, Path]) -> None:
    assert set(demo_files) == {
        "world",
        "pt_train",
        "pt_eval",
        "sft_train",
        "sft_eval",
        "pref_train",
        "pref_eval",
        "pref_eval_seen",
        "pref_kto",
        "rl_train",
        "rl_eval",
        "rl_arith_train",
        "rl_arith_eval",
        "choice_eval",
        "tools_sft",
        "tools_train",
        "tools_eval",
        "dataset_info",
    }
    root = demo_files["world"].parent
    assert demo_files["pt_train"] == root / "pt" / "train.txt"
    assert demo_files["sft_eval"] == root / "sft" / "eval.jsonl"
    assert demo_files["pref_train"] == root / "pref" / "train.jsonl"
    assert demo_files["pref_eval"] == root / "pref" / "eval.jsonl"
    assert demo_files["pref_kto"] == root / "pref" / "kto_train.jsonl"
    assert demo_files["choice_eval"] == root / "choice" / "eval.csv"
    assert all(p.is_file() and p.stat().st_size > 0 for p in demo_files.values())


def test_same_seed_same_bytes_other_seed_differs(demo_files: dict[str, Path], tmp_path: Path) -> None:
    again = write_demo_world(tmp_path / "again", seed=0)
    for name, path in demo_files.items():
        assert again[name].read_bytes() == path.read_bytes(), name
    other = write_demo_world(tmp_path / "other", seed=1)
    for name in set(demo_files) - {"dataset_info"}:
        assert other[name].read_bytes() != demo_files[name].read_bytes(), name
    assert {e.name for e in build_world(0).entities} != {e.name for e in build_world(1).entities}


def test_world_shape() -> None:
    world = build_world(0)
    # sized so a ~1.5M-parameter model learns it on a 2-core CPU in about two minutes
    assert 30 <= len(world.entities) <= 40
    assert 140 <= len(world.facts) <= 200
    assert len({e.name for e in world.entities}) == len({e.zh for e in world.entities}) == len(world.entities)
    for attr, (_, values) in ATTRIBUTES.items():
        if not isinstance(values, str):
            assert 5 <= len(values) <= 10, attr
    heldout = sum(f.heldout for f in world.facts)
    assert 0.15 <= heldout / len(world.facts) <= 0.20
    for fact in world.facts:
        wrong = world.wrong_values(fact)
        assert fact.value not in wrong and fact.entity not in wrong and wrong
        assert set(wrong) | {fact.value} <= set(world.value_set(fact.attribute))
        if fact.attribute == "home":
            assert world.entity(fact.value).kind == "town"


def test_load_world_round_trips(demo_files: dict[str, Path]) -> None:
    world = load_world(demo_files["world"])
    assert world.facts == build_world(0).facts
    assert world.entities == load_world(demo_files["world"].parent).entities
    assert world.arith_heldout == build_world(0).arith_heldout


def test_pt_one_document_per_line_within_budget(demo_files: dict[str, Path]) -> None:
    train_text = demo_files["pt_train"].read_text(encoding="utf-8")
    eval_text = demo_files["pt_eval"].read_text(encoding="utf-8")
    for text in (train_text, eval_text):
        assert text.endswith("\n") and "\r" not in text
        lines = text.splitlines()
        assert all(line.strip() == line and line for line in lines)
        assert {_lang(line) for line in lines} == {"en", "zh"}
    total = len(train_text) + len(eval_text)
    assert 100_000 <= total <= 250_000, total
    assert 0.05 <= len(eval_text) / len(train_text) <= 0.10
    # Held-out documents are new renderings, never copies of training lines.
    assert not set(eval_text.splitlines()) & set(train_text.splitlines())


def test_every_fact_stated_several_times_in_both_languages(demo_files: dict[str, Path]) -> None:
    world = load_world(demo_files["world"])
    lines = demo_files["pt_train"].read_text(encoding="utf-8").splitlines()
    for fact in world.facts:
        for lang in ("en", "zh"):
            subject, value = world.term(fact.entity, lang), world.term(fact.value, lang)
            sentences = [t.format(s=subject, v=value) for t in TEMPLATES["say", fact.attribute, lang]]
            hits = [line for line in lines if any(s in line for s in sentences)]
            assert len(hits) >= 5, (fact, lang)
            # Several wordings, not one sentence repeated.
            assert len({s for s in sentences for line in hits if s in line}) >= 2, (fact, lang)


def test_sft_records_parse_and_have_keys(demo_sft: tuple[list[dict], list[dict]]) -> None:
    train, held = demo_sft
    kinds = set(ATTRIBUTES) | {"arith"}
    for record in train + held:
        assert {"messages", "answer", "lang", "kind", "id"} <= set(record)
        assert record["lang"] in ("en", "zh") and record["kind"] in kinds
        roles = [m["role"] for m in record["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(m["content"] and _lang(m["content"]) == record["lang"] for m in record["messages"])
    assert len({r["id"] for r in train + held}) == len(train) + len(held)
    for records in (train, held):
        assert {r["lang"] for r in records} == {"en", "zh"}
        assert {r["kind"] for r in records} == kinds


def test_sft_sizes(demo_sft: tuple[list[dict], list[dict]]) -> None:
    train, held = demo_sft
    assert 70 <= len(held) <= 150
    assert all(len(_assistant(r)) == 1 and r["messages"][0]["role"] == "user" for r in held)
    assert 800 <= len(train) <= 3000
    multi = sum(len(_assistant(r)) == 2 for r in train) / len(train)
    assert 0.05 <= multi <= 0.15, multi
    text = sum(len(m["content"]) for r in train for m in r["messages"])
    assert text <= 300_000, text


def test_no_eval_fact_in_sft_train(demo_files: dict[str, Path], demo_sft: tuple[list[dict], list[dict]]) -> None:
    train, held = demo_sft
    world = load_world(demo_files["world"])
    # The eval file asks exactly the held-out facts and sums, in both languages.
    asked = {(r["subject"], r["kind"]) for r in held if r["lang"] == "en"}
    expected = {(f.entity, f.attribute) for f in world.facts if f.heldout}
    expected |= {(f"{a} {op} {b}", "arith") for a, op, b in world.arith_heldout}
    assert asked == expected
    # Each fact has one canonical answer sentence, so a leak through any turn would repeat it.
    train_replies = {reply for r in train for reply in _assistant(r)}
    assert not {_assistant(r)[0] for r in held} & train_replies
    trained = {(r["subject"], r["kind"], r["lang"]) for r in train}
    assert not {(r["subject"], r["kind"], r["lang"]) for r in held} & trained


def test_eval_facts_are_in_pt_train(demo_files: dict[str, Path], demo_sft: tuple[list[dict], list[dict]]) -> None:
    lines = demo_files["pt_train"].read_text(encoding="utf-8").splitlines()
    by_lang = {lang: [line for line in lines if _lang(line) == lang] for lang in ("en", "zh")}
    for record in demo_sft[1]:
        pool = by_lang[record["lang"]]
        if record["kind"] == "arith":
            assert any(_assistant(record)[0] in line for line in pool), record["id"]
        else:
            assert any(record["subject"] in line and record["answer"] in line for line in pool), record["id"]


def test_reference_answers_grade_correct(demo_sft: tuple[list[dict], list[dict]]) -> None:
    for record in demo_sft[0] + demo_sft[1]:
        reference = _assistant(record)[-1]
        assert exact_match(record, f"  {reference}\n")
        assert answer_is_correct(record, reference), record["id"]


def test_wrong_and_hedged_answers_grade_incorrect(demo_sft: tuple[list[dict], list[dict]]) -> None:
    checked = 0
    for record in demo_sft[1]:
        reference = _assistant(record)[0]
        if record["kind"] == "arith" or record["answer"].isdigit():
            continue
        wrong = record["distractors"][0]
        assert not answer_is_correct(record, reference.replace(record["answer"], wrong)), record["id"]
        assert not exact_match(record, reference.replace(record["answer"], wrong))
        joiner = " or " if record["lang"] == "en" else "或"
        assert not answer_is_correct(record, f"{record['answer']}{joiner}{wrong}"), record["id"]
        checked += 1
    assert checked >= 40


def test_answer_is_correct_cases() -> None:
    food = {"answer": "plums", "kind": "food", "lang": "en", "distractors": ["rice", "apples"]}
    assert answer_is_correct(food, "The favourite food of Velmora is PLUMS!")
    assert answer_is_correct(food, "plums")
    assert not answer_is_correct(food, "plums or rice")
    assert not answer_is_correct(food, "It is rice.")
    assert not answer_is_correct(food, "It is a plum.")
    zh = {"answer": "红色", "kind": "colour", "lang": "zh", "distractors": ["蓝色", "绿色"]}
    assert answer_is_correct(zh, "维莫拉最喜欢的颜色是红色。")
    assert not answer_is_correct(zh, "红色或蓝色")
    age = {"answer": "29", "kind": "age", "lang": "en", "distractors": ["34"]}
    assert answer_is_correct(age, "Velmora is 29 years old.")
    assert not answer_is_correct(age, "Velmora is 29 or 34 years old.")
    assert not answer_is_correct(age, "Velmora is 290 years old.")
    add = {"answer": "12", "kind": "arith", "lang": "en", "subject": "7 + 5", "distractors": []}
    for good in ("7 plus 5 equals 12.", "7 + 5 = 12", "12", "7 加 5 等于 12。", "7加5等于12"):
        assert answer_is_correct(add, good), good
    for bad in ("7 + 5 = 13", "12 or 13", "12 or 5", "The answer is 7.", "no idea"):
        assert not answer_is_correct(add, bad), bad
    same = {"answer": "5", "kind": "arith", "lang": "en", "subject": "0 + 5", "distractors": []}
    assert answer_is_correct(same, "0 + 5 = 5") and answer_is_correct(same, "5")


def test_choice_file_asks_held_out_questions_with_their_answer_among_four(
    demo_files: dict[str, Path], demo_sft: tuple[list[dict], list[dict]]
) -> None:
    assert demo_files["choice_eval"].read_text(encoding="utf-8").startswith("id,question,A,B,C,D,answer\n")
    questions = read_choice_file(demo_files["choice_eval"])
    held = {r["id"]: r for r in demo_sft[1]}
    assert len(questions) == sum(len(r["distractors"]) >= 3 for r in held.values()) >= 40
    assert {_lang(q.question) for q in questions} == {"en", "zh"}
    for question in questions:
        record = held[question.id]
        assert question.question == record["messages"][0]["content"]
        assert len(question.options) == len(set(question.options)) == 4
        assert question.options[question.answer] == record["answer"]
        assert set(question.options) - {record["answer"]} <= set(record["distractors"])
    letters = Counter(q.answer_letter for q in questions)
    assert set(letters) == set("ABCD") and max(letters.values()) <= 0.4 * len(questions), letters


def test_dataset_info_points_to_files(demo_files: dict[str, Path]) -> None:
    info = json.loads(demo_files["dataset_info"].read_text(encoding="utf-8"))
    sets = {"demo_pt", "demo_pt_eval", "demo_sft", "demo_sft_eval", "demo_pref", "demo_pref_eval", "demo_kto"}
    assert set(info) == sets
    root = demo_files["dataset_info"].parent
    for name, entry in info.items():
        assert (root / entry["file_name"]).is_file(), name
    assert info["demo_pt"] == {"file_name": "pt/train.txt", "columns": {"prompt": "text"}}
    for name in ("demo_sft", "demo_sft_eval"):
        assert info[name]["formatting"] == "sharegpt"
        assert info[name]["columns"] == {"messages": "messages"}
        assert info[name]["tags"]["assistant_tag"] == "assistant"
    for name, file in (("demo_pref", "pref_train"), ("demo_pref_eval", "pref_eval")):
        assert root / info[name]["file_name"] == demo_files[file]
        assert info[name]["ranking"] is True and info[name]["formatting"] == "sharegpt"
        assert info[name]["columns"] == {"messages": "prompt", "chosen": "chosen", "rejected": "rejected"}
        assert info[name]["tags"]["user_tag"] == "user" and info[name]["tags"]["assistant_tag"] == "assistant"
    assert root / info["demo_kto"]["file_name"] == demo_files["pref_kto"]
    assert "ranking" not in info["demo_kto"] and info["demo_kto"]["formatting"] == "sharegpt"
    assert info["demo_kto"]["columns"] == {"messages": "messages", "kto_tag": "label"}
    assert info["demo_kto"]["tags"]["role_tag"] == "role"


def test_rl_prompts_ask_what_sft_did_not_and_hold_out_what_sft_held_out(demo_files: dict[str, Path]) -> None:
    read = {name: [json.loads(line) for line in demo_files[name].read_text().splitlines()]
            for name in ("sft_train", "sft_eval", "rl_train", "rl_eval", "rl_arith_train", "rl_arith_eval")}
    sft_sums = {r["subject"] for r in read["sft_train"] if r["kind"] == "arith"}
    held_sums = {r["subject"] for r in read["sft_eval"] if r["kind"] == "arith"}
    rl_sums = {r["subject"] for r in read["rl_arith_train"]}
    assert rl_sums and not rl_sums & sft_sums and not rl_sums & held_sums
    assert {r["id"] for r in read["rl_arith_train"]} <= {r["id"] for r in read["rl_train"]}
    assert read["rl_eval"] == read["sft_eval"]
    assert read["rl_arith_eval"] == [r for r in read["sft_eval"] if r["kind"] == "arith"]
    for record in read["rl_train"]:  # every prompt carries its reference reply and a checkable answer
        assert record["messages"][-1]["role"] == "assistant" and record["answer"]


def test_arith_reps_states_every_sum_that_many_more_times() -> None:
    from lmforge.demo.world import build_world, pt_corpus

    world = build_world(0)
    once, thrice = pt_corpus(world)[0], pt_corpus(world, arith_reps=3)[0]
    for canonical in ("7 plus 8 equals 15.", "7 加 8 等于 15。"):  # once per canonical round, maybe in a random one
        in_once, in_thrice = (sum(d.count(canonical) for d in docs) for docs in (once, thrice))
        assert 1 <= in_once <= 2 and 3 <= in_thrice <= 6 and in_thrice >= in_once + 2
    assert set(once) - set(thrice) <= {d for d in once if any(c.isdigit() for c in d)}  # facts text unchanged
