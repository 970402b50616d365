"""Read an input file (JSONL or Parquet) into requests, one line at a time.

`read_requests` checks the file as a whole first and raises `InputError` before yielding anything
when it cannot be read at all. After that it streams: each non-blank line yields exactly one
`RequestSpec` or one `LineError`, in file order, and memory does not grow with the file except for
the map of custom_ids already seen (needed to name both lines of a duplicate).

JSONL rules: a UTF-8 BOM (at the start of any line, as `cat` of several files leaves them) and CRLF
line endings are accepted as if absent; blank lines (nothing but ASCII whitespace, whatever their
length) are skipped but still counted, so line numbers are the ones an editor shows; a file with
nothing but blank lines is an InputError, like an empty one. `.json` and `.ndjson` files are read
as JSONL too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import InputError
from pipeline.limits import DEFAULT_LIMITS, InputLimits, KiB, format_bytes
from pipeline.parquet_input import open_parquet
from pipeline.request_fields import InvalidField, decode_json, show
from pipeline.request_parser import parse_request
from pipeline.request_spec import LineError, RequestSpec
from pipeline.served_model import ServedModel

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
BOM = b"\xef\xbb\xbf"
# Lines are read in pieces of this size, so a huge line never sits in memory whole.
CHUNK_BYTES = 64 * KiB

Row = dict[str, Any] | LineError


def read_requests(path: str | os.PathLike[str], limits: InputLimits = DEFAULT_LIMITS,
                  default_max_tokens: int = 16, served: ServedModel | None = None) -> Iterator[RequestSpec | LineError]:
    """Validate `path` as a whole now, then stream its requests.

    Raises InputError at once (not on the first `next`) for a missing path, a directory, an empty
    or all-blank file, a file over `limits.max_file_bytes`, an unknown extension, a JSON array, a
    pretty-printed JSON object, UTF-16 text, and a Parquet file that is unreadable or has no prompt
    column. A Parquet file damaged inside its data raises InputError when the reader gets there.
    `default_max_tokens` applies to lines that set neither `max_tokens` nor `max_length`
    (16, OpenAI's default for completions). A line naming a model that is not `served` is
    rejected (`model_not_found`); None (a file read, not submitted) checks no model.
    """
    if not 1 <= default_max_tokens <= limits.max_tokens:
        raise ValueError(f"default_max_tokens={default_max_tokens} must be in [1, {limits.max_tokens}]")
    path = Path(path)
    _check_file(path, limits)
    suffix = path.suffix.lower()
    rows: Iterable[tuple[int, Row]]
    if suffix in PARQUET_SUFFIXES:
        rows = open_parquet(path)
    elif suffix in JSONL_SUFFIXES:
        _check_jsonl_start(path)
        rows = _jsonl_rows(path, limits)
    else:
        hint = "decompress it first" if suffix in (".gz", ".zst", ".bz2", ".xz", ".zip") else "convert it"
        raise InputError(path, f"unsupported file type {suffix or '(no extension)'!r}; {hint}: use .jsonl "
                               "(one JSON object per line) or .parquet")
    return _validated(str(path), rows, limits, default_max_tokens, served)


def _validated(path: str, rows: Iterable[tuple[int, Row]], limits: InputLimits,
               default_max_tokens: int, served: ServedModel | None) -> Iterator[RequestSpec | LineError]:
    first_line: dict[str, int] = {}  # custom_id -> the line that used it first
    # session_id -> (its first line's priority, that line): a session runs in one chunk, on one queue.
    session_priority: dict[str, tuple[str | None, int]] = {}
    for line, row in rows:
        if isinstance(row, LineError):
            yield row
            continue
        result = parse_request(row, path=path, line=line, limits=limits, default_max_tokens=default_max_tokens,
                               served=served)
        custom_id = result.custom_id
        if custom_id is not None:
            # Ids of rejected lines count too: their errors are reported under that id.
            first = first_line.setdefault(custom_id, line)
            if first != line:
                implicit = " (the default: this line's number)" if row.get("custom_id") is None else ""
                result = LineError(path, line, "custom_id", "duplicate_custom_id",
                                   f"custom_id {custom_id!r}{implicit} already used on line {first}; "
                                   "give each request its own custom_id")
        if isinstance(result, RequestSpec) and result.session_id is not None:
            result = _check_session_priority(result, path, session_priority)
        yield result


def _check_session_priority(spec: RequestSpec, path: str,
                            first: dict[str, tuple[str | None, int]]) -> RequestSpec | LineError:
    """`spec`, or an error when its session's first line asked for another priority: a session's
    turns run in order in one chunk, and a chunk goes to one queue."""
    priority, line = first.setdefault(spec.session_id, (spec.priority, spec.line))  # type: ignore[arg-type]
    if priority == spec.priority:
        return spec
    return LineError(path, spec.line, "priority", "conflicting_fields",
                     f"priority {show(spec.priority)} differs from {show(priority)} on line {line}, the first line of "
                     f"session {show(spec.session_id)}; a session runs on one queue: give its lines the same priority",
                     spec.custom_id)


def _check_file(path: Path, limits: InputLimits) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(path, "no such file; check the path") from None
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(path, "is a directory; give the path of a .jsonl or .parquet file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(path, "is not a regular file; give the path of a .jsonl or .parquet file")
    if info.st_size == 0:
        raise InputError(path, "is empty; write one JSON request per line")
    if info.st_size > limits.max_file_bytes:
        size = format_bytes(info.st_size)
        if not size.endswith(" bytes"):  # "10.0 GiB" alone would hide a file just over a 10 GiB limit
            size += f" ({info.st_size:,} bytes)"
        raise InputError(path, f"is {size}, over the {format_bytes(limits.max_file_bytes)} "
                               "limit (max_file_bytes); split it into several jobs")


def _check_jsonl_start(path: Path) -> None:
    """Catch the files that would make every line an error: they deserve one clear message."""
    try:
        with open(path, "rb") as f:
            start = _first_content(f)
    except OSError as e:
        raise InputError(path, f"cannot read it ({e.strerror})") from None
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(path, "is UTF-16 text; save it as UTF-8")
    if not start:
        raise InputError(path, "has only blank lines; write one JSON request per line")
    if start.startswith(b"["):
        raise InputError(path, "this is a JSON array; write one JSON object per line (JSONL)")
    if start.split(b"\n", 1)[0].strip() == b"{":
        raise InputError(path, "holds a JSON object spread over several lines; write each request as one "
                               "JSON object on a single line (JSONL)")


def _first_content(f: BinaryIO) -> bytes:
    """The file from its first non-blank byte on (at least its first line when that is shorter than
    CHUNK_BYTES), or b"" when it holds only a BOM and whitespace. A UTF-16 BOM is returned as is."""
    data = f.read(CHUNK_BYTES)
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data
    data = data.removeprefix(BOM)
    while data:
        content = data.lstrip()
        if content:
            return content + f.read(CHUNK_BYTES)  # so a short first line is whole, not cut at a chunk end
        data = f.read(CHUNK_BYTES)
    return b""


def _jsonl_rows(path: Path, limits: InputLimits) -> Iterator[tuple[int, Row]]:
    name = str(path)
    line = 0
    try:
        with open(path, "rb") as f:
            for content, size in _physical_lines(f, limits.max_line_bytes):
                line += 1
                if content is None:
                    limit = format_bytes(limits.max_line_bytes)
                    yield line, LineError(name, line, None, "line_too_long", f"the line is {format_bytes(size)}, over "
                                          f"the {limit} limit (max_line_bytes); make the request smaller")
                    continue
                content = content.removeprefix(BOM)  # also mid-file: `cat a.jsonl b.jsonl` keeps b's BOM
                if content.strip():
                    yield line, _decode_line(name, line, content)
    except OSError as e:
        raise InputError(path, f"reading failed after line {line} ({e.strerror}); check the disk and retry") from None


def _physical_lines(f: BinaryIO, max_line_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """`(content, size)` for each line, without its line ending. `content` is None when the line is
    longer than `max_line_bytes`: the rest of it is skipped chunk by chunk, so at most
    max_line_bytes + CHUNK_BYTES are held, whatever its length. An over-long blank line comes back
    as b"", so that blank lines are skipped whatever their length."""
    while piece := f.readline(CHUNK_BYTES):
        if not piece.endswith(b"\n") and len(piece) == CHUNK_BYTES:  # a line longer than one chunk
            buf: bytearray | None = bytearray(piece)
            size, blank = len(piece), not piece.removeprefix(BOM).strip()
            while not piece.endswith(b"\n") and (piece := f.readline(CHUNK_BYTES)):
                size += len(piece)
                blank = blank and not piece.strip()
                if buf is not None:
                    buf += piece
                    if len(buf) > max_line_bytes + 2:  # too long even without "\r\n": stop keeping it
                        buf = None
            if buf is None:
                yield (b"" if blank else None), size - _eol_length(piece)
                continue
            piece = bytes(buf)
        content = piece[: len(piece) - _eol_length(piece)]
        too_long = len(content) > max_line_bytes and content.removeprefix(BOM).strip()
        yield (None if too_long else content), len(content)


def _eol_length(piece: bytes) -> int:
    return 2 if piece.endswith(b"\r\n") else 1 if piece.endswith(b"\n") else 0


def _decode_line(path: str, line: int, content: bytes) -> Row:
    nul = content.find(b"\x00")
    if nul >= 0:
        return LineError(path, line, None, "nul_byte", f"NUL byte at column {nul + 1}; the file looks binary "
                                                       "or UTF-16: save it as UTF-8 text")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        return LineError(path, line, None, "not_utf8", f"byte 0x{content[e.start]:02x} at column {e.start + 1} is "
                                                       "not valid UTF-8; save the file as UTF-8")
    try:
        obj = decode_json(text)
    except InvalidField as e:
        return LineError(path, line, e.field, e.code, e.message)
    if not isinstance(obj, dict):
        kind = ("an array" if isinstance(obj, list) else "a string" if isinstance(obj, str)
                else f"the value {text.strip()[:20]}")
        return LineError(path, line, None, "not_an_object",
                         f'the line holds {kind}, not a JSON object; write one object per line, like {{"text": "..."}}')
    return obj
