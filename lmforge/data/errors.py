"""Bad-record reporting: every rejected record names its file, line (or record index) and problem."""

from __future__ import annotations

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
    first_by_file: dict = field(default_factory=dict, repr=False)
    """file -> the first bad record's message, kept even past the 20 `examples`: a file with no good
    record fails quoting it."""

    def report(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.skipped[error.source] += 1
        self.first_by_file.setdefault(error.source, str(error))
        if len(self.examples) < 20:
            self.examples.append(str(error))

    def for_pass(self, key) -> ErrorLog:
        """The log a read of `key` (its files) reports to: this one on the first read, a scratch one
        (same policy) on re-reads — a streamed dataset is read again every epoch, and its records
        must be counted once."""
        if key in self.reads:
            return ErrorLog(self.on_error)
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
        if "dropped_no_room" in kinds:
            self.dropped_too_long += 1
            self.loaded[record.rsplit(":", 1)[0]] -= 1

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
            "examples": self.examples,
        }
