"""Result files: OpenAI batch output lines (JSONL) or flat Parquet columns, written atomically.

A writer writes to a hidden temporary file beside the destination and renames it over the
destination only when closed without error, so an interrupted export never leaves a half-written
result file behind (nor clobbers an earlier complete one). Only a regular file is ever replaced
(`pipeline.output_paths.check_destination`, checked when the writer opens and again just before
the rename). New files get the user's umask but never more than 0644 (rw-r--r--).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import OutputError
from pipeline.output_paths import check_destination
from pipeline.line_ids import LineIds
from pipeline.request_spec import Endpoint

_SURROGATE = re.compile("[\ud800-\udfff]")
# JSON leaves these raw, but `str.splitlines` (and other Unicode-aware line readers) break a line on
# them; every other line break it knows is a control character, which JSON always escapes.
_UNICODE_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_W = TypeVar("_W", bound="_AtomicWriter")
FILE_MODE = 0o644  # the widest a result file gets; the umask narrows it further


# The HTTP status OpenAI answers a failed request with, by our error code; anything else is the
# request's own fault (400). Server-side failures are 500s, as OpenAI reports its own.
ERROR_STATUS: dict[str, int] = {"engine_error": 500, "worker_lost": 500, "model_not_found": 404}


@dataclass(frozen=True, slots=True)
class ResultRecord:
    """The outcome of one request: a completion, or an error (`error_code` set, `text` None).

    `ids` are the line's opaque ids (`pipeline.line_ids`), derived from stored ids, so exporting
    twice gives the same file. `created` is in unix seconds. `never_ran` marks an error of a line
    that never ran (rejected at submit, cancelled, expired); an error without it is a request that
    ran and failed (a prompt too long, say).
    """

    custom_id: str | None  # None only for an input line whose id could not be read (an error)
    line: int
    ids: LineIds
    endpoint: Endpoint
    model: str
    created: int
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error_code: str | None = None
    error_message: str | None = None
    never_ran: bool = False
    # Seconds (the results table's columns); None where unknown (never ran, or stored before 0004).
    queue_wait_s: float | None = None
    latency_s: float | None = None
    ttft_s: float | None = None

    def __post_init__(self) -> None:
        assert (self.error_code is None) == (self.error_message is None), "an error has a code and a message"
        assert self.error_code is not None or self.text is not None, "a success has a text"
        assert not self.never_ran or self.error_code is not None, "a line that never ran is an error"

    @property
    def ok(self) -> bool:
        """True for a completion, False for an error."""
        return self.error_code is None


def openai_output_line(rec: ResultRecord) -> dict[str, Any]:
    """One line of an OpenAI batch output (or error) file for `rec`, as OpenAI's batch API writes it:
    a success carries `response` (status 200, a `text_completion` or `chat.completion` body with
    usage) and `"error": null`; a request that ran and failed carries `response` with its HTTP
    status (`ERROR_STATUS`, else 400) and an OpenAI error body `{"error": {message, type, param,
    code}}`; a line that never ran carries `"response": null` and `error {code, message}`."""
    ids = rec.ids
    if rec.never_ran:
        return {"id": ids.line_id, "custom_id": rec.custom_id, "response": None,
                "error": {"code": rec.error_code, "message": rec.error_message}}
    if not rec.ok:
        status = ERROR_STATUS.get(rec.error_code or "", 400)
        error = {"message": rec.error_message, "type": "server_error" if status >= 500 else "invalid_request_error",
                 "param": None, "code": rec.error_code}
        return {"id": ids.line_id, "custom_id": rec.custom_id,
                "response": {"status_code": status, "request_id": ids.request_id, "body": {"error": error}},
                "error": None}
    if rec.endpoint == "chat.completions":
        body: dict[str, Any] = {"id": f"chatcmpl-{ids.completion_hex}", "object": "chat.completion"}
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": rec.text},
                                  "logprobs": None, "finish_reason": rec.finish_reason}
    else:
        body = {"id": f"cmpl-{ids.completion_hex}", "object": "text_completion"}
        choice = {"index": 0, "text": rec.text, "logprobs": None, "finish_reason": rec.finish_reason}
    body.update({
        "created": rec.created,
        "model": rec.model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": rec.prompt_tokens,
            "completion_tokens": rec.completion_tokens,
            "total_tokens": rec.prompt_tokens + rec.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": rec.cached_tokens},
        },
    })
    return {"id": ids.line_id, "custom_id": rec.custom_id,
            "response": {"status_code": 200, "request_id": ids.request_id, "body": body}, "error": None}


class _AtomicWriter:
    """Owns the temporary file and its fate: renamed over `path` by `close()`, deleted by `abort()`.
    Used as a context manager, an exception inside the block aborts."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = check_destination(path)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # O_EXCL: never share a temporary file with another writer. The umask narrows FILE_MODE
            # as for any file the user creates, but a umask of 0 never makes results (every
            # prompt's answer) writable by others.
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileNotFoundError:
            raise OutputError(self.path, f"cannot create it: the folder {self.path.parent} does not exist") from None
        except OSError as e:
            raise OutputError(self.path, f"cannot create it ({e.strerror})") from None
        try:  # a file being replaced keeps any narrower mode it had (a user's chmod 600 holds)
            old_mode = stat.S_IMODE(os.stat(self.path).st_mode)
        except FileNotFoundError:
            pass
        else:
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) & old_mode)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self.num_written = 0
        self._done = False

    def __enter__(self: _W) -> _W:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> None:
        """Finish the file and move it into place atomically. A failure here aborts."""
        if self._done:
            return
        try:
            self._finish()
            self._file.flush()
            os.fsync(self._file.fileno())  # the data must be on disk before the rename is
            self._file.close()
            check_destination(self.path)  # it may have changed while the file was written
            os.replace(self.tmp_path, self.path)
            _fsync_folder(self.path.parent)  # makes the rename itself survive a crash
        except BaseException:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Delete the temporary file; the destination is left as it was."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def _finish(self) -> None:
        """Write whatever the format buffers or needs at its end."""


class JsonlResultWriter(_AtomicWriter):
    """Writes OpenAI batch output lines (`openai_output_line`), one JSON object per line.
    `include_line` adds the input line number as `"line"` (error files: it names the bad line)."""

    def __init__(self, path: str | os.PathLike[str], include_line: bool = False) -> None:
        super().__init__(path)
        self.include_line = include_line

    def write(self, rec: ResultRecord) -> None:
        """Append one result line."""
        obj = openai_output_line(rec)
        if self.include_line:
            obj["line"] = rec.line
        line = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_UNICODE_LINE_BREAKS)
        # A lone surrogate in model text cannot be UTF-8; "backslashreplace" turns it into "\ud800",
        # which is that same character as a JSON escape, so the line stays valid JSON and exact.
        self._file.write(line.encode("utf-8", "backslashreplace") + b"\n")
        self.num_written += 1


RESULT_SCHEMA = pa.schema([
    pa.field("custom_id", pa.string(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int64(), nullable=False),
    pa.field("cached_tokens", pa.int64(), nullable=False),
    pa.field("completion_tokens", pa.int64(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("queue_wait_s", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("ttft_s", pa.float64()),
])


class ParquetResultWriter(_AtomicWriter):
    """Writes results as flat Parquet columns (`RESULT_SCHEMA`); a failed request has null `text`
    and `finish_reason` and its `error_code`/`error_message` set. Rows are buffered and written
    `batch_rows` at a time, each batch one row group."""

    def __init__(self, path: str | os.PathLike[str], batch_rows: int = 10_000) -> None:
        if batch_rows < 1:
            raise ValueError(f"batch_rows={batch_rows} must be at least 1")
        super().__init__(path)
        self.batch_rows = batch_rows
        self._columns: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA.names}
        try:
            self._writer = pq.ParquetWriter(self._file, RESULT_SCHEMA)
        except BaseException:
            self.abort()
            raise

    def write(self, rec: ResultRecord) -> None:
        """Buffer one result row; a full buffer is written as one record batch."""
        for name, value in (
            ("custom_id", _utf8(rec.custom_id)), ("text", _utf8(rec.text)), ("finish_reason", rec.finish_reason),
            ("prompt_tokens", rec.prompt_tokens), ("cached_tokens", rec.cached_tokens),
            ("completion_tokens", rec.completion_tokens), ("error_code", rec.error_code),
            ("error_message", _utf8(rec.error_message)), ("queue_wait_s", rec.queue_wait_s),
            ("latency_s", rec.latency_s), ("ttft_s", rec.ttft_s),
        ):
            self._columns[name].append(value)
        self.num_written += 1
        if len(self._columns["custom_id"]) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self._columns["custom_id"]:
            self._writer.write_batch(pa.RecordBatch.from_pydict(self._columns, schema=RESULT_SCHEMA))
            self._columns = {name: [] for name in RESULT_SCHEMA.names}

    def _finish(self) -> None:
        self._flush()
        self._writer.close()  # writes the footer; the file object stays ours to sync and close

    def abort(self) -> None:
        """Delete the temporary file; the destination is left as it was."""
        if not self._done and hasattr(self, "_writer"):
            try:
                self._writer.close()
            except Exception:  # a broken writer must not hide the error that caused the abort
                pass
        super().abort()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the rename is done either way
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _utf8(text: str | None) -> str | None:
    # Arrow strings must be valid UTF-8: a lone surrogate becomes U+FFFD rather than fail the batch.
    return None if text is None else _SURROGATE.sub("\ufffd", text)


class AtomicFile(_AtomicWriter):
    """Any other output file (a report): bytes written to a temporary file, moved into place on close,
    under the same rules as result files."""

    def write(self, data: bytes) -> None:
        self._file.write(data)
