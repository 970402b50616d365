"""Compatibility with OpenAI's batch service, checked with the official `openai` SDK's own types, so
that it cannot drift: `pipeline status --json` is an `openai.types.Batch`, each result body a
`Completion` or `ChatCompletion`, each failed request's body an OpenAI error object and each line
that never ran an OpenAI batch error. One `pipeline run` (embedded SQLite, the tiny model) covers
the results; submit plus cancel, expiry and a strict rejection cover the other closing states."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from openai.types import Batch, BatchError, Completion
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject
from pydantic import BaseModel
from typer.testing import CliRunner

from db.base import utcnow
from db.migrate import upgrade
from db.repository import cancel_job, expire_jobs
from db.session import make_engine, session_factory
from pipeline.batch_object import completion_window
from pipeline.cli import app
from pipeline.export import export_results
from pipeline.request_parser import BODY_KEYS, IGNORED_BODY_KEYS, NEUTRAL_BODY_VALUES
from pipeline.settings import Settings
from pipeline.submit import job_summary, submit_file

from support.workdir import clean_workdir

LINE_ID = re.compile(r"batch_req_[0-9a-f]{32}")
REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")
TOO_LONG = "a" * 5000  # byte tokens: longer than the tiny model's 4096-token context


def chat_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def completion_line(custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


LINES: list[dict[str, Any] | str] = [
    chat_line("chat", {"model": "gpt-4o-mini", "max_tokens": 4, "temperature": 0,  # an alias of the served model
                       "messages": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}]}),
    completion_line("cmpl", {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}),
    {"custom_id": "simple", "text": "Summarise: caches", "max_tokens": 3, "temperature": 0, "priority": "high"},
    completion_line("too-long", {"prompt": TOO_LONG, "max_tokens": 2}),  # runs, and fails on its own
    "{not json",  # line 5: rejected
    chat_line("unknown-model", {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}),  # rejected
]


class BatchResponse(BaseModel):
    """`response` of an OpenAI batch output line (the SDK has no type for the output file)."""

    status_code: int
    request_id: str
    body: dict[str, Any]


class BatchOutputLine(BaseModel):
    """One line of an OpenAI batch output or error file, as OpenAI's batch guide documents it."""

    id: str
    custom_id: str | None
    response: BatchResponse | None
    error: BatchError | None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `pipeline run` of LINES, the job's `status --json`, and a second export of it."""
    workdir = tmp_path_factory.mktemp("openai-compat")
    (workdir / "in.jsonl").write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in LINES))
    with pytest.MonkeyPatch.context() as patch:
        clean_workdir(patch, workdir)
        patch.setenv("PIPELINE_MODEL_ALIASES", "gpt-4o-mini")
        runner = CliRunner()
        run = runner.invoke(app, ["run", "in.jsonl", "-o", "out.jsonl", "--errors", "err.jsonl", "--quiet"])
        assert run.exit_code == 0, run.output
        [listed] = json.loads(runner.invoke(app, ["list", "--json"]).stdout)
        status = runner.invoke(app, ["status", listed["id"], "--json"])
        assert status.exit_code == 0, status.output
        again = runner.invoke(app, ["results", listed["id"], "-o", "again.jsonl", "--errors", "again-err.jsonl"])
        assert again.exit_code == 0, again.output
    return {"dir": workdir, "status": json.loads(status.stdout), "out": read_jsonl(workdir / "out.jsonl"),
            "errors": read_jsonl(workdir / "err.jsonl")}


def test_status_is_an_openai_batch(ran) -> None:
    batch = Batch.model_validate(ran["status"])
    assert (batch.object, batch.status, batch.model) == ("batch", "completed", "tiny")
    assert batch.endpoint == "/v1/chat/completions,/v1/completions"  # the file mixes both
    assert batch.input_file_id == str(ran["dir"] / "in.jsonl")
    assert batch.completion_window == "none"  # `pipeline run` jobs never expire
    assert batch.expires_at is None and batch.completed_at is not None
    assert batch.errors is not None and (batch.errors.object, batch.errors.data) == ("list", [])
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (6, 3, 3)
    usage = batch.usage
    results = [line["response"]["body"]["usage"] for line in ran["out"]]
    assert usage.input_tokens == sum(u["prompt_tokens"] for u in results)  # the failed line billed nothing
    assert usage.output_tokens == sum(u["completion_tokens"] for u in results) > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == sum(u["prompt_tokens_details"]["cached_tokens"]
                                                           for u in results)


def test_every_result_body_is_an_openai_completion(ran) -> None:
    assert [line["custom_id"] for line in ran["out"]] == ["chat", "cmpl", "simple"]
    for line in ran["out"]:
        parsed = BatchOutputLine.model_validate(line)
        assert parsed.error is None and parsed.response is not None and parsed.response.status_code == 200
        body_type = ChatCompletion if line["custom_id"] == "chat" else Completion
        body = body_type.model_validate(parsed.response.body)
        assert body.model == "tiny" and body.usage is not None and body.usage.completion_tokens > 0
    chat = ChatCompletion.model_validate(ran["out"][0]["response"]["body"])
    assert chat.choices[0].message.role == "assistant" and chat.id.startswith("chatcmpl-")


def test_a_request_that_failed_on_its_own_is_a_400_with_an_openai_error_body(ran) -> None:
    [failed] = [line for line in ran["errors"] if line["custom_id"] == "too-long"]
    parsed = BatchOutputLine.model_validate(failed)
    assert parsed.error is None and parsed.response is not None and parsed.response.status_code == 400
    assert REQUEST_ID.fullmatch(parsed.response.request_id)
    error = ErrorObject.model_validate(parsed.response.body["error"])
    assert (error.code, error.type, error.param) == ("prompt_too_long", "invalid_request_error", None)
    assert "the model accepts" in error.message


def test_lines_that_never_ran_have_no_response_and_an_openai_batch_error(ran) -> None:
    never_ran = [line for line in ran["errors"] if line["custom_id"] != "too-long"]
    assert [(line["line"], line["custom_id"]) for line in never_ran] == [(5, None), (6, "unknown-model")]
    for line in never_ran:
        parsed = BatchOutputLine.model_validate(line)
        assert parsed.response is None and parsed.error is not None
    assert [line["error"]["code"] for line in never_ran] == ["invalid_json", "model_not_found"]


def test_result_and_error_lines_share_one_opaque_id_scheme_stable_across_exports(ran) -> None:
    lines = ran["out"] + ran["errors"]
    assert all(LINE_ID.fullmatch(line["id"]) for line in lines)
    assert len({line["id"] for line in lines}) == len(LINES)
    request_ids = [line["response"]["request_id"] for line in lines if line["response"] is not None]
    assert len(request_ids) == 4 and all(REQUEST_ID.fullmatch(r) for r in request_ids)
    assert len(set(request_ids)) == 4
    folder = ran["dir"]
    assert (folder / "again.jsonl").read_bytes() == (folder / "out.jsonl").read_bytes()
    assert (folder / "again-err.jsonl").read_bytes() == (folder / "err.jsonl").read_bytes()


# --- jobs closed without running: cancel, expiry, strict rejection --------------------------------


@pytest.fixture
def submitted(tmp_path: Path):
    """`submit(strict=False)` of three good lines and one bad one on a fresh SQLite database; no
    broker (the chunks are only recorded as sent)."""
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [
        {"text": "a"}, {"text": "b", "priority": "low"}, {"text": "c", "max_tokens": -1}, {"text": "d"}]))

    def submit(**kwargs: Any) -> dict[str, Any]:
        return submit_file(Settings(database_url=url), factory, path, send_chunk=lambda _chunk, _queue: None,
                           completion_window=timedelta(hours=24), **kwargs)

    yield factory, submit, tmp_path
    engine.dispose()


def test_a_cancelled_job_counts_its_unrun_lines_as_failed(submitted) -> None:
    factory, submit, folder = submitted
    job_id = submit()["id"]
    with factory.begin() as session:
        cancel_job(session, job_id)
    with factory() as session:
        batch = Batch.model_validate(job_summary(session, job_id))
    assert (batch.status, batch.completion_window, batch.endpoint) == ("cancelled", "24h", "/v1/completions")
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 0, 4)
    assert batch.cancelled_at is not None and batch.expires_at == batch.created_at + 24 * 3600
    export_results(factory, job_id, folder / "out.jsonl", folder / "err.jsonl")
    errors = read_jsonl(folder / "err.jsonl")
    assert [(e["line"], e["error"]["code"]) for e in errors] == [
        (1, "batch_cancelled"), (2, "batch_cancelled"), (3, "out_of_range"), (4, "batch_cancelled")]
    assert all(BatchOutputLine.model_validate(e).response is None for e in errors)


def test_an_expired_job_counts_its_unrun_lines_as_failed(submitted) -> None:
    factory, submit, _ = submitted
    job_id = submit()["id"]
    with factory.begin() as session:
        assert expire_jobs(session, now=utcnow() + timedelta(days=2)) == [job_id]
    with factory() as session:
        batch = Batch.model_validate(job_summary(session, job_id))
    assert batch.status == "expired" and batch.expired_at is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (4, 0, 4)


def test_a_strict_rejection_lists_its_errors_as_openai_batch_errors(submitted) -> None:
    factory, submit, _ = submitted
    summary = submit(strict=True)
    batch = Batch.model_validate(summary)
    assert batch.status == "failed" and batch.errors is not None and batch.errors.object == "list"
    [error] = batch.errors.data
    assert (error.code, error.line, error.param) == ("out_of_range", 3, None)
    assert error.message is not None and "max_tokens" in error.message


def test_the_readme_lists_every_refused_and_ignored_body_field() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### OpenAI compatibility", 1)[1].split("\n#", 1)[0]
    refused = section.split("**Refused**", 1)[1].split("**Accepted and ignored**", 1)[0]
    ignored = section.split("**Accepted and ignored**", 1)[1].split("\n- ", 1)[0]
    assert all(f"`{key}`" in refused for key in NEUTRAL_BODY_VALUES), refused
    assert all(f"`{key}`" in ignored for key in IGNORED_BODY_KEYS), ignored
    assert all(f"`{key}`" in section for key in BODY_KEYS)


@pytest.mark.parametrize(("seconds", "window"), [(86400, "24h"), (7 * 86400, "7d"), (2 * 3600, "2h"),
                                                 (90 * 60, "90m"), (45, "45s")])
def test_the_completion_window_is_written_as_submit_takes_it(seconds: int, window: str) -> None:
    created = utcnow()
    assert completion_window(created, created + timedelta(seconds=seconds)) == window
    assert completion_window(created, None) == "none"
