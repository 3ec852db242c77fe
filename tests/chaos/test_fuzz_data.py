"""Fuzzed data (issue 10): malformed records (a few hundred in CI, 1,000+ with LMFORGE_CHAOS=full) in every
format, fed through the loading path the stages use — `load_splits`, then the stage's tokenization — for
pt, sft, pairs (rm/dpo), kto and RL prompts, under data.on_error=raise and skip.

Every record must load keeping its text, be rejected with a DataError naming its file, line or record and
the problem, or be skipped and counted; never another exception, a hang, or a silent drop: records in ==
loaded + skipped (+ dropped as too long), and the run summary (ErrorLog.summary, the manifest's `data`)
says so. The figures go to tests/chaos/results/fuzz_data.json under LMFORGE_CHAOS=full."""

from __future__ import annotations

import copy
import json
import re
import signal
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from chaos_trials import FULL, trials
from fuzz_inputs import file_cases
from fuzz_records import KINDS, FuzzFile, fuzz_file, fuzz_files, parquet_files, render, write_parquet
from transformers import AutoTokenizer

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.build import load_splits, tokenize_preference, tokenize_pt, tokenize_sft
from lmforge.data.errors import DataError, ErrorLog
from lmforge.data.templates import apply_template_choice, encode_prompts

SEED = 20261124
RECORDS_PER_FILE = trials(16, 70)  # 16 files + 5 through dataset_info: ~340 records in CI, ~1,500 in full
BIG_RECORDS_PER_FILE = trials(1, 2)  # 1 MB strings: costly to tokenize
BIG_FORMATS = ("csv", "txt") if not FULL else ("jsonl", "json", "csv", "txt")
PARQUET_ROWS = trials(2, 6)  # per schema: 5 kinds x 7 schemas
HANG_SECONDS = 60
RESULTS = Path(__file__).parent / "results" / "fuzz_data.json"
LOAD_KIND = {"pt": "sft", "sft": "sft", "pair": "pair", "kto": "kto", "prompt": "prompt"}
# A problem text that is really a Python error leaking out, not an explanation.
PYTHON_INTERNALS = re.compile(r"object has no attribute|unhashable|not subscriptable|'NoneType' object|"
                              r"index out of range|Traceback|object is not|unexpected keyword")
FIGURES: Counter = Counter()
BY_MUTATION: Counter = Counter()  # records tried per kind of damage (under skip, streaming aside)


class Hung(BaseException):
    """Raised by the deadline; a BaseException so no `except Exception` in lmforge can swallow it."""


@contextmanager
def deadline(seconds: float):
    def expire(signum, frame):
        raise Hung(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(call) -> tuple[str, object]:
    """("ok", result), ("rejected", the DataError) or ("crashed", what went wrong)."""
    try:
        with deadline(HANG_SECONDS):
            return "ok", call()
    except DataError as error:
        return "rejected", error
    except (Exception, Hung) as exc:  # anything else is the bug this suite hunts
        return "crashed", f"{type(exc).__name__}: {str(exc)[:300]}"


@dataclass
class RecordingErrorLog(ErrorLog):
    """An ErrorLog that also keeps every reported error (ErrorLog keeps the first 20 as examples)."""

    seen: list = field(default_factory=list)

    def report(self, error: DataError) -> None:
        self.seen.append(error)
        super().report(error)


@pytest.fixture(scope="module")
def tok(chat_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    apply_template_choice(tokenizer, "auto")
    return tokenizer


def load_and_tokenize(kind: str, spec: DatasetSpec, errors: ErrorLog, tok, cache: str,
                      dataset_dir: str | None = None, streaming: bool = False):
    """What a stage does with its data: load_splits, then its tokenization. (examples, rows used)."""
    cfg = DataConfig(train=[spec], dataset_dir=dataset_dir, eval_split=0, on_error=errors.on_error,
                     streaming=streaming, max_length=256)
    examples, _, _ = load_splits(cfg, errors, cache, kind=LOAD_KIND[kind])
    if streaming:
        return list(examples), None
    if kind == "pt":
        blocks = tokenize_pt(examples, tok, 64, False, cache)
        assert len(blocks) > 0
        return examples, len(examples)
    if kind == "sft":
        return examples, len(tokenize_sft(examples, tok, cfg, errors, pack=False))
    if kind in ("pair", "kto"):
        return examples, len(tokenize_preference(examples, tok, cfg, errors, kind))
    return examples, len(encode_prompts(tok, examples["prompt"]))


def example_text(row: dict) -> str:
    """Every text of a normalised example, to find a record's marker in."""
    parts = [row.get(k) or "" for k in ("text", "chosen", "rejected", "completion", "reference", "answer", "extra")]
    parts += [m["content"] for k in ("messages", "prompt") for m in (row.get(k) or [])]
    return "\n".join(parts)


def write(file: FuzzFile, folder: Path, name: str) -> Path:
    path = folder / f"{name}.{file.ext}"
    if file.ext == "parquet":
        write_parquet(file, path)
    else:
        path.write_bytes(render(file))
    return path


def check_problem(error: DataError, path: Path, where: str, pattern: str) -> str | None:
    """Why the error does not name the file, the place and the problem; None when it does."""
    message = str(error)
    if error.source != str(path) or error.where != where or not message.startswith(f"{path}:{where}: "):
        return f"names {error.source}:{error.where}, expected {path}:{where}"
    if not re.search(pattern, error.problem) or PYTHON_INTERNALS.search(error.problem):
        return f"problem {error.problem[:200]!r} does not match {pattern!r}"
    return None


def check_skip(file: FuzzFile, path: Path, tok, cache_root: Path, spec: DatasetSpec | None = None,
               dataset_dir: str | None = None, streaming: bool = False) -> list[str]:
    """Load one file under on_error=skip; every record must be loaded or skipped as expected, and counted."""
    errors = RecordingErrorLog("skip")
    spec = spec or DatasetSpec(path=str(path))
    outcome, value = attempt(lambda: load_and_tokenize(file.kind, spec, errors, tok,
                                                       tempfile.mkdtemp(dir=cache_root), dataset_dir, streaming))
    expected_loads = [r for r in file.records if r.problem is None]
    if outcome == "crashed":
        FIGURES["crashed"] += 1
        return [f"{path}: {value}"]
    if outcome == "rejected":  # only when nothing in the file is usable; every record is still checked
        if expected_loads or "no usable records" not in value.problem:
            return [f"{path}: {value}"]
        value = ([], 0)
    examples, used = value
    loaded = {row["source"].rsplit(":", 1)[1]: row for row in examples}
    reported = {}
    for error in errors.seen:
        if error.source != str(path) or error.where in reported:
            return [f"{path}: unexpected or repeated error {error}"]
        reported[error.where] = error
    failures = []
    for record in file.records:
        BY_MUTATION[record.mutation] += not streaming
        if record.problem is None:
            row = loaded.get(record.where)
            if row is None:
                failures.append(f"{path}:{record.where} ({record.mutation}) should load; got "
                                f"{reported.get(record.where, 'nothing: a silent drop')}")
            elif record.marker not in example_text(row):
                failures.append(f"{path}:{record.where} ({record.mutation}) loaded without its text")
            else:
                FIGURES["loaded"] += not streaming
            continue
        error = reported.get(record.where)
        why = "loaded" if record.where in loaded else "nothing reported: a silent drop"
        why = check_problem(error, path, record.where, record.problem) if error else why
        if why:
            failures.append(f"{path}:{record.where} ({record.mutation}) should be rejected: {why}")
        else:
            FIGURES["skipped_and_counted"] += not streaming
    summary = errors.summary()
    if used is None and len(file.records) != len(examples) + summary["skipped_records"]:
        failures.append(f"{path}: {len(file.records)} records in, {len(examples)} loaded, "
                        f"{summary['skipped_records']} skipped")
    if used is not None and (summary["records_read"], summary["loaded_records"]) != (len(file.records), used):
        failures.append(f"{path}: summary {summary['records_read']} read / {summary['loaded_records']} loaded, "
                        f"expected {len(file.records)} / {used}")
    return failures


def check_raise(file: FuzzFile, tok, folder: Path, cache_root: Path) -> list[str]:
    """Under on_error=raise, each bad record (after a good one) stops the load with a DataError naming it;
    the file's good records alone load."""
    failures = []
    good = [r for r in file.records if r.problem is None]
    bad = [r for r in file.records if r.problem is not None]
    trials_ = [(f"bad{i}", [copy.copy(file.records[0]), copy.copy(r)]) for i, r in enumerate(bad)]
    # The good ones again under raise (1 MB strings were tokenized once under skip: enough)
    trials_.append(("good", [copy.copy(r) for r in good if r.mutation != "one_mb_string"]))
    for name, records in trials_:
        if file.ext == "parquet" and name != "good":  # one schema per file: the first row names it
            records = [copy.copy(r) for r in file.records]
        one = FuzzFile(file.kind, file.ext, records, file.bom, file.crlf, file.blank_lines, file.text_columns)
        path = write(one, folder, f"{file.kind}-{file.ext}-{name}")
        spec = DatasetSpec(path=str(path))
        outcome, value = attempt(partial(load_and_tokenize, file.kind, spec, ErrorLog("raise"), tok,
                                         tempfile.mkdtemp(dir=cache_root)))
        if outcome == "crashed":
            FIGURES["crashed"] += 1
            failures.append(f"{path}: {value}")
        elif name == "good":
            if records and (outcome != "ok" or len(value[0]) != len(records)):
                failures.append(f"{path}: the good records should all load under raise, got {value}")
        elif outcome != "rejected":
            failures.append(f"{path}: {records[-1].mutation} loaded under raise")
        else:
            target = records[-1] if file.ext != "parquet" else records[0]
            why = check_problem(value, path, target.where, target.problem)
            failures += [f"{path}: {why}"] if why else []
            FIGURES["rejected_with_location"] += why is None
        if file.ext == "parquet" and name != "good":
            break
    return failures


def all_files() -> list[FuzzFile]:
    return fuzz_files(SEED, RECORDS_PER_FILE, BIG_RECORDS_PER_FILE, BIG_FORMATS) + parquet_files(SEED, PARQUET_ROWS)


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_records_are_loaded_or_named_and_counted(kind, tok, tmp_path):
    failures = []
    for index, file in enumerate(f for f in all_files() if f.kind == kind):
        path = write(file, tmp_path, f"{kind}-{index}")
        FIGURES["records_tried"] += len(file.records)
        failures += check_skip(file, path, tok, tmp_path)
        if file.ext == "jsonl":  # streaming reads the same records the same way
            failures += check_skip(file, path, tok, tmp_path, streaming=True)
        failures += check_raise(file, tok, tmp_path, tmp_path)
    assert not failures, "\n".join(failures[:30])


# dataset_info.json entries naming the columns of a fuzzed file: (kind, template, entry)
REGISTRY_GROUPS = [
    ("sft", "alpaca", {"columns": {"prompt": "instruction", "query": "input", "response": "output"}}),
    ("sft", "sharegpt", {"formatting": "sharegpt", "columns": {"messages": "conversations"}}),
    ("pair", "alpaca", {"ranking": True, "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                                     "rejected": "rejected"}}),
    ("kto", "messages", {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                  "assistant_tag": "assistant"}}),
    ("prompt", "alpaca", {"formatting": "alpaca", "columns": {"prompt": "instruction", "response": "output"}}),
]


@pytest.mark.parametrize(("kind", "template", "entry"), REGISTRY_GROUPS, ids=[f"{g[0]}-{g[1]}" for g in REGISTRY_GROUPS])
def test_fuzzed_records_read_through_dataset_info(kind, template, entry, tok, tmp_path):
    import random

    file = fuzz_file(random.Random(f"{SEED}:info:{kind}:{template}"), kind, "jsonl", RECORDS_PER_FILE,
                     f"info{kind}", (template,), BIG_RECORDS_PER_FILE if FULL else 0)
    path = write(file, tmp_path, "data")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"fuzzed": {"file_name": path.name, **entry}}))
    FIGURES["records_tried"] += len(file.records)
    failures = check_skip(file, path, tok, tmp_path, DatasetSpec(name="fuzzed"), str(tmp_path))
    assert not failures, "\n".join(failures[:30])


FILE_CASES = file_cases()


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unusable_input_is_one_error_naming_file_and_place(case, on_error, tok, tmp_path):
    _, kind, files, spec_path, source, where, problem, under_skip = case
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            (tmp_path / name).mkdir(exist_ok=True)
        else:
            (tmp_path / name).write_bytes(content)
    if on_error == "skip" and under_skip:
        where, problem = under_skip
    spec = DatasetSpec(name=spec_path[5:]) if spec_path.startswith("name:") else \
        DatasetSpec(path=str(tmp_path / spec_path))
    FIGURES["inputs_tried"] += 1
    outcome, value = attempt(lambda: load_and_tokenize(kind, spec, ErrorLog(on_error), tok,
                                                       tempfile.mkdtemp(dir=tmp_path), str(tmp_path)))
    FIGURES["crashed"] += outcome == "crashed"
    assert outcome == "rejected", value
    assert value.source == str(tmp_path / source) and re.fullmatch(where, value.where), str(value)
    assert re.search(problem, value.problem) and str(value).startswith(f"{value.source}:{value.where}: "), str(value)
    FIGURES["inputs_rejected_with_location"] += 1


def test_a_stage_run_records_the_counts_in_its_manifest(chat_tokenizer_dir, tmp_path):
    """The real sft stage on a fuzzed file under on_error=skip: the manifest's `data` (what the run summary
    prints) says how many records were read, loaded and skipped, and they add up."""
    import random

    from lmforge.config.load import load_config
    from lmforge.stages import STAGE_RUNNERS

    file = fuzz_file(random.Random(f"{SEED}:stage"), "sft", "jsonl", RECORDS_PER_FILE, "stage", big_records=0)
    path = write(file, tmp_path, "sft")
    out = tmp_path / "run"
    cfg = load_config(None, ["model.scratch=test", f"model.tokenizer={chat_tokenizer_dir}", f"data.train={path}",
                             "data.on_error=skip", "data.max_bad_fraction=1", "data.eval_split=0", "sft.eval_generate=0",
                             "train.max_steps=1",
                             "train.batch_size=4", f"train.output_dir={out}", "log.report_to=[]",
                             "log.progress=false"], stage="sft")
    STAGE_RUNNERS["sft"](cfg)
    data = json.loads((out / "lmforge.json").read_text(encoding="utf-8"))["data"]
    loads = sum(r.problem is None for r in file.records)
    assert (data["records_read"], data["loaded_records"], data["skipped_records"], data["dropped_too_long"]) == \
        (len(file.records), loads, len(file.records) - loads, 0)
    assert data["skipped_by_file"] == {str(path): len(file.records) - loads}


def test_figures():
    """The run's figures, which every test above adds to: records tried, loaded (under skip), skipped and
    counted (under skip), rejected with location (under raise: one load per bad record, one per damaged
    Parquet schema), whole inputs tried and rejected with location, crashed. Printed; written to
    tests/chaos/results/fuzz_data.json under LMFORGE_CHAOS=full."""
    figures = dict(sorted(FIGURES.items()))
    print("fuzz_data figures:", json.dumps(figures))
    assert FIGURES["crashed"] == 0
    assert FIGURES["loaded"] + FIGURES["skipped_and_counted"] == FIGURES["records_tried"]
    assert FIGURES["inputs_rejected_with_location"] == FIGURES["inputs_tried"]
    if FULL and FIGURES["records_tried"] >= 1000:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"seed": SEED, "records_per_file": RECORDS_PER_FILE, **figures,
                                       "records_by_damage": dict(BY_MUTATION.most_common())}, indent=2) + "\n")
