"""Dataset specs → Arrow-backed `datasets` tables of examples, then of tokens, per stage.

Reading goes through `datasets.Dataset.from_generator`: records stream from the readers into an
Arrow file on disk (memory stays flat for large corpora), or, with `data.streaming`, into an
`IterableDataset` that is never materialised.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from lmforge.config.schema import DataConfig, DatasetSpec
from lmforge.data.errors import NUMBER, DataError, ErrorLog, file_order
from lmforge.data.formats import RowFormat, to_example
from lmforge.data.packing import pack_samples, pack_stream
from lmforge.data.preference import PromptTooLong, encode_kto, encode_pair, to_kto, to_pair
from lmforge.data.prompts import to_prompt
from lmforge.data.readers import read_file, resolve_files
from lmforge.data.registry import resolve_spec
from lmforge.data.templates import with_system_prompt
from lmforge.data.tokenize import encode_sft, encode_text, messages_as_text, sft_render_options
from lmforge.data.tools import example_messages

datasets.disable_progress_bars()


MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
TEXT = datasets.Value("string")
FEATURES = {
    "sft": datasets.Features({"text": TEXT, "messages": MESSAGES, "tools": TEXT, "chat": TEXT, "source": TEXT}),
    "pair": datasets.Features({"prompt": MESSAGES, "chosen": TEXT, "rejected": TEXT, "tools": TEXT, "source": TEXT}),
    "kto": datasets.Features({"prompt": MESSAGES, "completion": TEXT, "label": datasets.Value("bool"), "tools": TEXT,
                              "source": TEXT}),
    "prompt": datasets.Features({"prompt": MESSAGES, "reference": TEXT, "answer": TEXT, "tools": TEXT,
                                 "extra": TEXT, "source": TEXT}),
}
ROW_TRANSFORMS = {"sft": to_example, "pair": to_pair, "kto": to_kto, "prompt": to_prompt}
# Which dataset_info entries each kind may read: RL prompts come from SFT and preference data alike (None).
PREFERENCE_KIND = {"sft": False, "pair": True, "kto": True, "prompt": None}


@contextmanager
def _data_errors_surface():
    """`datasets` wraps errors raised inside a generator; users must see our DataError itself."""
    try:
        yield
    except DatasetGenerationError as exc:
        cause = exc
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def _examples(files: list[Path], fmt: RowFormat, cfg: DataConfig, errors: ErrorLog, limit: int | None,
              kind: str = "sft", spec_path: str = ""):
    count = 0
    transform = ROW_TRANSFORMS[kind]
    errors = errors.for_pass((kind, tuple(str(f) for f in files)))
    for path in files:
        for raw in read_file(path, errors, cfg.text_split):
            try:
                example = transform(raw.row, fmt)
            except RecursionError:
                errors.report(DataError(raw.source, raw.where, "a value is nested too deeply to read"))
                continue
            except (ValueError, TypeError, KeyError) as exc:
                errors.report(exc if isinstance(exc, DataError) else DataError(raw.source, raw.where, str(exc)))
                continue
            if cfg.system_prompt is not None:
                example = _with_system_prompt(example, kind, cfg.system_prompt)
            errors.mark_loaded(raw.source)
            if kind == "sft" and example["text"]:
                errors.text_chars[raw.source] += len(example["text"])
            yield {**example, "source": f"{raw.source}:{raw.where}"}
            count += 1
            if limit is not None and count >= limit:
                return
    if count == 0:  # a streamed data set would otherwise train on nothing without a word
        raise errors.no_usable_records(spec_path or str(files[0]), files)


def _with_system_prompt(example: dict, kind: str, system_prompt: str) -> dict:
    """data.system_prompt on a normalised record: SFT dialogues (and their structured `chat` copy), the
    prompts of pairs, KTO records and RL prompts; a plain-text record has no dialogue to give one to."""
    if kind != "sft":
        return {**example, "prompt": with_system_prompt(example["prompt"], system_prompt)}
    if not example["messages"]:
        return example
    chat = json.dumps(with_system_prompt(json.loads(example["chat"]), system_prompt), ensure_ascii=False) \
        if example.get("chat") else example.get("chat")
    return {**example, "messages": with_system_prompt(example["messages"], system_prompt), "chat": chat}


def fingerprint_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_examples(specs: list[DatasetSpec], cfg: DataConfig, errors: ErrorLog, cache_dir: str,
                  holdout: float = 0.0, kind: str = "sft"):
    """Read and normalise every spec; mix them by weight. Returns (dataset, fingerprint), or with
    `holdout` > 0 ((train, eval), fingerprint): each dataset is split before mixing, so weighted
    repetition can never put a held-out record in train."""
    parts, weights, all_files, held = [], [], [], []
    for spec in specs:
        path, fmt = resolve_spec(spec, cfg.dataset_dir, preference=PREFERENCE_KIND[kind])
        files = resolve_files(path)
        all_files += files
        kwargs = {"files": files, "fmt": fmt, "cfg": cfg, "errors": errors, "limit": fmt.limit, "kind": kind,
                  "spec_path": str(path)}
        if cfg.streaming:
            part = datasets.IterableDataset.from_generator(_examples, gen_kwargs=kwargs, features=FEATURES[kind])
        else:
            # A fresh cache folder per call: the generator must run so bad records are counted.
            try:
                with _data_errors_surface():
                    part = datasets.Dataset.from_generator(_examples, gen_kwargs=kwargs, cache_dir=cache_dir,
                                                           features=FEATURES[kind])
            except ValueError as exc:
                if isinstance(exc, DataError) or "no data" not in str(exc):
                    raise
                part = None  # datasets refuses to build a table of zero rows
            if part is None or len(part) == 0:
                raise errors.no_usable_records(path, files) from None
            if holdout > 0 and len(part) >= 20:
                split = part.train_test_split(test_size=holdout, seed=cfg.seed)
                part = split["train"]
                held.append(split["test"])
                if errors.on_error == "raise":
                    errors.held_out.append(split["test"])
        parts.append(part)
        weights.append(spec.weight)
    if not parts:
        raise DataError("config", "data.train", "no datasets given")
    if len(parts) == 1:
        mixed = parts[0]
    elif len(set(weights)) == 1:
        mixed = datasets.concatenate_datasets(parts)
    else:
        probabilities = [w / sum(weights) for w in weights]
        mixed = datasets.interleave_datasets(parts, probabilities=probabilities, seed=cfg.seed,
                                             stopping_strategy="all_exhausted")
    if holdout > 0:
        return (mixed, datasets.concatenate_datasets(held) if held else None), fingerprint_files(all_files)
    return mixed, fingerprint_files(all_files)


def load_splits(cfg: DataConfig, errors: ErrorLog, cache_dir: str, kind: str = "sft") -> tuple[object, object | None, str]:
    if cfg.eval or cfg.eval_split == 0 or cfg.streaming:
        train, fingerprint = load_examples(cfg.train, cfg, errors, cache_dir, kind=kind)
        evaluation = None
    else:
        (train, evaluation), fingerprint = load_examples(cfg.train, cfg, errors, cache_dir, holdout=cfg.eval_split,
                                                         kind=kind)
    if cfg.eval:
        # Evaluation data is small and read many times: always a table, even when train streams.
        eval_cfg = dataclasses.replace(cfg, streaming=False)
        evaluation, eval_fp = load_examples(cfg.eval, eval_cfg, errors, cache_dir, kind=kind)
        fingerprint = hashlib.sha256(f"{fingerprint}{eval_fp}".encode()).hexdigest()[:16]
    if not cfg.streaming:  # a stream is read as it trains: its counts are in the run's summary at the end
        say_data_counts(errors, cfg.text_split)
        errors.check_bad_fraction()
    return train, evaluation, fingerprint


def say_data_counts(errors: ErrorLog, text_split: str, after: str = "read", only: set | None = None) -> None:
    """One line per data file on the main process: a stage that trains on half its data says so before
    step 1, not only in its manifest. `only`: the files to speak of (those tokenization changed)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for name, line in zip(errors.by_file(), errors.source_lines(text_split)):
        if only is None or name in only:
            print(f"data ({after}): {line}", flush=True)


@contextmanager
def _counts_after_tokenization(errors: ErrorLog, cfg: DataConfig):
    """Says the counts again for the files tokenization cut, dropped or rejected records of."""
    before = (Counter(errors.cuts_by_file), Counter(errors.skipped))
    yield
    if cfg.streaming:
        return
    changed = {f for f, _ in errors.cuts_by_file - before[0]} | set(errors.skipped - before[1])
    if changed:
        say_data_counts(errors, cfg.text_split, f"tokenized, max_length={cfg.max_length}", changed)
        errors.check_bad_fraction()


def error_at(source: str, problem: str) -> DataError:
    """A DataError for an example whose `source` column reads `file:line N`."""
    path, where = source.rsplit(":", 1)
    return DataError(path, where, problem)


PROGRESS_ROWS = 2000
"""Records tokenized between two progress updates (a multiple of datasets' 1000-record map batches, so the
batches are the same as one map over the whole table)."""


def _map_counted(dataset, fn, kwargs: dict, progress: Callable[[int], None] | None):
    """`dataset.map(fn)`, in slices of PROGRESS_ROWS records telling `progress` how many each did when asked
    (a large file's tokenization shows how far it is); the rows are those of one map over the whole table."""
    if progress is None or isinstance(dataset, datasets.IterableDataset):
        return dataset.map(fn, **kwargs)
    parts = []
    for start in range(0, max(len(dataset), 1), PROGRESS_ROWS):
        part = dataset.select(range(start, min(start + PROGRESS_ROWS, len(dataset))))
        parts.append(part.map(fn, **kwargs))
        progress(len(part))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _map_in_file_order(dataset, fn, errors: ErrorLog, streaming: bool,
                       progress: Callable[[int], None] | None = None, **fn_kwargs):
    """`dataset.map(fn)` for tokenization. Under on_error: raise, the error names the file's first bad record
    in file order, as reading does: the held-out split shuffled the records, so the bad ones are gathered,
    the held-out tables searched for an earlier bad line of the same file, and the first raised."""
    kwargs = {"batched": True, "remove_columns": dataset.column_names, "fn_kwargs": {**fn_kwargs, "errors": errors}}
    if errors.on_error != "raise" or streaming:
        return _map_counted(dataset, fn, kwargs, progress)
    errors.deferred = []
    try:
        tokens = _map_counted(dataset, fn, kwargs, progress)
        if errors.deferred:
            first = file_order(errors.deferred, list(errors.loaded))
            for other in errors.held_out:
                if other is dataset or other._fingerprint == dataset._fingerprint:
                    continue
                earlier = other.filter(lambda s: _before(s, first), input_columns="source")
                if len(earlier):
                    earlier.map(fn, **{**kwargs, "remove_columns": earlier.column_names})
            raise file_order(errors.deferred, list(errors.loaded))
    finally:
        errors.deferred = None
    return tokens


def _before(source: str, error: DataError) -> bool:
    path, where = source.rsplit(":", 1)
    number, limit = NUMBER.search(where), NUMBER.search(error.where)
    return path == error.source and bool(number and limit) and int(number.group()) < int(limit.group())


def _sft_tokens(batch: dict, tokenizer, cfg: DataConfig, errors: ErrorLog) -> dict:
    out = {"input_ids": [], "labels": []}
    for messages, chat, tools, source in zip(batch["messages"], batch["chat"], batch["tools"], batch["source"]):
        if not messages:
            errors.reject_loaded(error_at(source, "a plain-text record in SFT data (no dialogue)"))
            continue
        cuts = Counter()
        try:
            encoded = encode_sft(tokenizer, example_messages({"messages": messages, "chat": chat}), cfg.max_length,
                                 cfg.train_on_prompt, cfg.mask_history, cuts, **sft_render_options(cfg, tools))
        except ValueError as exc:  # the template refuses the record (no tool format, rewritten turns)
            errors.reject_loaded(error_at(source, str(exc)))
            continue
        errors.count_cuts(source, cuts)
        if encoded is None:
            continue
        out["input_ids"].append(encoded["input_ids"])
        out["labels"].append(encoded["labels"])
    return out


def tokenize_sft(dataset, tokenizer, cfg: DataConfig, errors: ErrorLog, pack: bool,
                 progress: Callable[[int], None] | None = None):
    """Dialogues → input ids and labels (packed when asked); `progress(n)` after each slice of records."""
    with _counts_after_tokenization(errors, cfg):
        tokens = _map_in_file_order(dataset, _sft_tokens, errors, cfg.streaming, progress, tokenizer=tokenizer,
                                    cfg=cfg)
    if pack and not cfg.streaming:
        rows = pack_samples(list(tokens), cfg.max_length)
        return datasets.Dataset.from_list(rows)
    return tokens


def _documents(dataset, tokenizer):
    for example in dataset:
        text = example["text"] or messages_as_text(example["messages"])
        yield encode_text(tokenizer, text)


def tokenize_pt(dataset, tokenizer, block_size: int, streaming: bool, cache_dir: str):
    def rows():
        yield from pack_stream(_documents(dataset, tokenizer), block_size)

    if streaming:
        return datasets.IterableDataset.from_generator(rows)
    with _data_errors_surface():
        return datasets.Dataset.from_generator(rows, cache_dir=cache_dir)


CACHE_PREFIX = ".data-cache-"
OWNER_FILE = "owner.json"


def data_cache_dir(output_dir: str) -> str:
    """A fresh folder for this run's Arrow tables, inside the run folder.

    The folder records its owner (host and pid): it is removed when the process exits however the
    stage ended (a successful save removes it sooner), and a folder whose owner is gone (a killed
    run) is removed by the next run that starts in the same output folder."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    remove_stale_caches(output_dir)
    path = tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-", dir=output_dir)
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    (Path(path) / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def remove_stale_caches(output_dir: str) -> list[str]:
    """Remove the cache folders under `output_dir` whose owning process is gone; returns them.
    Folders of another host, or of a live process, or without an owner record are left alone."""
    removed = []
    for folder in Path(output_dir).glob(f"{CACHE_PREFIX}*"):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
            pid, host = int(owner["pid"]), owner["host"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if host == socket.gethostname() and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process, or a pid we cannot check: not ours to remove
    return True


def _preference_tokens(batch: dict, tokenizer, max_length: int, errors: ErrorLog, kind: str) -> dict:
    columns = ("prompt_ids", "chosen_ids", "rejected_ids") if kind == "pair" else ("prompt_ids", "completion_ids",
                                                                                  "label")
    out: dict[str, list] = {c: [] for c in columns}
    keys = [k for k in batch if k != "source"]
    for i, source in enumerate(batch["source"]):
        record = {k: batch[k][i] for k in keys}
        try:
            encoded = encode_pair(tokenizer, record, max_length) if kind == "pair" else \
                encode_kto(tokenizer, record, max_length)
        except PromptTooLong as exc:
            if errors.on_error == "raise":
                errors.report(error_at(source, f"{exc}; raise data.max_length, or set data.on_error: skip to "
                                               "drop such records"))
                continue
            errors.count_cuts(source, {"dropped_no_room"})
            continue
        except ValueError as exc:
            errors.reject_loaded(error_at(source, str(exc)))
            continue
        # Cut responses still train, but never silently: they are counted in the run summary.
        if encoded["truncated"] and source not in errors.settled:
            errors.truncated += 1
            errors.count_cuts(source, {"reply_cut"})
        for c in columns:
            out[c].append(encoded[c])
    return out


def tokenize_preference(dataset, tokenizer, cfg: DataConfig, errors: ErrorLog, kind: str,
                        progress: Callable[[int], None] | None = None):
    """Pairs → prompt/chosen/rejected ids; KTO records → prompt/completion ids, label, and the next
    record's completion as the mismatched one for the KL estimate (fixed here, so a cached reference
    pass and the training pass see the same pairs)."""
    with _counts_after_tokenization(errors, cfg):
        tokens = _map_in_file_order(dataset, _preference_tokens, errors, cfg.streaming, progress,
                                    tokenizer=tokenizer, max_length=cfg.max_length, kind=kind)
    if kind == "kto" and len(tokens) > 0:
        completions = tokens["completion_ids"]
        room = [cfg.max_length - len(p) for p in tokens["prompt_ids"]]
        # Pair each prompt with a completion from far away in the file: neighbours are often the
        # same prompt's other answer (desirable next to undesirable), which would not be a mismatch.
        offset = len(completions) // 2 + 1
        shifted = [completions[(i + offset) % len(completions)][: room[i]] for i in range(len(completions))]
        tokens = tokens.add_column("kl_completion_ids", shifted)
    return tokens
