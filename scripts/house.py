"""The house of lmforge, read from its imports: rooms (packages), the floor each sits on, the arrows
between them, and what breaks the rule that imports only point down (issue 21's table).

    python scripts/house.py            # the table and every offending import
    python scripts/house.py --json     # the same as JSON (the tests read it)

Counted: circles between modules (import cycles, module level or not), upward imports (a room importing a
room on a higher floor), imports inside functions that dodge a circle (the target imports the source back,
directly or not: moved to the top of the file, they would fail), and imports of another module's private
(`_name`) names. Imports inside functions made only to keep start-up fast (the CLI's) are not counted.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lmforge"

# Bottom to top (DESIGN.md's architecture). Rooms on one floor may import each other.
FLOORS: list[tuple[str, ...]] = [
    ("__init__", "config"),  # lmforge/__init__.py holds only the version
    ("losses",),
    ("data", "models", "templates", "presets"),
    ("artifacts",),
    ("rewards", "envs", "demo"),
    ("generation",),
    ("rollout", "loop"),
    ("stages",),
    ("eval", "inference", "report"),
    ("pipeline",),
    ("webui", "serve"),
    ("cli", "cli_help", "cli_use"),
]
FLOOR_OF = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports_of(path: Path, known: set[str]) -> list[dict]:
    """Every lmforge import of `path`: target module, names, line, whether inside a function."""
    module, tree = module_name(path), ast.parse(path.read_text(encoding="utf-8"))
    found, in_function = [], set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, path.name == "__init__.py")
            names = [alias.name for alias in node.names]
            # `from lmforge.pkg import module` imports a module, not a name
            modules = [f"{target}.{name}" for name in names if f"{target}.{name}" in known]
            targets = [(m, []) for m in modules] + ([(target, [n for n in names if f"{target}.{n}" not in known])]
                                                  if len(modules) < len(names) else [])
        else:
            continue
        for target, names in targets:
            if target == "lmforge" or target.startswith("lmforge."):
                found.append({"source": module, "target": target, "names": names, "line": node.lineno,
                              "in_function": id(node) in in_function})
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def survey() -> dict:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    edges = [edge for path in paths for edge in imports_of(path, known)]
    graph: dict[str, set[str]] = defaultdict(set)
    arrows: dict[tuple[str, str], int] = defaultdict(int)
    for edge in edges:
        target = edge["target"] if edge["target"] in known else edge["target"].rsplit(".", 1)[0]
        edge["target"] = target
        if target != edge["source"]:
            graph[edge["source"]].add(target)
        source_room, target_room = room_of(edge["source"]), room_of(target)
        if source_room != target_room:
            arrows[(source_room, target_room)] += 1
    unplaced = sorted({room_of(m) for m in known} - set(FLOOR_OF))
    upward = [e for e in edges if FLOOR_OF.get(room_of(e["target"]), -1) > FLOOR_OF.get(room_of(e["source"]), 99)]
    hidden = [e for e in edges if e["in_function"] and e["target"] != e["source"]
              and reaches(graph, e["target"], e["source"])]
    private = [e | {"private": [n for n in e["names"] if n.startswith("_") and not n.startswith("__")]}
               for e in edges if e["target"] != e["source"]]
    private = [e for e in private if e["private"]]
    return {"rooms": {room: FLOOR_OF.get(room) for room in sorted({room_of(m) for m in known})},
            "unplaced": unplaced, "modules": len(known),
            "arrows": [{"from": a, "to": b, "imports": n} for (a, b), n in sorted(arrows.items())],
            "circles": cycles(graph), "upward": upward, "hidden": hidden, "private": private}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    house = survey()
    if parser.parse_args().json:
        print(json.dumps(house, indent=1))
        return
    print(f"{house['modules']} modules in {len(house['rooms'])} rooms; unplaced rooms: {house['unplaced'] or 'none'}")
    for label in ("circles", "upward", "hidden", "private"):
        print(f"{label}: {len(house[label])}")
        for item in house[label]:
            print("   ", item if label == "circles" else
                  f"{item['source']}:{item['line']} -> {item['target']} {item.get('private') or item['names']}")


if __name__ == "__main__":
    main()
