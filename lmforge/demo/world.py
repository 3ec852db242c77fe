"""A deterministic synthetic world for the embedded demo: fictional entities, their facts, and sums.

Because every fact is known, each training stage is measurable: held-out perplexity on the encyclopedia
corpus falls after PT, and exact-match answers to held-out questions rise after SFT. The world is small on
purpose (about 220 facts over closed value sets of 5-10 values) so that a 1-5M-parameter model trained
from scratch on a 2-core CPU can learn it in minutes. Everything is rendered in English and Chinese.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

# Pure wording (value tables, name syllables, system prompts, templates) lives in world.yaml.
WORDING = yaml.safe_load((resources.files("lmforge") / "demo" / "world.yaml").read_text("utf-8"))


def _pairs(table: dict) -> tuple[tuple[str, str], ...]:
    """A bilingual table from demo_world.yaml ({"red": "红色", ...}) as (("red", "红色"), ...), in file order."""
    pairs = tuple(table.items())
    if not all(isinstance(en, str) and isinstance(zh, str) for en, zh in pairs):
        raise TypeError(f"demo_world.yaml: every value-table entry must be a string: {pairs}")
    return pairs


# Closed value sets (English, Chinese); see demo_world.yaml for the wording and its constraints.
COLOURS = _pairs(WORDING["colours"])
FOODS = _pairs(WORDING["foods"])
PROFESSIONS = _pairs(WORDING["professions"])
REGIONS = _pairs(WORDING["regions"])
AGES = _pairs(WORDING["ages"])

# attribute -> (kinds of entity that have it, its closed value set or the kind of entity its values name)
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str], ...] | str]] = {
    "colour": (("person", "creature"), COLOURS),
    "food": (("person", "creature"), FOODS),
    "home": (("person", "creature"), "town"),
    "age": (("person", "creature"), AGES),
    "profession": (("person",), PROFESSIONS),
    "friend": (("person",), "person"),
    "region": (("town",), REGIONS),
    "specialty": (("town",), FOODS),
}
KIND_COUNTS = {"town": 8, "person": 16, "creature": 10}
HELDOUT_FRACTION = 0.18
ARITH_MAX = 10
ARITH_HELDOUT = 16

# Name syllables (English, Chinese), whose Chinese characters appear in no template or value.
SYLLABLES = _pairs(WORDING["syllables"])

# (table, key, lang) -> templates, e.g. ("say", "colour", "en"). The FIRST `say` and `sum` template is the
# canonical SFT answer, so the answer a model must give is a sentence it has already read in pre-training.
TEMPLATES: dict[tuple[str, str, str], list[str]] = {
    (table, key, lang): list(texts)
    for table, keys in WORDING["templates"].items()
    for key, langs in keys.items()
    for lang, texts in langs.items()
}
SYSTEM: dict[str, str] = dict(WORDING["system"])
LANGS = ("en", "zh")


@dataclass(frozen=True)
class Entity:
    name: str  # English name; also the entity's key
    zh: str
    kind: str  # "person", "creature" or "town"


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str  # English form: a closed-set value, an age, or another entity's name
    heldout: bool = False  # True: asked only in sft/eval.jsonl (still stated in the PT corpus)


Problem = tuple[int, str, int]  # (a, "+" or "-", b)


@dataclass
class World:
    """The truth: entities, their facts, and which facts and sums are held out of SFT training."""

    seed: int
    entities: list[Entity]
    facts: list[Fact]
    arith_heldout: list[Problem]
    lexicon: dict[str, str] = field(init=False, repr=False)  # English term -> Chinese term

    def __post_init__(self) -> None:
        self.lexicon = {
            en: zh for _, values in ATTRIBUTES.values() if not isinstance(values, str) for en, zh in values
        }
        self.lexicon.update({e.name: e.zh for e in self.entities})

    def term(self, en: str, lang: str) -> str:
        """A value or entity name in `lang`."""
        return en if lang == "en" else self.lexicon[en]

    def entity(self, name: str) -> Entity:
        return next(e for e in self.entities if e.name == name)

    def facts_of(self, name: str) -> list[Fact]:
        return [f for f in self.facts if f.entity == name]

    def value_of(self, name: str, attribute: str) -> str:
        return next(f.value for f in self.facts if f.entity == name and f.attribute == attribute)

    def value_set(self, attribute: str) -> list[str]:
        """Every possible value of `attribute` (English forms), in a fixed order."""
        values = ATTRIBUTES[attribute][1]
        if isinstance(values, str):
            return sorted(e.name for e in self.entities if e.kind == values)
        return [en for en, _ in values]

    def wrong_values(self, fact: Fact) -> list[str]:
        """The values `fact` could have had but does not: wrong answers for preference pairs."""
        return [v for v in self.value_set(fact.attribute) if v not in (fact.value, fact.entity)]

    def answer(self, fact: Fact, lang: str, value: str | None = None) -> str:
        """The canonical answer sentence for `fact`; pass one of `wrong_values(fact)` as `value` to get the
        rejected side of a preference pair in exactly the same wording."""
        template = TEMPLATES["say", fact.attribute, lang][0]
        return template.format(s=self.term(fact.entity, lang), v=self.term(value or fact.value, lang))

    def arith_problems(self) -> list[Problem]:
        """All sums and (non-negative) differences of numbers 0..ARITH_MAX."""
        adds = [(a, "+", b) for a in range(ARITH_MAX + 1) for b in range(ARITH_MAX + 1)]
        return adds + [(a, "-", b) for a in range(ARITH_MAX + 1) for b in range(a + 1)]

    def to_dict(self) -> dict:
        closed = {a: v if isinstance(v, str) else dict(v) for a, (_, v) in ATTRIBUTES.items()}  # en -> zh
        return {
            "seed": self.seed,
            "attributes": {
                a: {"kinds": list(kinds), "values": closed[a]} for a, (kinds, _) in ATTRIBUTES.items()
            },
            "entities": [
                {**asdict(e), "attributes": {f.attribute: f.value for f in self.facts_of(e.name)}}
                for e in self.entities
            ],
            "facts": [asdict(f) for f in self.facts],
            "arithmetic": {
                "max": ARITH_MAX,
                "ops": ["+", "-"],
                "eval": [list(p) for p in self.arith_heldout],
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> World:
        entities = [Entity(e["name"], e["zh"], e["kind"]) for e in data["entities"]]
        facts = [Fact(**f) for f in data["facts"]]
        return cls(data["seed"], entities, facts, [(a, op, b) for a, op, b in data["arithmetic"]["eval"]])


def load_world(path: str | Path) -> World:
    """Read `world.json` (or the directory holding it) back into a World."""
    path = Path(path)
    if path.is_dir():
        path = path / "world.json"
    return World.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _make_names(rng: random.Random, count: int) -> list[tuple[str, str]]:
    names: list[tuple[str, str]] = []
    while len(names) < count:
        parts = rng.sample(SYLLABLES, rng.choice((2, 2, 3)))
        en, zh = "".join(p[0] for p in parts).capitalize(), "".join(p[1] for p in parts)
        # No name may contain another (in either language): tests and graders find names by substring.
        if any(en.lower() in o.lower() or o.lower() in en.lower() or zh in z or z in zh for o, z in names):
            continue
        names.append((en, zh))
    return names


def build_world(seed: int = 0) -> World:
    """Draw a world from `seed`: entities, one value per (entity, attribute), and the held-out split."""
    rng = random.Random(f"demo-world:{seed}")  # str seeds hash with sha512: stable across processes
    names = iter(_make_names(rng, sum(KIND_COUNTS.values())))
    entities = [Entity(*next(names), kind) for kind, n in KIND_COUNTS.items() for _ in range(n)]
    entities.sort(key=lambda e: (list(KIND_COUNTS).index(e.kind), e.name))
    facts = []
    for ent in entities:
        for attr, (kinds, values) in ATTRIBUTES.items():
            if ent.kind not in kinds:
                continue
            if isinstance(values, str):
                choices = [e.name for e in entities if e.kind == values and e.name != ent.name]
            else:
                choices = [en for en, _ in values]
            facts.append(Fact(ent.name, attr, rng.choice(choices)))
    # Hold out a fixed share of every attribute so that eval asks each kind of question.
    heldout = set()
    for attr in ATTRIBUTES:
        idx = [i for i, f in enumerate(facts) if f.attribute == attr]
        heldout.update(rng.sample(idx, max(1, round(HELDOUT_FRACTION * len(idx)))))
    facts = [Fact(f.entity, f.attribute, f.value, i in heldout) for i, f in enumerate(facts)]
    world = World(seed, entities, facts, [])
    world.arith_heldout = sorted(rng.sample(world.arith_problems(), ARITH_HELDOUT))
    return world


def say(world: World, fact: Fact, lang: str, template: str) -> str:
    return template.format(s=world.term(fact.entity, lang), v=world.term(fact.value, lang))


def solve(problem: Problem) -> int:
    a, op, b = problem
    return a + b if op == "+" else a - b


def say_arith(problem: Problem, template: str) -> str:
    return template.format(a=problem[0], b=problem[2], c=solve(problem))


def _entity_doc(world: World, ent: Entity, facts: list[Fact], lang: str, rng: random.Random) -> str:
    facts = list(facts)
    rng.shuffle(facts)
    sentences = [say(world, f, lang, rng.choice(TEMPLATES["say", f.attribute, lang])) for f in facts]
    intro = rng.choice(TEMPLATES["intro", ent.kind, lang]).format(s=world.term(ent.name, lang))
    if rng.random() < 0.7:
        sentences.insert(0, intro)
    return (" " if lang == "en" else "").join(sentences)


def _entity_docs(world: World, rng: random.Random, reps: int) -> list[str]:
    """Paragraphs about random subsets of each entity's facts until every fact is stated `reps` times."""
    docs = []
    for ent in world.entities:
        facts = world.facts_of(ent.name)
        for lang in LANGS:
            seen = dict.fromkeys(facts, 0)
            while min(seen.values()) < reps:
                subset = [f for f in facts if rng.random() < 0.7] or [rng.choice(facts)]
                docs.append(_entity_doc(world, ent, subset, lang, rng))
                for f in subset:
                    seen[f] += 1
    return docs


def _arith_docs(problems: list[Problem], rng: random.Random, canonical: bool) -> list[str]:
    """A few equations per line; `canonical` uses each language's answer form so SFT eval sums are in PT."""
    docs = []
    for lang in LANGS:
        todo = list(problems)
        rng.shuffle(todo)
        while todo:
            n = rng.randint(3, 6)
            chunk, todo = todo[:n], todo[n:]
            forms = [TEMPLATES["sum", p[1], lang] for p in chunk]
            docs.append(
                " ".join(say_arith(p, f[0] if canonical else rng.choice(f)) for p, f in zip(chunk, forms))
            )
    return docs


def pt_corpus(world: World, reps: int = 10, arith_reps: int = 1) -> tuple[list[str], list[str]]:
    """(train, eval) documents, one per line; eval re-renders the same facts with other random choices.
    `arith_reps`: rounds of sums, each stating every sum twice per language."""
    rng = random.Random(f"demo-pt:{world.seed}")
    problems = world.arith_problems()
    train = _entity_docs(world, rng, reps)
    for _ in range(arith_reps):  # every sum twice per language: its canonical answer form and a random wording
        train += _arith_docs(problems, rng, True)
        train += _arith_docs(problems, rng, False)
    rng.shuffle(train)
    seen = set(train)
    held = []
    # One full paragraph per entity and language; re-drawn if it happens to equal a training line, so
    # eval perplexity measures generalisation to new wordings rather than recall of exact documents.
    for ent in world.entities:
        for lang in LANGS:
            doc = _entity_doc(world, ent, world.facts_of(ent.name), lang, rng)
            while doc in seen:
                doc = _entity_doc(world, ent, world.facts_of(ent.name), lang, rng)
            held.append(doc)
    held += [d for d in _arith_docs(rng.sample(problems, 60), rng, False) if d not in seen]
    rng.shuffle(held)
    return train, held
