"""The one way lmforge reads YAML that a user wrote: the safe loader (no Python objects), with a bound on
what anchors and aliases expand to.

PyYAML builds an alias as a second reference to the same object, so a 700-byte "billion laughs" file
loads at once and only explodes later, when the config is copied, written back as `config.yaml` or into a
manifest (88 MB from 749 bytes). The expanded size is measured on the composed node graph — linear in
the file, however large the expansion — and a document beyond the bound, one whose alias contains itself,
or one nested deeper than a config ever is, is refused before anything is built from it.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_VALUES = 100_000
"""Values (mappings, lists, keys and scalars) a document may expand to: far beyond any real config or
pipeline, far below what makes writing it back slow."""
MAX_DEPTH = 100
"""Nesting depth of a document; configs nest a few levels, and a deeper one would overflow the recursion
that copies and writes configs."""
MAX_BYTES = 4 * 2**20
"""A config or pipeline file larger than this is not a config; nor may its aliases expand to more text."""


class RefusedYAMLError(yaml.YAMLError):
    """A document refused although it parses: beyond the bounds (aliases, recursion, depth, size) or with a
    key given twice; its text is the reason (also as `problem`, where YAML errors keep theirs)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, None


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that measures each composed document before constructing Python values from it."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent, index):
        # The composer recurses once per level: stop at the bound, long before Python's recursion limit.
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise RefusedYAMLError(f"nested deeper than {MAX_DEPTH} levels (line {self.peek_event().start_mark.line + 1}); "
                                    "a config nests a few")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def compose_mapping_node(self, anchor):
        # PyYAML keeps the last of two equal keys without a word; which one the author meant is a guess.
        # Checked as written, before merge keys (<<) copy pairs in.
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = (key_node.tag, key_node.value), key_node.start_mark.line + 1
                if key in seen:
                    raise RefusedYAMLError(f"the key {key_node.value!r} is given twice (lines {seen[key]} and {line}); "
                                           "keep one")
                seen[key] = line
        return node

    def compose_document(self):
        node = super().compose_document()
        check_expansion(node)
        return node


def safe_load(text: str) -> Any:
    """yaml.safe_load with the bounds; RefusedYAMLError (a yaml.YAMLError) says which one was passed."""
    if len(text) > MAX_BYTES:
        raise RefusedYAMLError(f"{len(text)} characters is larger than a config can be ({MAX_BYTES // 2**20} MiB)")
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 (BoundedLoader is a SafeLoader)
    except RecursionError:
        raise RefusedYAMLError(f"nested deeper than {MAX_DEPTH} levels; a config nests a few") from None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def check_expansion(root: yaml.Node | None) -> None:
    """Refuse a node graph whose tree (aliases expanded) has more than MAX_VALUES values, more than
    MAX_BYTES characters of scalars (an alias to a long string is written out in full each time), more
    than MAX_DEPTH levels, or a cycle. Each distinct node is measured once: sizes are memoised."""
    if root is None:
        return
    measured: dict[int, tuple[int, int, int]] = {}  # node -> (values, depth, characters) expanded
    open_nodes: set[int] = set()  # nodes whose children are being measured: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            open_nodes.discard(key)
            measured[key] = _measure(node, [measured[id(kid)] for kid in _children(node)])
            continue
        if key in measured:
            continue
        open_nodes.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in open_nodes:
                raise RefusedYAMLError(f"an alias refers to the collection anchored at line {kid.start_mark.line + 1}, "
                                       "which contains it; such a value never ends")
            if id(kid) not in measured:
                stack.append((kid, False))


def _measure(node: yaml.Node, kids: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(values, depth, characters) of `node` expanded, from its children's; refused beyond the bounds."""
    values = 1 + sum(k[0] for k in kids)
    depth = 1 + max((k[1] for k in kids), default=0)
    chars = (len(node.value) if isinstance(node, yaml.ScalarNode) else 0) + sum(k[2] for k in kids)
    line = node.start_mark.line + 1
    if values > MAX_VALUES or chars > MAX_BYTES:
        size = f"more than {MAX_VALUES} values" if values > MAX_VALUES else f"more than {MAX_BYTES // 2**20} MiB of text"
        raise RefusedYAMLError(f"anchors and aliases expand to {size} (line {line}); write the repeated part out "
                               "or use fewer aliases")
    if depth > MAX_DEPTH:
        raise RefusedYAMLError(f"nested deeper than {MAX_DEPTH} levels (line {line}); a config nests a few")
    return values, depth, chars
