"""The demo world's tool: a calculator for the sums its tiny model cannot do from memory.

The demo model learns arithmetic only on numbers 0-10 (the sums its pre-training text states). Its tool
task asks sums of two-digit numbers (`lmforge data demo` writes them to `tools/*.jsonl`): with `add`
the model only has to copy the operands into a call and the result into its answer. Name it in a run as
`rl.tools: [lmforge.demo.tools:add]` (examples/grpo_tools_demo.yaml); it runs in the tool
sandbox like any user's function, so it is also a short example of what a tool looks like: a plain
function whose signature and docstring become the schema the model reads, that raises on bad input
(the model then reads the error as the tool's answer).
"""

from __future__ import annotations


def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a whole number, got {value!r}")
    return a + b
