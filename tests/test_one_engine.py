"""One generation engine: no decode loop or `model.generate` outside lmforge/generation/, and the house's
imports point at it from above (serve, eval, the RL stages, inference), never from it upwards."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmforge"
ENGINE = PACKAGE / "generation"
ABOVE = ("serve", "eval", "stages", "inference", "webui", "pipeline")
"""Layers above the engine (DESIGN.md): the engine may import none of them, nor rollout."""
DECODING_SIGNS = {
    "past_key_values": "a KV cache threaded from one forward call into the next",
    "DynamicCache": "transformers' cache objects",
    "StaticCache": "transformers' cache objects",
    "cache_implementation": "transformers generate's cache",
    "TextIteratorStreamer": "transformers' streaming generate",
    "multinomial": "drawing tokens by hand",
    "exponential_": "drawing tokens by hand (the exponential race)",
    "argmax": "picking the next token by hand",
}
"""Read as a keyword argument, an attribute or a name (not a string: a layer wrapper may pass a cache on)."""


def sources(outside_engine: bool = True) -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if not (outside_engine and ENGINE in p.parents)]


def generate_calls(tree: ast.AST) -> list[int]:
    """Lines of `X.generate(...)` where X is not an engine (`engine.generate`, `self.engine.generate`)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
            owner = ast.unparse(node.func.value)
            if not re.search(r"engine", owner, re.IGNORECASE):
                lines.append(node.lineno)
    return lines


def decoding_signs(path: Path, tree: ast.AST) -> list[str]:
    """Names and keywords that only a hand-written token-by-token decode loop needs, and `use_cache=True`."""
    relative = path.relative_to(PACKAGE).as_posix()
    found = []
    for node in ast.walk(tree):
        name = node.arg if isinstance(node, ast.keyword) else node.attr if isinstance(node, ast.Attribute) \
            else node.id if isinstance(node, ast.Name) else None
        if name in DECODING_SIGNS:
            found.append(f"{relative}:{node.lineno} {name} ({DECODING_SIGNS[name]})")
        elif name == "use_cache" and isinstance(node, ast.keyword) and getattr(node.value, "value", None) is True:
            found.append(f"{relative}:{node.lineno} use_cache=True (a KV cache kept for the next token)")
    return found


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return {m for m in modules if m.startswith("lmforge.")}


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_model_generate_or_decode_loop_outside_the_engine():
    calls, signs = [], []
    for path in sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls += [f"{path.relative_to(PACKAGE)}:{line}" for line in generate_calls(tree)]
        signs += decoding_signs(path, tree)
    assert calls == [], f"model.generate outside lmforge/generation/: {calls}"
    assert signs == [], f"decode-loop machinery outside lmforge/generation/: {signs}"


def test_the_scan_finds_what_it_looks_for():
    """The checks above can fail: a planted `model.generate` and a hand-written loop are both caught."""
    planted = ast.parse("out = policy.generate(ids)\nok = self.engine.generate(requests)\n"
                        "for _ in range(8):\n    out = model(ids, past_key_values=cache, use_cache=True)\n"
                        "    token = torch.multinomial(probs, 1)\n")
    assert generate_calls(planted) == [1]
    assert len(decoding_signs(PACKAGE / "stages" / "x.py", planted)) == 3
    assert decoding_signs(PACKAGE / "models" / "x.py", ast.parse("m(ids, use_cache=False, cache=kw.get('past_key_values'))")) == []


def reaches(start: str, graph: dict[str, set[str]], target: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module.startswith(target):
            return True
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    return False


def test_serve_eval_stages_and_inference_sit_above_the_engine():
    graph = {module_of(p): imported_modules(p) for p in sources(outside_engine=False)}
    for path in ENGINE.rglob("*.py"):
        upward = {m for m in imported_modules(path)
                  if not m.startswith("lmforge.generation") and m.split(".")[1] in (*ABOVE, "rollout", "cli")}
        assert not upward, f"{path.relative_to(PACKAGE)} imports {upward} (the engine sits below them)"
    for consumer in ("lmforge.serve.app", "lmforge.eval.metrics", "lmforge.stages.online", "lmforge.stages.ppo",
                     "lmforge.stages.grpo", "lmforge.stages.rloo", "lmforge.stages.sft",
                     "lmforge.inference.chat", "lmforge.inference.generate"):
        if consumer in graph:
            assert reaches(consumer, graph, "lmforge.generation"), f"{consumer} does not reach lmforge.generation"
        else:
            pytest.fail(f"{consumer} is gone: update this list")
