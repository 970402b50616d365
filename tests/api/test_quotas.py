"""Quotas, kept in Redis: requests per minute (429 with Retry-After), active batches and tokens per
day, through the server and through `pipeline submit --tenant`. Each refusal changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select

from db.models import Job
from db.repository import get_tenant
from db.session import make_engine, session_factory
from pipeline.quotas import Quotas
from pipeline.settings import load_settings

from support.http import assert_error, call
from support.processes import assert_one_error_line, cli, cli_ok, settings_vars

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": "Count to three", "max_tokens": 4, "temperature": 0}}


def _jobs(env: dict[str, str]) -> int:
    with session_factory(make_engine(env["PIPELINE_DATABASE_URL"]))() as session:
        return session.scalar(select(func.count()).select_from(Job))


def _upload(client, tmp_path: Path) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(LINE) + "\n")
    return client.files.create(file=path.open("rb"), purpose="batch").id


def test_requests_per_minute_answer_429_with_retry_after(server) -> None:
    cli_ok(server.env, server.cwd, "tenant", "create", "chatty", "--requests-per-minute", "3")
    key = server.key("chatty")
    for _ in range(3):
        assert call(f"{server.url}/v1/files", key=key).status == 200
    refused = call(f"{server.url}/v1/files", key=key)
    assert_error(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # a token every 20 s at 3 a minute
    with pytest.raises(openai.RateLimitError):
        server.client(key).files.list()
    # Another tenant's bucket is its own.
    quiet = server.tenant("quiet")
    assert call(f"{server.url}/v1/files", key=quiet).status == 200
    # A quota changed by `pipeline tenant quota` applies from the tenant's next request.
    cli_ok(server.env, server.cwd, "tenant", "quota", "chatty", "--requests-per-minute", "unlimited")
    assert call(f"{server.url}/v1/files", key=key).status == 200
    cli_ok(server.env, server.cwd, "tenant", "quota", "quiet", "--requests-per-minute", "1")
    assert call(f"{server.url}/v1/files", key=quiet).status == 200
    assert_error(call(f"{server.url}/v1/files", key=quiet), 429, "rate_limit_exceeded")


def test_active_batches_are_capped(server, tmp_path: Path) -> None:
    """No worker runs, so a created batch stays active."""
    cli_ok(server.env, server.cwd, "tenant", "create", "busy", "--max-active-batches", "1")
    client = server.client(server.key("busy"))
    file_id = _upload(client, tmp_path)
    first = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert int(refused.value.response.headers["Retry-After"]) >= 1
    assert _jobs(server.env) == 1
    client.batches.cancel(first.id)  # a finished batch frees its place
    assert client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id

    # The CLI's submit, the operator's path, is under the same quota.
    refused = cli(server.env, server.cwd, "submit", str(tmp_path / "in.jsonl"), "--tenant", "busy", "--quiet")
    assert_one_error_line(refused, mentions="has 1 active batches, its limit")
    assert _jobs(server.env) == 2


def test_tokens_per_day_stop_new_batches(server, tmp_path: Path) -> None:
    cli_ok(server.env, server.cwd, "tenant", "create", "hungry", "--tokens-per-day", "100")
    client = server.client(server.key("hungry"))
    file_id = _upload(client, tmp_path)
    client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    settings = load_settings(env=settings_vars(server.env))
    with session_factory(make_engine(settings.database_url))() as session:
        tenant_id = get_tenant(session, "hungry").id
    quotas = Quotas.from_settings(settings)
    try:
        quotas.add_tokens(tenant_id, 100)  # what the workers count as they write results
    finally:
        quotas.close()
    with pytest.raises(openai.RateLimitError, match="tokens"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert _jobs(server.env) == 1
