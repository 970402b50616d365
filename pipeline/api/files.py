"""`/v1/files`: upload (streamed to disk, then validated line by line with the reader `submit`
uses), list, retrieve, content, delete. Every lookup is the caller's tenant's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from db.files import UPLOAD_PURPOSE, StoredFile
from db.repository import add_file, delete_file, get_file, list_files, new_file_id
from pipeline.api.auth import Caller, authenticated
from pipeline.api.context import ServerContext, server_context
from pipeline.api.errors import ApiError, not_found
from pipeline.api.multipart import receive_upload
from pipeline.errors import InputError
from pipeline.input_reader import JSONL_SUFFIXES, PARQUET_SUFFIXES, read_requests

router = APIRouter(prefix="/v1/files")
FILE_ID = re.compile(r"file-[0-9a-f]{32}")
SUFFIXES = (*JSONL_SUFFIXES, *PARQUET_SUFFIXES)
MAX_LIST_LIMIT = 10_000  # OpenAI's largest (and default) page of files


def file_object(row: StoredFile) -> dict[str, Any]:
    """OpenAI's file object (`openai.types.FileObject`)."""
    return {"id": row.id, "object": "file", "bytes": row.bytes, "created_at": int(row.created_at.timestamp()),
            "filename": row.filename, "purpose": row.purpose, "status": "processed", "status_details": None,
            "expires_at": None}


def require_file(context: ServerContext, caller: Caller, file_id: str) -> StoredFile:
    """The caller's file `file_id`; 404 for a malformed id, an unknown one, or another tenant's."""
    if not FILE_ID.fullmatch(file_id):
        raise not_found("file", file_id)
    with context.sessions() as session:
        row = get_file(session, caller.tenant_id, file_id)
    if row is None:
        raise not_found("file", file_id)
    return row


@router.post("")
async def create_file(request: Request, context: ServerContext = Depends(server_context),
                      caller: Caller = Depends(authenticated)) -> dict[str, Any]:
    file_id = new_file_id()
    folder = tenant_folder(context, caller)
    partial = folder / f"{file_id}.part"
    upload = await receive_upload(request, partial, context.settings.max_upload_bytes)
    try:
        purpose = upload.fields.get("purpose")
        if purpose != UPLOAD_PURPOSE:
            raise ApiError(400, f"purpose must be {UPLOAD_PURPOSE!r} (the only one this server takes), "
                                f"got {purpose!r}.", param="purpose", code="invalid_value")
        suffix = Path(upload.filename or "").suffix.lower()
        if suffix not in SUFFIXES:
            raise ApiError(400, f"File {upload.filename!r}: unsupported type {suffix or '(no extension)'!r}; "
                                "upload .jsonl (one JSON object per line) or .parquet.", param="file",
                           code="invalid_file")
        stored = partial.with_name(file_id + suffix)
        partial.rename(stored)  # the reader picks the format by the extension
        partial = stored
        await run_in_threadpool(_validate, stored, upload.filename or "")
        request.app.state.metrics.add_upload(upload.size)
        with context.sessions.begin() as session:
            row = add_file(session, file_id=file_id, tenant_id=caller.tenant_id, purpose=UPLOAD_PURPOSE,
                           filename=upload.filename or "upload" + suffix, size=upload.size,
                           storage_path=str(stored))
            return file_object(row)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@router.get("")
def list_all(purpose: str | None = None, after: str | None = None,
             limit: int = Query(MAX_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT),
             order: Literal["asc", "desc"] = "desc", context: ServerContext = Depends(server_context),
             caller: Caller = Depends(authenticated)) -> dict[str, Any]:
    """OpenAI's file list: newest first (`order=asc`: oldest first), pages of `limit` after the
    file `after` (a page's `last_id`)."""
    with context.sessions() as session:
        cursor = None
        if after is not None:
            cursor = get_file(session, caller.tenant_id, after) if FILE_ID.fullmatch(after) else None
            if cursor is None:
                raise not_found("file", after)
        rows = list_files(session, caller.tenant_id, purpose=purpose, after=cursor, limit=limit + 1,
                          newest_first=order == "desc")
        data = [file_object(row) for row in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


@router.get("/{file_id}")
def retrieve(file_id: str, context: ServerContext = Depends(server_context),
             caller: Caller = Depends(authenticated)) -> dict[str, Any]:
    return file_object(require_file(context, caller, file_id))


@router.get("/{file_id}/content")
def content(file_id: str, context: ServerContext = Depends(server_context),
            caller: Caller = Depends(authenticated)) -> FileResponse:
    row = require_file(context, caller, file_id)
    media = "application/octet-stream" if row.filename.endswith(PARQUET_SUFFIXES) else "application/jsonl"
    return FileResponse(row.storage_path, media_type=media)


@router.delete("/{file_id}")
def delete(file_id: str, context: ServerContext = Depends(server_context),
           caller: Caller = Depends(authenticated)) -> dict[str, Any]:
    require_file(context, caller, file_id)
    with context.sessions.begin() as session:
        row = delete_file(session, caller.tenant_id, file_id)
    if row is None:  # deleted meanwhile by a concurrent request
        raise not_found("file", file_id)
    Path(row.storage_path).unlink(missing_ok=True)
    return {"id": file_id, "object": "file", "deleted": True}


def tenant_folder(context: ServerContext, caller: Caller) -> Path:
    """The tenant's own folder under `files_dir` (owner-only), created on first use."""
    folder = context.settings.files_dir / caller.tenant_id
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def _validate(path: Path, filename: str) -> None:
    """Read the whole file with `submit`'s reader: a file that cannot be read as a whole is refused
    now (400); bad lines are not, they become the batch's error lines, as with `pipeline submit`."""
    try:
        for _ in read_requests(path):
            pass
    except InputError as e:
        # The message names the upload, never the server's storage path.
        raise ApiError(400, f"File {filename!r}: {e.message}", param="file", code="invalid_file") from None
