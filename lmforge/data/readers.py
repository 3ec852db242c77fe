"""File readers: a path, directory or glob → raw rows, each tagged with its file and line.

Readers stream (one line or record at a time) so a large file never sits in memory as a list;
`lmforge.data.build` turns the stream into an Arrow-backed `datasets` table.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.errors import DataError, ErrorLog

SUPPORTED = (".txt", ".jsonl", ".json", ".parquet", ".csv")


@dataclass
class RawRecord:
    row: dict
    source: str
    where: str
    """`line 12` or `record 3`: what a user searches for in the file."""


def resolve_files(spec_path: str) -> list[Path]:
    """A file, every supported file in a directory (sorted), or a glob's matches."""
    path = Path(spec_path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        # Hidden folders (.ipynb_checkpoints, .cache) hold copies, not data.
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(str(path), "directory", f"no data files ({', '.join(SUPPORTED)}) found")
    else:
        files = sorted(Path(p) for p in glob.glob(spec_path, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(spec_path, "path", "no such file, directory or glob match")
    for file in files:
        if file.suffix.lower() not in SUPPORTED:
            raise DataError(str(file), "file", f"unsupported extension {file.suffix!r}; use one of {SUPPORTED}")
    return files


def read_file(path: Path, errors: ErrorLog, text_split: str = "line") -> Iterator[RawRecord]:
    reader = {
        ".txt": lambda: _read_txt(path, errors, text_split),
        ".jsonl": lambda: _read_jsonl(path, errors),
        ".json": lambda: _read_json(path, errors),
        ".parquet": lambda: _read_parquet(path),
        ".csv": lambda: _read_csv(path, errors),
    }[path.suffix.lower()]
    try:
        yield from reader()
    except OSError as exc:  # unreadable, vanished, or a folder named like a data file
        raise DataError(str(path), "file", f"cannot read the file ({exc.strerror or exc})") from exc


class _BadJSON(ValueError):
    def __init__(self, problem: str, line: int):
        super().__init__(problem)
        self.problem, self.line = problem, line


def _parse_json(text: str):
    """json.loads; every failure becomes _BadJSON with its problem and line, including the ones json
    reports as other exception types (values nested past the recursion limit, over-long integers)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadJSON(f"invalid JSON ({exc.msg} at column {exc.colno})", exc.lineno) from None
    except RecursionError:
        raise _BadJSON("invalid JSON (values nested too deeply to read)", 1) from None
    except ValueError as exc:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise _BadJSON(f"invalid JSON ({str(exc).split(':')[0]})", 1) from None


# A JSON escape of a UTF-16 surrogate: Python decodes a lone one into a string that no file can hold.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value) -> str | None:
    """The first lone surrogate in a parsed JSON value, as an escape (`\\ud800`), or None."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"\\u{ord(exc.object[exc.start]):04x}"
    return None


def decoded_lines(path: Path, errors: ErrorLog, lone_cr: bool = True) -> Iterator[tuple[int, str]]:
    """Lines decoded one by one, so invalid UTF-8 names its line instead of failing the file.

    A line ends at \\n, \\r\\n or a lone \\r (old Mac files): every editor shows those as line
    breaks, so a record and its line number must follow them too. CSV passes `lone_cr=False`: a \\r
    there is the csv module's to judge (inside quotes it is data, outside a malformed row)."""
    with open(path, "rb") as handle:
        lines = _physical_lines(handle) if lone_cr else (raw.rstrip(b"\r\n") for raw in handle)
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                errors.report(DataError(str(path), f"line {number}", f"invalid UTF-8 ({exc.reason} at byte {exc.start})"))
                continue
            yield number, text


LINE_END = re.compile(rb"\r\n|\r|\n")


def _physical_lines(handle, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The file's lines without their ends, read in chunks (a file of one huge line or of millions of
    short ones both stream; a long line's parts are joined once, not re-copied per chunk)."""
    parts: list[bytes] = []
    after_cr = False  # the last chunk ended in \r: a \n opening the next one is the same line end
    while chunk := handle.read(chunk_size):
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        after_cr = False
        start = 0
        for match in LINE_END.finditer(chunk):
            parts.append(chunk[start:match.start()])
            yield b"".join(parts)
            parts, start = [], match.end()
            after_cr = match.end() == len(chunk) and match.group() == b"\r"
        parts.append(chunk[start:])
    if any(parts):
        yield b"".join(parts)


class _FirstError:
    """Keeps the first bad line instead of reporting it: one bad line spoils a whole-file document."""

    def __init__(self) -> None:
        self.error: DataError | None = None

    def report(self, error: DataError) -> None:
        self.error = self.error or error


def _read_txt(path: Path, errors: ErrorLog, text_split: str) -> Iterator[RawRecord]:
    if text_split == "file":
        # One document per file (a book, an article): dropping an undecodable line from its middle would
        # join the text around it, so the file is reported as one bad record instead.
        first = _FirstError()
        lines = [line for _, line in decoded_lines(path, first)]
        if first.error is not None:
            errors.report(first.error)
        elif any(line.strip() for line in lines):
            yield RawRecord({"text": "\n".join(lines).strip("\n")}, str(path), "line 1")
        return
    if text_split == "line":
        for number, line in decoded_lines(path, errors):
            if line.strip():
                yield RawRecord({"text": line}, str(path), f"line {number}")
        return
    block: list[str] = []
    start = 0
    for number, line in decoded_lines(path, errors):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            yield RawRecord({"text": "\n".join(block)}, str(path), f"line {start}")
            block, start = [], 0
    if block:
        yield RawRecord({"text": "\n".join(block)}, str(path), f"line {start}")


def _read_jsonl(path: Path, errors: ErrorLog) -> Iterator[RawRecord]:
    for number, line in decoded_lines(path, errors):
        if not line.strip():
            continue
        try:
            row = _parse_json(line)
        except _BadJSON as exc:
            errors.report(DataError(str(path), f"line {number}", exc.problem))
            continue
        if not isinstance(row, dict):
            errors.report(DataError(str(path), f"line {number}", f"expected a JSON object, got {type(row).__name__}"))
            continue
        surrogate = _lone_surrogate(row) if SURROGATE_ESCAPE.search(line) else None
        if surrogate:
            errors.report(DataError(str(path), f"line {number}", f"a string holds a lone surrogate {surrogate} "
                                                                  "(not valid Unicode)"))
            continue
        yield RawRecord(row, str(path), f"line {number}")


def _read_json(path: Path, errors: ErrorLog) -> Iterator[RawRecord]:
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
        data = _parse_json(text)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(str(path), f"line {line}", f"invalid UTF-8 ({exc.reason})") from exc
    except _BadJSON as exc:
        # A broken .json file cannot be read past the error: this is fatal even under on_error=skip.
        raise DataError(str(path), f"line {exc.line}", exc.problem) from None
    if isinstance(data, dict):
        data = _columns_to_rows(path, data)
    if not isinstance(data, list):
        raise DataError(str(path), "top level", f"expected a list of records or an object of lists, got {type(data).__name__}")
    check_surrogates = SURROGATE_ESCAPE.search(text) is not None
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            errors.report(DataError(str(path), f"record {index}", f"expected an object, got {type(row).__name__}"))
            continue
        surrogate = _lone_surrogate(row) if check_surrogates else None
        if surrogate:
            errors.report(DataError(str(path), f"record {index}", f"a string holds a lone surrogate {surrogate} "
                                                                   "(not valid Unicode)"))
            continue
        yield RawRecord(row, str(path), f"record {index}")


def _columns_to_rows(path: Path, data: dict) -> list:
    """`{"col": [..], "col2": [..]}` (pandas' orient=list) → a list of rows."""
    lengths = {k: len(v) for k, v in data.items() if isinstance(v, list)}
    if len(lengths) != len(data) or len(set(lengths.values())) != 1:
        raise DataError(str(path), "top level", "an object must map every column to a list of equal length")
    n = next(iter(lengths.values()))
    return [{k: data[k][i] for k in data} for i in range(n)]


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        table = pq.ParquetFile(path)
        if table.metadata.num_rows and not table.schema_arrow.names:
            raise DataError(str(path), "file", f"{table.metadata.num_rows} rows but no columns")
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield RawRecord(row, str(path), f"record {index}")
                index += 1
    except pa.ArrowException as exc:
        # A damaged file cannot be read past the damage: fatal even under on_error=skip.
        where = f"record {index}" if index else "file"
        raise DataError(str(path), where, f"not a readable Parquet file ({exc})") from exc


def _read_csv(path: Path, errors: ErrorLog) -> Iterator[RawRecord]:
    physical: list[int] = []  # the file line of each line handed to the csv module

    def lines() -> Iterator[str]:
        for number, text in decoded_lines(path, errors, lone_cr=False):
            physical.append(number)
            yield text + "\n"  # the csv module needs line ends to join quoted multi-line fields

    # Long texts (whole documents, 1 MB replies) are data, not an attack on the parser.
    csv.field_size_limit(max(csv.field_size_limit(), sys.maxsize >> 1))
    reader = csv.DictReader(lines())
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The csv module resumes at the next line, so only this row is lost.
            errors.report(DataError(str(path), f"line {physical[-1] if physical else 1}", f"malformed CSV ({exc})"))
            continue
        # A quoted field may span lines: a row starts on the line after the previous row ended.
        first_line = physical[reader.line_num - 1 - _row_span(row)] if physical else reader.line_num
        where = f"line {first_line}"
        if None in row:
            errors.report(DataError(str(path), where, "more fields than the header has"))
            continue
        yield RawRecord(dict(row), str(path), where)


def _row_span(row: dict) -> int:
    """How many extra lines a row's quoted fields run over."""
    return sum(str(v).count("\n") for v in row.values() if isinstance(v, str))
