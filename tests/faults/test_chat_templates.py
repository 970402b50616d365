"""A model folder's chat template, through the real command line and real workers: a broken one
stops `pipeline run` and `pipeline worker` before any work, with one `error:` line; a line the
template cannot render (an undefined method, a sandbox violation, longer than the time budget)
fails alone with `chat_template_error` while the others complete; and a worker whose template
hangs (its budget set beyond the test) gives the chunk up, says it is unhealthy and stops taking
work, so another worker finishes the job, as after a crash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bad_input_cli import run_pipeline
from sqlalchemy import select

from db.base import utcnow
from db.models import Chunk
from db.repository import job_errors

from support.processes import assert_one_error_line, cli, pipeline_env
from line_outcomes import COMPLETED, error_messages, line_error, line_outcomes

# Renders every short conversation; fails on the content "w7 undefined" (a method that does not
# exist) and "w7 sandbox" (an attribute the sandbox forbids); quadratic in each message's length,
# so a message of 100,000 characters would take hours.
TEMPLATE = ("{% for m in messages %}"
            "{% if m.content == 'w7 undefined' %}{{ m.content.no_such_method() }}{% endif %}"
            "{% if m.content == 'w7 sandbox' %}{{ m.content.__class__.__base__ }}{% endif %}"
            "{% for a in m.content %}{% for b in m.content %}{% endfor %}{% endfor %}"
            "{{ m.role }}: {{ m.content }} {% endfor %}assistant:")
LONG = "w1 " * 40_000


def chat(custom_id: str, content: str) -> dict:
    return {"custom_id": custom_id, "messages": [{"role": "user", "content": content}], "max_tokens": 3,
            "temperature": 0}


def model_with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read(path: Path) -> dict[str, dict]:
    return {x["custom_id"]: x for x in map(json.loads, path.read_text().splitlines())}


def test_run_fails_only_the_lines_the_template_cannot_render(tmp_path: Path, hf_model_dirs) -> None:
    model = model_with_template(hf_model_dirs("llama")[0], tmp_path / "model", TEMPLATE)
    lines = [chat("good", "w5 w6"), chat("undefined", "w7 undefined"), chat("sandbox", "w7 sandbox"),
             chat("long", LONG), {"custom_id": "plain", "text": "w5 w6", "max_tokens": 3, "temperature": 0}]
    result = run_pipeline(["run", str(write(tmp_path / "in.jsonl", lines)), "-o", str(tmp_path / "out.jsonl"),
                           "--errors", str(tmp_path / "err.jsonl")], cwd=tmp_path, db_file=tmp_path / "db.sqlite3",
                          settings={"PIPELINE_MODEL": str(model), "PIPELINE_CHAT_TEMPLATE_TIMEOUT_S": "1"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(read(tmp_path / "out.jsonl")) == ["good", "plain"]
    errors = {k: (line_error(v)["code"], line_error(v)["message"]) for k, v in read(tmp_path / "err.jsonl").items()}
    assert errors == {
        "undefined": ("chat_template_error", "the chat template failed on these messages: UndefinedError: "
                                             "'str object' has no attribute 'no_such_method'"),
        "sandbox": ("chat_template_error", "the chat template did something the sandbox forbids: access to "
                                           "attribute '__class__' of 'str' object is unsafe"),
        "long": ("chat_template_error", "the chat template did not finish rendering within 1 s"),
    }


@pytest.mark.parametrize(("template", "says"), [
    ("{% for m in messages %}{{ m.content }}", "the chat template does not compile"),
    ("{% set _ = messages.pop() %}", "the sandbox forbids: access to attribute 'pop' of 'list' object is unsafe"),
])
def test_a_broken_template_stops_run_and_worker_before_any_work(tmp_path: Path, hf_model_dirs, template: str,
                                                                says: str) -> None:
    model = model_with_template(hf_model_dirs("llama")[0], tmp_path / "model", template)
    settings = {"PIPELINE_MODEL": str(model)}
    result = run_pipeline(["run", "-q", str(write(tmp_path / "in.jsonl", [chat("good", "w5 w6")])), "-o",
                           str(tmp_path / "out.jsonl")], cwd=tmp_path, db_file=tmp_path / "db.sqlite3",
                          settings=settings)
    assert_one_error_line(result, mentions=f"{model / 'tokenizer_config.json'}: ")
    assert says in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
    # The worker loads its model before it connects to anything: the broker here is never reached.
    worker = cli(pipeline_env(**settings, PIPELINE_BROKER_URL="redis://127.0.0.1:9/0",
                              PIPELINE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}"), tmp_path, "worker")
    assert_one_error_line(worker, mentions=f"{model / 'tokenizer_config.json'}: ")
    assert says in worker.stderr


@pytest.mark.workers
def test_a_hung_worker_gives_its_chunk_up_and_reports_itself_unhealthy(services, hf_model_dirs) -> None:
    s = services(PIPELINE_CHUNK_SIZE="10", PIPELINE_KV_CACHE_MEMORY_BYTES="64MiB")
    s.env_vars["PIPELINE_MODEL"] = str(model_with_template(hf_model_dirs("llama")[0], s.cwd / "model", TEMPLATE))
    # The budget far beyond the test: the long line hangs this worker as a template without one would.
    hung = s.start_worker("hung", PIPELINE_STALL_TIMEOUT_S="2", PIPELINE_CHAT_TEMPLATE_TIMEOUT_S="3600")
    lines = [chat("good", "w5 w6"), chat("long", LONG), chat("undefined", "w7 undefined")]
    job_id = s.submit(write(s.cwd / "in.jsonl", lines))

    def stalls():
        with s.factory() as session:
            return job_errors(session, job_id, kind="stalled")
    [stall] = s.wait(stalls, "the hung worker reported the stall")
    with s.factory() as session:
        [chunk_id] = session.scalars(select(Chunk.id).where(Chunk.job_id == job_id)).all()
    assert stall.chunk_id == chunk_id
    assert stall.message.startswith(f"worker {hung.node} made no progress on chunk {chunk_id} for ")
    assert stall.message.endswith(" s; it gave the chunk up (another worker takes it over once its lease runs "
                                  "out) and reports itself unhealthy")
    assert "chat_template.py" in stall.traceback  # where the chunk's thread is stuck, for an operator

    [reply] = s.app.control.broadcast("health", destination=[hung.node], reply=True, timeout=10)
    health = reply[hung.node]
    assert health["healthy"] is False
    assert health["reason"].startswith(f"no progress on chunk {chunk_id} for ")
    s.wait(lambda: s.app.control.inspect(destination=[hung.node], timeout=5).active_queues() == {hung.node: []},
           "the hung worker stopped consuming its queues")

    # The lease runs out although the hung worker lives; a healthy worker takes the chunk over.
    def lease_expired() -> bool:
        with s.factory() as session:
            return session.get(Chunk, chunk_id).lease_expires_at < utcnow()
    s.wait(lease_expired, "the hung chunk's lease ran out")
    assert hung.process.poll() is None
    s.start_worker("rescuer", PIPELINE_CHAT_TEMPLATE_TIMEOUT_S="1")
    s.sweep()
    s.wait(lambda: '"status": "completed"' in s.cli("status", job_id, "--json").stdout, "the job completed")
    assert line_outcomes(s, job_id, ["good", "long", "undefined"]) == {
        "good": COMPLETED, "long": "chat_template_error", "undefined": "chat_template_error"}
    assert error_messages(s, job_id)["long"] == "the chat template did not finish rendering within 1 s"
    assert hung.kill() != 0  # still hung: only a kill ends it (as its supervisor would restart it)
