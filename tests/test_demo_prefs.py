"""The demo world's preference data: pairs, KTO records, seen-fact pairs and SFT style noise."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import assistant_replies as _assistant
from conftest import jsonl_records as _jsonl
from conftest import lang_of as _lang

from lmforge.demo.grading import answer_is_correct
from lmforge.demo.prefs import FLAW_SHARES, PREF_TEMPLATES, is_preferred_style, pref_files
from lmforge.demo.world import ATTRIBUTES, SYLLABLES, TEMPLATES, build_world, load_world
from lmforge.demo.write import write_demo_world

PAIR_KEYS = ["prompt", "chosen", "rejected", "answer", "lang", "kind", "id", "subject", "distractors", "flaw"]


@pytest.fixture(scope="module")
def prefs(demo_files: dict[str, Path]) -> tuple[list[dict], list[dict]]:
    return _jsonl(demo_files["pref_train"]), _jsonl(demo_files["pref_eval"])


def _reply(pair: dict, side: str) -> str:
    return pair[side][0]["content"]


def _key(record: dict) -> tuple[str, str, str]:
    return record["subject"], record["kind"], record["lang"]


def test_pref_files_deterministic_per_seed() -> None:
    assert pref_files(build_world(1)) == pref_files(build_world(1))
    assert pref_files(build_world(1))["pref_train"] != pref_files(build_world(2))["pref_train"]


def test_pref_lines_parse_with_keys(demo_files: dict[str, Path], prefs: tuple[list[dict], list[dict]]) -> None:
    kinds = set(ATTRIBUTES) | {"arith"}
    for pairs in prefs:
        for pair in pairs:
            assert list(pair) == PAIR_KEYS
            assert [m["role"] for m in pair["prompt"]] == ["user"]
            assert [m["role"] for m in pair["chosen"] + pair["rejected"]] == ["assistant", "assistant"]
            assert pair["lang"] in ("en", "zh") and pair["kind"] in kinds and pair["flaw"] in FLAW_SHARES
            texts = [_reply(pair, "chosen"), _reply(pair, "rejected"), pair["prompt"][0]["content"]]
            assert all(t and _lang(t) == pair["lang"] for t in texts)
            assert _reply(pair, "chosen") != _reply(pair, "rejected")
        assert {p["lang"] for p in pairs} == {"en", "zh"} and {p["kind"] for p in pairs} == kinds
    train, held = prefs
    assert len({p["id"] for p in train + held}) == len(train) + len(held)
    for path in (demo_files["pref_train"], demo_files["pref_eval"], demo_files["pref_kto"]):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n") and "\r" not in text


def test_pref_sizes_and_flaw_mix(prefs: tuple[list[dict], list[dict]]) -> None:
    train, held = prefs
    assert 800 <= len(train) <= 1500 and 100 <= len(held) <= 200
    for pairs in (train, held):
        for flaw, share in FLAW_SHARES.items():
            assert abs(sum(p["flaw"] == flaw for p in pairs) / len(pairs) - share) <= 0.10, flaw
        for lang in ("en", "zh"):
            assert {p["flaw"] for p in pairs if p["lang"] == lang} == set(FLAW_SHARES)


def test_pref_chosen_is_sft_reference(
    demo_files: dict[str, Path], prefs: tuple[list[dict], list[dict]], demo_sft: tuple[list[dict], list[dict]]
) -> None:
    world = load_world(demo_files["world"])
    references = {_key(r): _assistant(r)[-1] for r in demo_sft[0] + demo_sft[1]}
    facts = {(world.term(f.entity, lang), f.attribute, lang): f for f in world.facts for lang in ("en", "zh")}
    for pair in prefs[0] + prefs[1]:
        chosen = _reply(pair, "chosen")
        if pair["kind"] == "arith":
            a, op, b = pair["subject"].split()
            canonical = TEMPLATES["sum", op, pair["lang"]][0].format(a=a, b=b, c=pair["answer"])
            assert chosen == references.get(_key(pair), canonical), pair["id"]
        else:
            canonical = world.answer(facts[_key(pair)], pair["lang"])
            assert chosen == references[_key(pair)] == canonical, pair["id"]
        assert answer_is_correct(pair, chosen), pair["id"]
        assert is_preferred_style(pair, f" {chosen}\n"), pair["id"]


def test_pref_rejected_by_flaw(demo_files: dict[str, Path], prefs: tuple[list[dict], list[dict]]) -> None:
    world = load_world(demo_files["world"])
    facts = {(world.term(f.entity, lang), f.attribute, lang): f for f in world.facts for lang in ("en", "zh")}
    for pair in prefs[0] + prefs[1]:
        chosen, rejected, flaw = _reply(pair, "chosen"), _reply(pair, "rejected"), pair["flaw"]
        assert not is_preferred_style(pair, rejected), pair["id"]
        if flaw in ("wrong", "hedged"):
            assert not answer_is_correct(pair, rejected), pair["id"]
        else:  # right but bad: the canonical sentence is in there, so the answer value is too
            assert chosen in rejected and pair["answer"] in rejected and rejected != chosen, pair["id"]
            assert answer_is_correct(pair, rejected), pair["id"]
        if flaw == "wrong" and pair["kind"] != "arith":
            fact = facts[_key(pair)]
            wrongs = {world.answer(fact, pair["lang"], value=v) for v in world.wrong_values(fact)}
            assert rejected in wrongs, pair["id"]
        elif flaw == "wrong":  # the same sentence with another result
            assert rejected.rsplit(" ", 1)[0] == chosen.rsplit(" ", 1)[0], pair["id"]
        elif flaw == "hedged":
            assert pair["answer"] in rejected and chosen not in rejected, pair["id"]
        elif flaw == "rambling":
            assert len(rejected) > 3 * len(chosen), pair["id"]


def test_pref_eval_asks_only_heldout(
    prefs: tuple[list[dict], list[dict]], demo_sft: tuple[list[dict], list[dict]]
) -> None:
    train, held = prefs
    assert not {_key(p) for p in held} & {_key(p) for p in train}
    # The same held-out split as sft/eval.jsonl, and nothing SFT trains on.
    assert {_key(p) for p in held} == {_key(r) for r in demo_sft[1]}
    assert not {_key(p) for p in held} & {_key(r) for r in demo_sft[0]}
    assert {_key(r) for r in demo_sft[0]} <= {_key(p) for p in train}


def test_kto_file_balanced(demo_files: dict[str, Path], prefs: tuple[list[dict], list[dict]]) -> None:
    kto = _jsonl(demo_files["pref_kto"])
    assert all(list(r) == ["messages", "label"] and isinstance(r["label"], bool) for r in kto)
    assert sum(r["label"] for r in kto) == sum(not r["label"] for r in kto) == len(prefs[0])
    sides = ("chosen", "rejected")
    expected = [(p["prompt"] + p[side], side == "chosen") for p in prefs[0] for side in sides]
    assert [(r["messages"], r["label"]) for r in kto] == expected


def test_pref_wording_names_no_value_or_name() -> None:
    """Rude, filler and hedge wording must not mention a value, a number or a possible name, or grading of
    rejected answers would depend on the seed."""
    world = build_world(0)
    values = [(en, zh) for _, vs in ATTRIBUTES.values() if not isinstance(vs, str) for en, zh in vs]
    syllables = [en for en, _ in SYLLABLES]
    spellable = {a + b for a in syllables for b in syllables}
    spellable |= {w + c for w in spellable for c in syllables}
    for kind, langs in PREF_TEMPLATES.items():
        assert set(langs) == {"en", "zh"} and all(len(texts) >= 3 for texts in langs.values()), kind
        for text in langs["en"] + langs["zh"]:
            assert not re.search(r"\d", text), text
            assert not any(zh in text for _, zh in SYLLABLES), text
            assert not any(zh in text for _, zh in values), text
            words = set(re.findall(r"[a-z]+", text.lower()))
            assert not words & ({en.lower() for en, _ in values} | spellable), text
            assert not any(e.zh in text for e in world.entities), text


def test_sft_noise_restyles_a_share_of_replies_and_keeps_the_facts(tmp_path) -> None:
    clean = write_demo_world(tmp_path / "clean", seed=0)
    noisy = write_demo_world(tmp_path / "noisy", seed=0, sft_noise=0.25)
    assert noisy["pt_train"].read_bytes() == clean["pt_train"].read_bytes()
    assert noisy["sft_eval"].read_bytes() == clean["sft_eval"].read_bytes()  # evaluation stays clean
    before = [json.loads(line) for line in clean["sft_train"].read_text(encoding="utf-8").splitlines()]
    after = [json.loads(line) for line in noisy["sft_train"].read_text(encoding="utf-8").splitlines()]
    changed = [(b, a) for b, a in zip(before, after) if a != b]
    single = sum(len(r["messages"]) == 2 or (len(r["messages"]) == 3 and r["messages"][0]["role"] == "system")
                 for r in before)
    assert len(changed) == round(0.25 * single)
    for b, a in changed:
        assert a["noise"] in ("rude", "rambling")
        assert b["messages"][-1]["content"] in a["messages"][-1]["content"]  # the right answer is still there
        assert answer_is_correct(a, a["messages"][-1]["content"])


def test_seen_fact_pairs_are_new_pairs_about_trained_facts(demo_files: dict[str, Path]) -> None:
    def load(key):
        return [json.loads(line) for line in demo_files[key].read_text(encoding="utf-8").splitlines()]

    train, seen, held = load("pref_train"), load("pref_eval_seen"), load("pref_eval")
    as_key = lambda p: (json.dumps(p["prompt"]), json.dumps(p["rejected"]))  # noqa: E731
    assert not {as_key(p) for p in seen} & {as_key(p) for p in train}
    trained_facts = {(p["subject"], p["kind"], p["lang"]) for p in train}
    assert all((p["subject"], p["kind"], p["lang"]) in trained_facts for p in seen)
    assert not {(p["subject"], p["kind"]) for p in seen if p["kind"] != "arith"} & \
        {(p["subject"], p["kind"]) for p in held if p["kind"] != "arith"}
    assert 200 <= len(seen) <= 320
    assert all(answer_is_correct(p, p["chosen"][0]["content"]) for p in seen)
