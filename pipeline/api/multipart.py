"""`POST /v1/files`' multipart body, streamed straight to disk.

The body is parsed as it arrives (python-multipart's push parser), the file part written to its
destination piece by piece, so an upload of any size costs the server the same small memory. The
size limit is enforced while reading (and up front from Content-Length): an oversized upload is
refused with 413 without being stored whole. Small form fields (`purpose`) are kept in memory,
capped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from pipeline.api.errors import ApiError

MAX_FIELD_BYTES = 1024  # `purpose` and the like
MAX_FILENAME_CHARS = 255
FILE_MODE = 0o600  # uploads hold prompts


@dataclass(slots=True)
class Upload:
    """A received multipart body: its small fields, and the file part (written to `path`)."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0


class _TooLarge(Exception):
    pass


async def receive_upload(request: Request, path: Path, max_bytes: int | None) -> Upload:
    """Parse `request`'s multipart body, writing its one `file` part to `path` (created owner-only).
    ApiError 400 for a body that is not well-formed multipart or has no or several files, 413 for a
    file over `max_bytes`. On any refusal nothing is left at `path`."""
    media_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise ApiError(400, "Send the file as multipart/form-data with a 'file' part and a 'purpose' field.",
                       code="invalid_multipart")
    declared = request.headers.get("content-length")
    if max_bytes is not None and declared is not None and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise _too_large(max_bytes)  # the form's own overhead is far below 64 KiB
    upload = Upload()
    state = _PartState()
    out = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")
    try:
        with out:
            parser = MultipartParser(boundary, _callbacks(state, upload, out, max_bytes))
            async for piece in request.stream():
                parser.write(piece)
            parser.finalize()
        if not state.ended:
            raise ApiError(400, "The multipart body ends before its closing boundary; send it whole.",
                           code="invalid_multipart")
        if state.files != 1:
            raise ApiError(400, "Send exactly one file, in a part named 'file'.", param="file",
                           code="invalid_multipart")
    except _TooLarge:
        path.unlink(missing_ok=True)
        raise _too_large(max_bytes or 0) from None
    except MultipartParseError as e:
        path.unlink(missing_ok=True)
        raise ApiError(400, f"The multipart body is malformed ({e}); send a well-formed multipart/form-data body.",
                       code="invalid_multipart") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return upload


@dataclass(slots=True)
class _PartState:
    header_field: bytes = b""
    header_value: bytes = b""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str | None = None
    is_file: bool = False
    value: bytearray = field(default_factory=bytearray)
    files: int = 0
    ended: bool = False


def _callbacks(state: _PartState, upload: Upload, out, max_bytes: int | None) -> dict:
    def on_part_begin() -> None:
        state.headers, state.name, state.is_file, state.value = {}, None, False, bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        state.headers[state.header_field.lower()] = state.header_value
        state.header_field, state.header_value = b"", b""

    def on_headers_finished() -> None:
        _, options = parse_options_header(state.headers.get(b"content-disposition", b""))
        state.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        state.is_file = state.name == "file" and filename is not None
        if state.is_file:
            state.files += 1
            if state.files > 1:
                raise ApiError(400, "Send exactly one file, in a part named 'file'.", param="file",
                               code="invalid_multipart")
            upload.filename = os.path.basename(filename.decode("utf-8", "replace"))[:MAX_FILENAME_CHARS] or "upload"

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.is_file:
            upload.size += end - start
            if max_bytes is not None and upload.size > max_bytes:
                raise _TooLarge
            out.write(data[start:end])
        else:
            state.value += data[start:end]
            if len(state.value) > MAX_FIELD_BYTES:
                raise ApiError(400, f"Form field {state.name!r} is longer than {MAX_FIELD_BYTES} bytes.",
                               param=state.name, code="invalid_multipart")

    def on_part_end() -> None:
        if not state.is_file and state.name:
            upload.fields[state.name] = state.value.decode("utf-8", "replace")

    def on_end() -> None:
        state.ended = True

    return {"on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
            "on_part_end": on_part_end, "on_end": on_end}


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"The file is larger than this server accepts ({max_bytes:,} bytes); split it into "
                         "several files.", param="file", code="file_too_large")
