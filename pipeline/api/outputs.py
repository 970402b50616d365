"""A finished batch's output and error files: today's export (`export_results`), written once
into the tenant's folder when the batch is first read finished, and served as files from then on.

Exports of one batch are serialised within the server by a lock per batch; two server processes
racing are settled by the files' unique (job, name): the loser removes its copy and takes the
winner's rows.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from db.files import OUTPUT_PURPOSE, StoredFile
from db.repository import add_file, job_output_files, new_file_id
from pipeline.api.context import ServerContext
from pipeline.export import export_results

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def output_names(job_id: str) -> tuple[str, str]:
    return f"{job_id}_output.jsonl", f"{job_id}_error.jsonl"


def batch_outputs(context: ServerContext, tenant_id: str, folder: Path,
                  job_id: str) -> tuple[StoredFile, StoredFile]:
    """(output file, error file) of the finished batch `job_id`, exported now if they never were."""
    out_name, err_name = output_names(job_id)
    with context.sessions() as session:
        found = job_output_files(session, job_id)
    if out_name in found and err_name in found:
        return found[out_name], found[err_name]
    with _lock_for(job_id):
        return _export_once(context, tenant_id, folder, job_id)


def _export_once(context: ServerContext, tenant_id: str, folder: Path, job_id: str) -> tuple[StoredFile, StoredFile]:
    out_name, err_name = output_names(job_id)
    try:
        with context.sessions() as session:
            found = job_output_files(session, job_id)
        if out_name in found and err_name in found:
            return found[out_name], found[err_name]
        out_id, err_id = new_file_id(), new_file_id()
        out_path, err_path = folder / f"{out_id}.jsonl", folder / f"{err_id}.jsonl"
        export_results(context.sessions, job_id, out_path, err_path, tenant_id=tenant_id)
        try:
            with context.sessions.begin() as session:
                out = add_file(session, file_id=out_id, tenant_id=tenant_id, purpose=OUTPUT_PURPOSE,
                               filename=out_name, size=out_path.stat().st_size, storage_path=str(out_path),
                               job_id=job_id)
                err = add_file(session, file_id=err_id, tenant_id=tenant_id, purpose=OUTPUT_PURPOSE,
                               filename=err_name, size=err_path.stat().st_size, storage_path=str(err_path),
                               job_id=job_id)
                return out, err
        except IntegrityError:  # another server process exported it first
            out_path.unlink(missing_ok=True)
            err_path.unlink(missing_ok=True)
            with context.sessions() as session:
                found = job_output_files(session, job_id)
            return found[out_name], found[err_name]
    finally:
        with _locks_guard:  # the files are there now (or the export failed): nobody needs the lock kept
            _locks.pop(job_id, None)


def _lock_for(job_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(job_id, threading.Lock())
