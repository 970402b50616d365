"""Bulk insert of request rows into PostgreSQL: every row arrives; the rate is printed, not asserted."""

from __future__ import annotations

import hashlib
import time

from sqlalchemy import func, select

from db import Job, Request, RequestStatus, make_engine, session_factory
from db.migrate import upgrade
from db.repository import add_requests, create_job

ROWS = 20_000


def request_rows(count: int):
    """Lines shaped like real input: chat messages with a shared system prompt, sampling params."""
    system = "You are a careful annotator. Label the sentiment of the review as positive or negative. " * 3
    for n in range(1, count + 1):
        text = f"Review {n}: the product arrived on time and works as described, mostly."
        yield {
            "line": n,
            "custom_id": f"request-{n}",
            "endpoint": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": text}],
                "max_tokens": 16,
                "temperature": 0.0,
                "seed": n,
            },
            "prefix_key": hashlib.sha256(system.encode()).hexdigest(),
            "dedupe_key": hashlib.sha256(text.encode()).hexdigest(),
            "session_id": None,
            "turn": None,
        }


def test_bulk_insert_into_postgresql(pg_url):
    upgrade(pg_url)
    engine = make_engine(pg_url)
    factory = session_factory(engine)
    try:
        with factory.begin() as session:
            job = create_job(session, input_file="reviews.jsonl", model="tiny")
        rows = request_rows(ROWS)

        start = time.perf_counter()
        with factory.begin() as session:
            inserted = add_requests(session, job.id, rows)
        elapsed = time.perf_counter() - start
        print(f"\nbulk insert: {ROWS} rows in {elapsed:.2f} s = {ROWS / elapsed:,.0f} rows/s (PostgreSQL, with commit)")

        assert inserted == ROWS
        with factory() as session:
            assert session.scalar(select(func.count()).select_from(Request).where(Request.job_id == job.id)) == ROWS
            assert session.get(Job, job.id).request_total == ROWS
            last = session.scalar(select(Request).where(Request.job_id == job.id, Request.line == ROWS))
            assert (last.custom_id, last.status, last.body["seed"]) == (f"request-{ROWS}", RequestStatus.PENDING, ROWS)
    finally:
        engine.dispose()
