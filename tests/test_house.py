"""The house, from its imports (scripts/house.py): no circles, no upward imports, no imports hidden in functions
to dodge a circle, no private names imported across modules; evaluation, the pipeline and the web UI read
artifacts without the layers that write them; no stage rewires a built Trainer."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("house", ROOT / "scripts" / "house.py")
house = importlib.util.module_from_spec(spec)
spec.loader.exec_module(house)


def test_every_room_has_a_floor_and_no_import_breaks_the_rule():
    survey = house.survey()
    assert survey["unplaced"] == []
    assert survey["circles"] == []
    assert survey["upward"] == []
    assert survey["hidden"] == []
    assert survey["private"] == []


def test_the_survey_finds_what_it_looks_for(tmp_path, monkeypatch):
    """A planted package with a circle, an upward import, a circle dodged inside a function and a private
    name: each is found (the scan can fail)."""
    pkg = tmp_path / "lmforge"
    for room in ("config", "data"):
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config" / "a.py").write_text("from lmforge.data.b import thing\n_secret = 1\n")
    (pkg / "data" / "b.py").write_text("from lmforge.config.a import _secret\n\n\ndef thing():\n"
                                       "    from lmforge.data.c import other\n    return other\n")
    (pkg / "data" / "c.py").write_text("from lmforge.data.b import thing\n\n\ndef other():\n    return thing\n")
    monkeypatch.setattr(house, "PACKAGE", pkg)
    survey = house.survey()
    assert survey["circles"] == [["lmforge.config.a", "lmforge.data.b", "lmforge.data.c"]]
    assert [(e["source"], e["target"]) for e in survey["upward"]] == [("lmforge.config.a", "lmforge.data.b")]
    assert [(e["source"], e["target"]) for e in survey["hidden"]] == [("lmforge.data.b", "lmforge.data.c")]
    assert [e["private"] for e in survey["private"]] == [["_secret"]]


def arrows_between(survey: dict, source: str, target: str) -> int:
    return sum(a["imports"] for a in survey["arrows"] if a["from"] == source and a["to"] == target)


def test_readers_of_artifacts_do_not_import_the_layers_that_write_them():
    survey = house.survey()
    assert arrows_between(survey, "eval", "stages") == 0
    assert arrows_between(survey, "pipeline", "loop") == 0
    assert arrows_between(survey, "webui", "loop") == 0
    assert arrows_between(survey, "eval", "artifacts") > 0  # they read artifacts through their own room


def test_no_stage_reassigns_an_attribute_of_a_built_trainer():
    offenders = []
    for path in sorted((ROOT / "lmforge" / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:  # `trainer.x = ...`, also inside a tuple (writing into trainer.state is fine)
                for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) \
                            and leaf.value.id == "trainer":
                        offenders.append(f"{path.name}:{node.lineno} trainer.{leaf.attr}")
    assert offenders == []
