"""Bad-record reporting: every rejected record names its file, line (or record index) and problem."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """A record could not be read or understood."""

    def __init__(self, source: str, where: str, problem: str):
        self.source, self.where, self.problem = source, where, problem
        super().__init__(f"{source}:{where}: {problem}")


CUT_KINDS = ("prompt_cut", "reply_cut", "turns_dropped", "dropped_no_room")
"""What truncation to max_length did to a sample (lmforge.data.truncate states the policy)."""


@dataclass
class ErrorLog:
    """Collects bad records: raises at once under `raise`, counts them under `skip`."""

    on_error: str = "raise"
    max_bad_fraction: float = 1.0
    """Under `skip`: the share of a file's records that may be bad before check_bad_fraction stops the run."""
    skipped: Counter = field(default_factory=Counter)
    """file -> number of records skipped."""
    examples: list[str] = field(default_factory=list)
    dropped_too_long: int = 0
    """Samples whose response did not fit max_length at all (never silent: counted here)."""
    truncated: int = 0
    """Preference records whose response(s) were cut to fit max_length."""
    loaded: Counter = field(default_factory=Counter)
    """file -> records read, normalised and not (yet) rejected: what training and evaluation use."""
    reads: set = field(default_factory=set, repr=False)
    """Inputs already read once (see for_pass)."""
    cuts: Counter = field(default_factory=Counter)
    """kind (CUT_KINDS) -> samples cut or dropped that way, each record counted once."""
    settled: set = field(default_factory=set, repr=False)
    """`file:line` of records already counted at tokenization: a streamed data set is tokenized again
    every epoch (and a weighted mix repeats records), and each record must count once."""
    reasons: Counter = field(default_factory=Counter)
    """(file, reason) -> records skipped for it; a reason is the problem without its numbers and details."""
    text_chars: Counter = field(default_factory=Counter)
    """file -> characters of the raw-text documents kept (a .txt file's documents' mean size is reported)."""
    cuts_by_file: Counter = field(default_factory=Counter)
    """(file, kind) -> records cut or dropped that way (CUT_KINDS)."""
    first_by_file: dict = field(default_factory=dict, repr=False)
    """file -> the first bad record's message, kept even past the 20 `examples`: a file with no good
    record fails quoting it."""

    first_bad: dict = field(default_factory=dict, repr=False)
    """file -> the lowest few bad places (line or record numbers) with their problems: records are read
    shuffled, and a user fixes a file from its top."""

    deferred: list | None = field(default=None, repr=False)
    """Under `raise`, while tokenization runs: the bad records found, of which the first in file order is
    raised at the end (tokenization sees records in the held-out split's shuffled order)."""
    held_out: list = field(default_factory=list, repr=False)
    """Under `raise`: the held-out tables split from train, searched for an earlier bad line (see deferred)."""

    def report(self, error: DataError) -> None:
        if self.on_error == "raise":
            if self.deferred is None:
                raise error
            self.deferred.append(error)
            return
        self.skipped[error.source] += 1
        keep_lowest(self.first_bad.setdefault(error.source, []), error)
        self.reasons[(error.source, reason_of(error.problem))] += 1
        self.first_by_file.setdefault(error.source, str(error))
        if len(self.examples) < 20:
            self.examples.append(str(error))

    def for_pass(self, key) -> ErrorLog:
        """The log a read of `key` (its files) reports to: this one on the first read, a scratch one
        (same policy) on re-reads — a streamed dataset is read again every epoch, and its records
        must be counted once."""
        if key in self.reads:
            return ErrorLog(self.on_error, self.max_bad_fraction)
        self.reads.add(key)
        return self

    def no_usable_records(self, path: str, files: list) -> DataError:
        """The error for a data set that yielded nothing, quoting its first bad record (if any)."""
        names = [str(f) for f in files]
        bad = sum(self.skipped[n] for n in names)
        first = next((self.first_by_file[n] for n in names if n in self.first_by_file), None)
        if first is None:
            return DataError(path, "file", f"no usable records ({bad} skipped as bad)")
        return DataError(path, "file", f"no usable records: all {bad} skipped as bad; the first, {first}")

    def check_bad_fraction(self) -> None:
        """Stop when a file has more than `max_bad_fraction` of its records bad: skipping is for a few
        broken lines, not for a file in the wrong format or shape."""
        for name, counts in self.by_file().items():
            if counts["read"] and counts["skipped"] / counts["read"] > self.max_bad_fraction:
                first = "; ".join(f"{where}: {problem}" for _, where, problem in self.first_bad.get(name, []))
                raise DataError(name, "file", f"{counts['skipped']} of {counts['read']} records are bad "
                                f"({counts['skipped'] / counts['read']:.0%}, more than data.max_bad_fraction="
                                f"{self.max_bad_fraction:g}); the first: {first}; fix them or raise "
                                "data.max_bad_fraction")

    def mark_loaded(self, source: str) -> None:
        self.loaded[source] += 1

    def first_time(self, record: str) -> bool:
        """True the first time a record (`file:line N`) has something counted at tokenization."""
        if record in self.settled:
            return False
        self.settled.add(record)
        return True

    def reject_loaded(self, error: DataError) -> None:
        """A record already counted as loaded proved unusable later (at tokenization): it moves from
        loaded to skipped, so records read == loaded + skipped + dropped stays true."""
        if self.on_error == "raise" or self.first_time(f"{error.source}:{error.where}"):
            self.report(error)
            self.loaded[error.source] -= 1

    def count_cuts(self, record: str, kinds) -> None:
        """The cuts truncation made to one record (`file:line N`); a dropped one leaves `loaded`."""
        if not kinds or not self.first_time(record):
            return
        self.cuts.update(kinds)
        source = record.rsplit(":", 1)[0]
        self.cuts_by_file.update((source, kind) for kind in set(kinds))
        if "dropped_no_room" in kinds:
            self.dropped_too_long += 1
            self.loaded[source] -= 1

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def total_loaded(self) -> int:
        return sum(self.loaded.values())

    def summary(self) -> dict:
        return {
            "records_read": self.total_loaded + self.total_skipped + self.dropped_too_long,
            "loaded_records": self.total_loaded,
            "skipped_records": self.total_skipped,
            "skipped_by_file": dict(self.skipped),
            "dropped_too_long": self.dropped_too_long,
            "truncated_responses": self.truncated,
            "truncation": {kind: self.cuts[kind] for kind in CUT_KINDS},
            "by_file": self.by_file(),
            "examples": self.examples,
        }

    def by_file(self) -> dict:
        """file -> {read, kept, skipped, skipped_by_reason, cut kinds}: read == kept + skipped + dropped."""
        files = sorted({*self.loaded, *self.skipped, *(f for f, _ in self.cuts_by_file)})
        out = {}
        for name in files:
            cuts = {kind: self.cuts_by_file[(name, kind)] for kind in CUT_KINDS if self.cuts_by_file[(name, kind)]}
            out[name] = {
                "read": self.loaded[name] + self.skipped[name] + cuts.get("dropped_no_room", 0),
                "kept": self.loaded[name],
                "skipped": self.skipped[name],
                "skipped_by_reason": {r: n for (f, r), n in sorted(self.reasons.items()) if f == name},
                **cuts,
            }
        return out

    def source_lines(self, text_split: str = "line") -> list[str]:
        """One line per data file: what was read, kept, skipped (by reason) and cut, for the run's start.
        A .txt file says how it was split, and when `line` gave documents of a few words (hard-wrapped
        prose), which split would keep its paragraphs whole."""
        lines = []
        for name, counts in self.by_file().items():
            line = f"{name}: {counts['read']} read, {counts['kept']} kept"
            if name.lower().endswith(".txt") and counts["kept"]:
                mean = self.text_chars[name] / counts["kept"]
                line += f" (text_split={text_split}: {counts['kept']} documents, {mean:.0f} characters each on average"
                if text_split == "line" and mean < SHORT_DOCUMENT:
                    line += "; hard-wrapped text? data.text_split=blank or file keeps paragraphs or files whole"
                line += ")"
            if counts["skipped"]:
                reasons = ", ".join(f"{n} {r}" for r, n in counts["skipped_by_reason"].items())
                line += f", {counts['skipped']} skipped ({reasons})"
            cut = [f"{counts[k]} {k.replace('_', ' ')}" for k in CUT_KINDS if counts.get(k)]
            lines.append(line + (f", {', '.join(cut)}" if cut else ""))
        return lines


def file_order(errors: list[DataError], files: list[str]) -> DataError:
    """The error of the first bad place in file order: the first file (in `files`' order), then the lowest
    line or record number."""
    rank = {name: i for i, name in enumerate(files)}

    def place(error: DataError) -> tuple[int, int]:
        number = NUMBER.search(error.where)
        return rank.get(error.source, len(rank)), int(number.group()) if number else -1

    return min(errors, key=place)


FIRST_BAD = 3
"""Bad places a too-bad file's error quotes."""


def keep_lowest(kept: list, error: DataError) -> None:
    """Keep the FIRST_BAD lowest-numbered bad places of a file as (number, where, problem), sorted."""
    number = NUMBER.search(error.where)
    item = (int(number.group()) if number else -1, error.where, error.problem)
    if len(kept) < FIRST_BAD or item < kept[-1]:
        kept.append(item)
        kept.sort()
        del kept[FIRST_BAD:]


NUMBER = re.compile(r"\d+")
SHORT_DOCUMENT = 60
"""Characters: line-split documents shorter than this on average look like hard-wrapped prose."""


def reason_of(problem: str) -> str:
    """A problem as a reason to count under: details in parentheses or after `;` and numbers dropped
    ("turn 3 (user) is empty" and "turn 5 (user) is empty" are one reason)."""
    reason = problem.split(";")[0]
    reason = re.sub(r"\s*\([^)]*\)", "", reason)
    return NUMBER.sub("N", reason).strip() or problem
