"""OpenAI batch output lines, and the JSONL and Parquet writers: exact content, atomic rename, no
temporary file left behind whether the block succeeds or fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.errors import OutputError
from pipeline.line_ids import LineIds
from pipeline.output_writer import (
    RESULT_SCHEMA,
    JsonlResultWriter,
    ParquetResultWriter,
    ResultRecord,
    openai_output_line,
)

IDS_1, IDS_2, IDS_3 = (LineIds(f"batch_req_{n}", f"req_{n}", f"{n}") for n in ("r1", "r2", "r3"))
DONE = ResultRecord(custom_id="a", line=1, ids=IDS_1, endpoint="completions", model="tiny", created=1700000000,
                    text="Hello", finish_reason="stop", prompt_tokens=5, cached_tokens=4, completion_tokens=2,
                    queue_wait_s=0.5, latency_s=1.25, ttft_s=0.125)
CHAT = ResultRecord(custom_id="b", line=2, ids=IDS_2, endpoint="chat.completions", model="tiny",
                    created=1700000001, text="Hi!", finish_reason="length", prompt_tokens=9, completion_tokens=3)
FAILED = ResultRecord(custom_id="c", line=3, ids=IDS_3, endpoint="completions", model="tiny", created=1700000002,
                      error_code="prompt_too_long", error_message="the prompt is 9000 tokens; the model takes 8192")
USAGE_DONE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
              "prompt_tokens_details": {"cached_tokens": 4}}


def test_completion_line():
    assert openai_output_line(DONE) == {
        "id": "batch_req_r1", "custom_id": "a", "error": None,
        "response": {"status_code": 200, "request_id": "req_r1", "body": {
            "id": "cmpl-r1", "object": "text_completion", "created": 1700000000, "model": "tiny",
            "choices": [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop"}],
            "usage": USAGE_DONE,
        }},
    }


def test_chat_line():
    body = openai_output_line(CHAT)["response"]["body"]
    assert body == {
        "id": "chatcmpl-r2", "object": "chat.completion", "created": 1700000001, "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "logprobs": None,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }


CANCELLED = ResultRecord(custom_id="d", line=4, ids=IDS_3, endpoint="completions", model="tiny", created=0,
                         error_code="batch_cancelled", error_message="the job was cancelled", never_ran=True)


def test_a_request_that_failed_on_its_own_is_a_400_response_with_an_openai_error_body():
    assert openai_output_line(FAILED) == {
        "id": "batch_req_r3", "custom_id": "c", "error": None,
        "response": {"status_code": 400, "request_id": "req_r3", "body": {"error": {
            "message": "the prompt is 9000 tokens; the model takes 8192", "type": "invalid_request_error",
            "param": None, "code": "prompt_too_long"}}},
    }
    assert not FAILED.ok and DONE.ok


@pytest.mark.parametrize(("code", "status", "kind"), [
    ("engine_error", 500, "server_error"), ("worker_lost", 500, "server_error"),
    ("model_not_found", 404, "invalid_request_error"), ("invalid_prompt", 400, "invalid_request_error"),
])
def test_the_status_of_a_failed_request_follows_whose_fault_it_was(code, status, kind):
    line = openai_output_line(ResultRecord(custom_id="c", line=3, ids=IDS_3, endpoint="chat.completions", model="m",
                                           created=0, error_code=code, error_message="why"))
    assert (line["response"]["status_code"], line["response"]["body"]["error"]["type"]) == (status, kind)


def test_a_line_that_never_ran_has_no_response_and_an_error():
    assert openai_output_line(CANCELLED) == {
        "id": "batch_req_r3", "custom_id": "d", "response": None,
        "error": {"code": "batch_cancelled", "message": "the job was cancelled"},
    }


def test_record_invariants():
    with pytest.raises(AssertionError):
        ResultRecord(custom_id="x", line=1, ids=IDS_1, endpoint="completions", model="m", created=0)
    with pytest.raises(AssertionError):
        ResultRecord(custom_id="x", line=1, ids=IDS_1, endpoint="completions", model="m", created=0,
                     error_code="e")
    with pytest.raises(AssertionError):
        ResultRecord(custom_id="x", line=1, ids=IDS_1, endpoint="completions", model="m", created=0, text="t",
                     never_ran=True)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_jsonl_writer_renames_on_close(tmp_path):
    out = tmp_path / "out.jsonl"
    with JsonlResultWriter(out) as writer:
        writer.write(DONE)
        writer.write(FAILED)
        assert not out.exists()
        assert writer.tmp_path.parent == tmp_path and writer.tmp_path.exists()
    lines = out.read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [openai_output_line(DONE), openai_output_line(FAILED)]
    assert writer.num_written == 2
    assert leftovers(tmp_path) == []


def test_jsonl_keeps_non_ascii_and_escapes_lone_surrogates(tmp_path):
    out = tmp_path / "out.jsonl"
    odd = ResultRecord(custom_id="é", line=1, ids=IDS_1, endpoint="completions", model="m", created=0,
                       text="caf\u00e9 \ud800", finish_reason="stop")
    with JsonlResultWriter(out) as writer:
        writer.write(odd)
    raw = out.read_bytes()
    assert "café".encode() in raw and b"\\ud800" in raw
    assert json.loads(raw)["response"]["body"]["choices"][0]["text"] == "caf\u00e9 \ud800"


@pytest.mark.parametrize("writer_class", [JsonlResultWriter, ParquetResultWriter])
def test_exception_removes_the_temporary_file_and_keeps_the_old_output(tmp_path, writer_class):
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous complete export")
    with pytest.raises(KeyboardInterrupt):
        with writer_class(out) as writer:
            writer.write(DONE)
            raise KeyboardInterrupt
    assert out.read_bytes() == b"previous complete export"
    assert leftovers(tmp_path) == []


def test_abort_without_context_manager(tmp_path):
    writer = JsonlResultWriter(tmp_path / "out.jsonl")
    writer.write(DONE)
    writer.abort()
    writer.close()  # a no-op once aborted
    assert list(tmp_path.iterdir()) == []


def test_output_file_gets_normal_permissions(tmp_path):
    out = tmp_path / "out.jsonl"
    umask = os.umask(0o022)
    try:
        with JsonlResultWriter(out) as writer:
            writer.write(DONE)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o644


def test_parquet_writer_flat_columns_in_batches(tmp_path):
    out = tmp_path / "out.parquet"
    records = [DONE, CHAT, FAILED] * 3
    with ParquetResultWriter(out, batch_rows=4) as writer:
        for rec in records:
            writer.write(rec)
        assert not out.exists()
    file = pq.ParquetFile(out)
    assert file.schema_arrow == RESULT_SCHEMA
    assert file.metadata.num_row_groups == 3  # 4 + 4 + 1
    rows = file.read().to_pylist()
    assert rows[:3] == [
        {"custom_id": "a", "text": "Hello", "finish_reason": "stop", "prompt_tokens": 5, "cached_tokens": 4,
         "completion_tokens": 2, "error_code": None, "error_message": None, "queue_wait_s": 0.5, "latency_s": 1.25,
         "ttft_s": 0.125},
        {"custom_id": "b", "text": "Hi!", "finish_reason": "length", "prompt_tokens": 9, "cached_tokens": 0,
         "completion_tokens": 3, "error_code": None, "error_message": None, "queue_wait_s": None, "latency_s": None,
         "ttft_s": None},
        {"custom_id": "c", "text": None, "finish_reason": None, "prompt_tokens": 0, "cached_tokens": 0,
         "completion_tokens": 0, "error_code": "prompt_too_long",
         "error_message": "the prompt is 9000 tokens; the model takes 8192", "queue_wait_s": None, "latency_s": None,
         "ttft_s": None},
    ]
    assert [r["custom_id"] for r in rows] == ["a", "b", "c"] * 3
    assert leftovers(tmp_path) == []


def test_parquet_writer_with_no_rows_and_a_lone_surrogate(tmp_path):
    empty = tmp_path / "empty.parquet"
    with ParquetResultWriter(empty):
        pass
    assert pq.read_table(empty).num_rows == 0
    odd = tmp_path / "odd.parquet"
    with ParquetResultWriter(odd) as writer:
        writer.write(ResultRecord(custom_id="x", line=1, ids=IDS_1, endpoint="completions", model="m",
                                  created=0, text="a\ud800b", finish_reason="stop"))
    assert pq.read_table(odd).column("text").to_pylist() == ["a\ufffdb"]


def test_output_path_errors_are_one_clean_line(tmp_path):
    with pytest.raises(OutputError, match="the folder .*nope does not exist"):
        JsonlResultWriter(tmp_path / "nope" / "out.jsonl")
    with pytest.raises(OutputError, match="is a directory"):
        ParquetResultWriter(tmp_path)


def test_jsonl_lines_survive_readers_that_split_on_unicode_line_breaks(tmp_path):
    """`str.splitlines` also breaks on U+0085, U+2028 and U+2029, which JSON leaves raw: the
    writer escapes them, so each record stays one line for every reader."""
    breaks = "".join(chr(c) for c in range(0x110000) if len(f"a{chr(c)}b".splitlines()) == 2)
    assert set(breaks) >= {"\n", "\r", "\x85", "\u2028", "\u2029"}
    text = f"x{breaks}y"
    records = [
        ResultRecord(custom_id=f"id{breaks}", line=1, ids=IDS_1, endpoint="completions", model="m",
                     created=0, text=text, finish_reason="stop"),
        ResultRecord(custom_id="e", line=2, ids=IDS_2, endpoint="chat.completions", model="m", created=0,
                     error_code="engine_error", error_message=text),
    ]
    out = tmp_path / "out.jsonl"
    with JsonlResultWriter(out) as writer:
        for rec in records:
            writer.write(rec)
    content = out.read_text(encoding="utf-8")
    lines = content.splitlines()
    assert len(lines) == 2 and content.count("\n") == 2
    assert not set(breaks) & set(content.replace("\n", ""))
    assert [json.loads(line) for line in lines] == [openai_output_line(rec) for rec in records]


@pytest.mark.parametrize(("umask", "expected"), [(0o000, 0o644), (0o002, 0o644), (0o077, 0o600)])
def test_result_files_follow_the_umask_but_never_wider_than_0644(tmp_path, umask, expected):
    old = os.umask(umask)
    try:
        for out, writer_class in ((tmp_path / "out.jsonl", JsonlResultWriter),
                                  (tmp_path / "out.parquet", ParquetResultWriter)):
            with writer_class(out) as writer:
                writer.write(DONE)
            assert out.stat().st_mode & 0o777 == expected, writer_class
    finally:
        os.umask(old)


def test_a_replaced_file_keeps_a_narrower_mode(tmp_path):
    private, shared = tmp_path / "private.jsonl", tmp_path / "shared.jsonl"
    for path, mode in ((private, 0o600), (shared, 0o666)):
        path.write_text("earlier export\n")
        path.chmod(mode)
    old = os.umask(0o022)
    try:
        for path in (private, shared):
            with JsonlResultWriter(path) as writer:
                writer.write(DONE)
    finally:
        os.umask(old)
    assert (private.stat().st_mode & 0o777, shared.stat().st_mode & 0o777) == (0o600, 0o644)
    assert json.loads(private.read_text())["custom_id"] == "a"
