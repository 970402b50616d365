"""The rows of a Parquet input file as plain dicts, streamed one record batch at a time.

Columns carry the same names as the JSONL fields (`text`, `max_tokens`, ..., or the OpenAI
`custom_id`, `url`, `body`). Other columns (labels, ids of your own) are ignored, since Parquet
files are often whole datasets; a column whose name is a near miss of a field ("temprature") is an
error, so a typo never silently drops a setting. A null means "absent". `messages` may be a
list<struct<role, content>> column or JSON text; `body` a struct column or JSON text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError
from pipeline.request_fields import InvalidField, close_match, decode_json
from pipeline.request_parser import OPENAI_KEYS, SIMPLE_KEYS
from pipeline.request_spec import LineError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

KNOWN_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(SIMPLE_KEYS + OPENAI_KEYS))
PROMPT_COLUMNS = ("text", "prompt", "messages", "body")
JSON_TEXT_COLUMNS = ("messages", "body")  # nested values that may arrive as JSON text instead
# Rows decoded to Python at a time. Memory is bounded by this and by one row group's column chunks
# (pyarrow decodes a row group's pages), never by the file.
BATCH_ROWS = 1024


def _read_errors() -> tuple[type[Exception], ...]:
    # pyarrow is imported where a Parquet file is read, not by every command that imports this
    # module (it took 0.15 s of each `pipeline status`).
    import pyarrow as pa

    return pa.ArrowException, OSError, ValueError


@dataclass(slots=True)
class ParquetRows:
    """A Parquet input whose footer and schema were checked; iterate it for `(line, row)` pairs,
    where `line` is the row number + 1 and `row` a dict without nulls, or a LineError for a cell
    that cannot be decoded."""

    path: str
    file: pq.ParquetFile
    columns: tuple[str, ...]

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any] | LineError]]:
        line = 0
        batches = self.file.iter_batches(batch_size=BATCH_ROWS, columns=list(self.columns))
        while True:
            try:
                batch = next(batches, None)
            except _read_errors() as e:
                # Only the footer can be checked up front; damage inside the data shows up here.
                reason = str(e).rstrip(".")
                message = f"Parquet data is corrupted after row {line} ({reason}); re-export the file"
                raise InputError(self.path, message) from None
            if batch is None:
                return
            for raw in _batch_rows(batch):
                line += 1
                if isinstance(raw, str):
                    yield line, LineError(self.path, line, raw, "not_utf8",
                                          "holds bytes that are not valid UTF-8; re-export the file as UTF-8 text")
                else:
                    yield line, _row(self.path, line, raw)


def open_parquet(path: Path) -> ParquetRows:
    """Open a Parquet input and check it can be read as requests. Raises InputError when the file
    is not readable Parquet, has no rows, has no prompt column, or has a misspelt column."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
    except _read_errors() as e:
        reason = str(e).rstrip(".")
        message = f"is not a readable Parquet file ({reason}); check that it is complete, or re-export it"
        raise InputError(path, message) from None
    for name in names:
        if name not in KNOWN_COLUMNS:
            close = close_match(name, KNOWN_COLUMNS)
            if close:
                raise InputError(path, f"column {name!r} is not a known field; did you mean {close!r}? Rename it "
                                       "(columns with unrelated names are ignored)")
    if not any(name in names for name in PROMPT_COLUMNS):
        found = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise InputError(path, f"has no prompt column (found: {found or 'none'}); add a 'text' column, or "
                               "'prompt', 'messages', or an OpenAI-style 'body' with 'url'")
    if "body" in names and "url" not in names:
        raise InputError(path, "has a 'body' column but no 'url' column; add 'url' holding "
                               "'/v1/chat/completions' or '/v1/completions' on every row")
    if file.metadata.num_rows == 0:
        raise InputError(path, "has no rows; nothing to run")
    columns = tuple(name for name in names if name in KNOWN_COLUMNS)
    return ParquetRows(str(path), file, columns)


def _batch_rows(batch: pa.RecordBatch) -> list[dict[str, Any]] | list[dict[str, Any] | str]:
    """The rows of `batch` as dicts; a row with a string cell that is not UTF-8 (Parquet writers do
    not all check) becomes the name of that column instead."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:  # rare: find the bad rows cell by cell
        return [_slow_row(batch, i) for i in range(batch.num_rows)]


def _slow_row(batch: pa.RecordBatch, index: int) -> dict[str, Any] | str:
    row: dict[str, Any] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            row[name] = column[index].as_py()
        except UnicodeDecodeError:
            return name
    return row


def _row(path: str, line: int, raw: dict[str, Any]) -> dict[str, Any] | LineError:
    row: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if isinstance(value, bytes):  # a binary column written without the UTF-8 annotation
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                return LineError(path, line, name, "not_utf8",
                                 "is binary data, not UTF-8 text; store it as a string column")
        if name in JSON_TEXT_COLUMNS and isinstance(value, str):
            try:
                value = decode_json(value, name)
            except InvalidField as e:
                return LineError(path, line, e.field, e.code, e.message)
        elif isinstance(value, (dict, list)):
            value = _without_nulls(value)
        row[name] = value
    return row


def _without_nulls(value: Any) -> Any:
    # A struct column gives every row every field, null where the row has none: that is "absent".
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value
