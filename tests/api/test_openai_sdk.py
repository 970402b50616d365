"""The Batch API driven by the official `openai` SDK, against a real `pipeline serve` process, a real
worker, PostgreSQL and Redis: upload, create, poll until completed, read the output and error
files, list with pagination, cancel. The SDK's own types parse every response."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

from db.repository import get_tenant
from db.session import make_engine, session_factory
from pipeline.quotas import Quotas
from pipeline.settings import load_settings

from support.http import assert_error, call
from support.processes import settings_vars, worker

LINES = [
    {"custom_id": "greet", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5,
              "temperature": 0}},
    {"custom_id": "story", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [{"role": "user", "content": "Once upon"}], "max_tokens": 4,
              "temperature": 0}},
    {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "tiny", "messages": [], "max_tokens": 4}},  # empty messages: rejected, an error line
]
POLL_S = 0.2
DEADLINE_S = 120


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _wait(client, batch_id: str, statuses=("completed",)) -> Batch:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert batch.status in ("validating", "in_progress", "finalizing"), batch
        time.sleep(POLL_S)
    pytest.fail(f"batch {batch_id} not {statuses} after {DEADLINE_S} s")


@pytest.mark.workers
def test_upload_run_and_read_a_batch_with_the_sdk(server, tmp_path: Path) -> None:
    client = server.client(server.tenant("acme"))
    with worker(server.env, tmp_path, tmp_path / "worker.log", "--concurrency", "2"):
        uploaded = client.files.create(file=_write(tmp_path / "requests.jsonl", LINES).open("rb"), purpose="batch")
        assert isinstance(uploaded, FileObject)
        assert (uploaded.filename, uploaded.purpose, uploaded.bytes) == (
            "requests.jsonl", "batch", (tmp_path / "requests.jsonl").stat().st_size)
        assert client.files.retrieve(uploaded.id).id == uploaded.id
        assert client.files.content(uploaded.id).read() == (tmp_path / "requests.jsonl").read_bytes()

        created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"run": "nightly"})
        assert created.input_file_id == uploaded.id and created.metadata == {"run": "nightly"}
        done = _wait(client, created.id)

    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    assert done.output_file_id and done.error_file_id
    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in output] == ["greet", "story"]
    for line in output:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        ChatCompletion.model_validate(line["response"]["body"])
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]) for e in errors] == [("bad", None)]
    assert errors[0]["error"]["code"]

    # The output files are the tenant's files too, and stay the same on every read.
    assert client.batches.retrieve(done.id).output_file_id == done.output_file_id
    listed = {f.id: f.purpose for f in client.files.list()}
    assert listed == {uploaded.id: "batch", done.output_file_id: "batch_output", done.error_file_id: "batch_output"}

    # The workers counted the batch's tokens against the tenant's day (its tokens_per_day quota).
    settings = load_settings(env=settings_vars(server.env))
    with session_factory(make_engine(settings.database_url))() as session:
        tenant_id = get_tenant(session, "acme").id
    quotas = Quotas.from_settings(settings)
    try:
        assert quotas.tokens_today(tenant_id) == done.usage.input_tokens + done.usage.output_tokens > 0
    finally:
        quotas.close()

    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    assert [f.id for f in client.files.list(purpose="batch")] == []


def test_batches_list_pages_and_cancel_keeps_nothing_running(server, tmp_path: Path) -> None:
    """No worker runs here, so batches stay in progress until cancelled."""
    client = server.client(server.tenant("acme"))
    uploaded = client.files.create(file=_write(tmp_path / "in.jsonl", LINES[:2]).open("rb"), purpose="batch")
    ids = [client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h").id for _ in range(3)]
    newest_first = ids[::-1]

    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == newest_first[2:] and not second.has_more
    assert [b.id for b in client.batches.list(limit=2)] == newest_first  # the SDK follows the pages

    # Files page the same way, newest first unless order="asc".
    more = [client.files.create(file=(tmp_path / "in.jsonl").open("rb"), purpose="batch").id for _ in range(2)]
    files_newest_first = [*more[::-1], uploaded.id]
    page = client.files.list(limit=2)
    assert [f.id for f in page.data] == files_newest_first[:2] and page.has_more
    rest = client.files.list(limit=2, after=page.data[-1].id)
    assert [f.id for f in rest.data] == files_newest_first[2:] and not rest.has_more
    assert [f.id for f in client.files.list(limit=1)] == files_newest_first  # the SDK follows the pages
    assert [f.id for f in client.files.list(limit=2, order="asc")] == files_newest_first[::-1]
    assert [f.id for f in client.files.list(order="asc", after=uploaded.id)] == more
    assert_error(call(f"{server.url}/v1/files?after=file-{'0' * 32}", key=client.api_key), 404, "not_found")
    assert_error(call(f"{server.url}/v1/files?limit=0", key=client.api_key), 400, "invalid_value")
    assert_error(call(f"{server.url}/v1/files?order=sideways", key=client.api_key), 400, "invalid_value")

    cancelled = client.batches.cancel(ids[0])
    assert cancelled.status == "cancelled" and cancelled.request_counts.failed == 2
    errors = [json.loads(line) for line in client.files.content(cancelled.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("greet", "batch_cancelled"),
                                                                      ("story", "batch_cancelled")]
    assert cancelled.output_file_id is None  # nothing completed
    assert client.batches.retrieve(ids[1]).status == "in_progress"


def test_idempotency_key_and_priority_extensions(server, tmp_path: Path) -> None:
    client = server.client(server.tenant("acme"))
    uploaded = client.files.create(file=_write(tmp_path / "in.jsonl", LINES[:1]).open("rb"), purpose="batch")
    headers = {"Idempotency-Key": "nightly-2026-12-06"}
    first = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", extra_headers=headers, metadata={"priority": "high"})
    again = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", extra_headers=headers, metadata={"priority": "high"})
    assert again.id == first.id and first.model_extra["priority"] == "high"
    by_header = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", extra_headers={"X-Pipeline-Priority": "low"})
    assert by_header.model_extra["priority"] == "low"
