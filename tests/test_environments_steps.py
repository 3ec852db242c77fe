"""Multi-turn rollouts step a group's tool environments on threads, so their tool processes run side by side;
environments that do not allow it step one after another, in order."""

from __future__ import annotations

import threading

from lmforge.rollout.environments import ToolEnvironment
from lmforge.rollout.multiturn import _steps


def test_tool_environments_of_a_group_step_side_by_side_and_others_in_order():
    class Waits:
        """Each step waits for the other trajectory's step: only steps run side by side get through."""

        concurrent_steps = True

        def __init__(self, barrier, order):
            self.barrier, self.order = barrier, order

        def step(self, reply):
            self.barrier.wait(timeout=5)
            self.order.append(reply)
            return [{"role": "tool", "content": reply}], float(len(reply)), False

    order: list[str] = []
    barrier = threading.Barrier(2)
    out = _steps([Waits(barrier, order), Waits(barrier, order)], ["a", "bb"])
    assert out == [([{"role": "tool", "content": "a"}], 1.0, False), ([{"role": "tool", "content": "bb"}], 2.0, False)]
    assert ToolEnvironment.concurrent_steps is True

    class Serial(Waits):
        concurrent_steps = False

    lone = threading.Barrier(1)  # in order, each step passes alone
    order.clear()
    assert [r for _, r, _ in _steps([Serial(lone, order), Serial(lone, order), Serial(lone, order)], ["x", "y", "z"])] \
        == [1.0, 1.0, 1.0] and order == ["x", "y", "z"]
