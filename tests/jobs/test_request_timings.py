"""Each result keeps its timings, and a job is billed the engine time its requests really used:
two chunks running at once on one engine share its steps, and are not both billed for them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from db.migrate import upgrade
from db.models import Request
from db.repository import get_usage
from db.session import make_engine, session_factory
from jobs.engine_host import get_engine_loop
from jobs.execution import execute_chunk
from pipeline.export import export_results
from pipeline.settings import Settings
from pipeline.submit import submit_file


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    return Settings(database_url=url, chunk_size=20)


def _submit(settings: Settings, folder: Path, name: str, lines: list[dict]) -> tuple[str, list[int]]:
    source = folder / f"{name}.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    factory = session_factory(make_engine(settings.database_url))
    sent: list[int] = []
    summary = submit_file(settings, factory, source, send_chunk=lambda chunk_id, queue: sent.append(chunk_id))
    return summary["id"], sent


def test_concurrent_chunks_are_billed_their_share_of_engine_time(settings: Settings, tmp_path: Path) -> None:
    jobs = [_submit(settings, tmp_path, name, [
        {"custom_id": f"{name}{i}", "text": f"{name} prompt number {i} " * (i + 1), "max_tokens": 12,
         "temperature": 0.7, "seed": i} for i in range(4)]) for name in ("a", "b")]
    factory = session_factory(make_engine(settings.database_url))
    loop = get_engine_loop(settings)
    busy = loop.engine.counters.busy_seconds
    chunks = [chunk for _, sent in jobs for chunk in sent]
    threads = [threading.Thread(target=execute_chunk, args=(factory, loop, chunk, f"w{chunk}")) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spent = loop.engine.counters.busy_seconds - busy

    billed = 0.0
    with factory() as session:
        for job_id, _ in jobs:
            rows = list(session.scalars(select(Request).where(Request.job_id == job_id)))
            assert all(r.text is not None for r in rows)
            for r in rows:
                assert r.engine_s > 0 and r.latency_s > 0
                assert 0 <= r.queue_wait_s and 0 < r.ttft_s <= r.latency_s
            usage = get_usage(session, job_id)
            assert usage.compute_seconds == pytest.approx(sum(r.engine_s for r in rows), rel=1e-9)
            billed += usage.compute_seconds
    # The chunks overlapped, so each one's wall time would sum to more than the engine ran.
    assert billed == pytest.approx(spent, rel=1e-6)


def test_duplicates_take_no_engine_time_and_timings_reach_the_parquet_export(settings: Settings,
                                                                              tmp_path: Path) -> None:
    greedy = {"text": "asked twice", "max_tokens": 5, "temperature": 0}
    job_id, sent = _submit(settings, tmp_path, "d", [{"custom_id": "first", **greedy}, {"custom_id": "copy", **greedy}])
    factory = session_factory(make_engine(settings.database_url))
    execute_chunk(factory, get_engine_loop(settings), sent[0], "w")
    with factory() as session:
        rows = {r.custom_id: r for r in session.scalars(select(Request).where(Request.job_id == job_id))}
        assert rows["first"].engine_s > 0 and rows["copy"].engine_s == 0.0
        assert rows["copy"].latency_s == rows["first"].latency_s
        assert get_usage(session, job_id).compute_seconds == pytest.approx(rows["first"].engine_s)
        expected = {c: (r.queue_wait_s, r.latency_s, r.ttft_s) for c, r in rows.items()}

    out = tmp_path / "out.parquet"
    export_results(factory, job_id, out)
    table = pq.read_table(out).to_pylist()
    assert {row["custom_id"]: (row["queue_wait_s"], row["latency_s"], row["ttft_s"]) for row in table} == expected
