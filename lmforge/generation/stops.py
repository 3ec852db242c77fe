"""Stop strings over text that arrives piece by piece, for streaming.

Each stop string has a Knuth-Morris-Pratt automaton whose state is the length of the longest end of the
text so far that begins that stop string. A new character costs amortised O(1) per stop string however
long the reply, so a token costs time linear in its own text, never in the reply so far. The same state
says how much text must be held back: the largest state is the longest tail that may still grow into a
stop string, and everything before it may be released to the client.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopCheck:
    release_to: int
    """Offset (in all the text fed so far) up to which text may be released; on a match, where it begins."""
    matched: str | None = None
    """The stop string found, or None. Where several end in one piece, the first to be complete wins (the
    earlier start on a tie): the same one a character-by-character feed would find, however the text was cut
    into pieces."""


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = list(stops)
        self.borders = [_border_table(s) for s in self.stops]
        self.states = [0] * len(self.stops)
        self.fed = 0
        """Characters fed so far."""

    def feed(self, piece: str, final: bool = False) -> StopCheck:
        """Advance over `piece`. `final` (no more text will come) releases what was held back."""
        first: tuple[int, int, str] | None = None
        for k, stop in enumerate(self.stops):
            end = self._advance(k, piece)
            if end is not None and (first is None or (end, end - len(stop)) < first[:2]):
                first = (end, end - len(stop), stop)
        self.fed += len(piece)
        if first is not None:
            return StopCheck(first[1], first[2])
        held = 0 if final else max(self.states, default=0)
        return StopCheck(self.fed - held)

    def _advance(self, k: int, piece: str) -> int | None:
        """Run stop string k's automaton over `piece`; the offset where its first completed match ends."""
        stop, border, state = self.stops[k], self.borders[k], self.states[k]
        found = None
        for i, char in enumerate(piece):
            while state and stop[state] != char:
                state = border[state - 1]
            if stop[state] == char:
                state += 1
            if state == len(stop):  # a match; fall back so the automaton can go on over more text
                found = self.fed + i + 1 if found is None else found
                state = border[state - 1]
        self.states[k] = state
        return found


def _border_table(stop: str) -> list[int]:
    """For each prefix of `stop`, the length of its longest proper prefix that is also its suffix."""
    table, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = table[k - 1]
        if stop[i] == stop[k]:
            k += 1
        table[i] = k
    return table
