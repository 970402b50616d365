"""Repository functions on SQLite and PostgreSQL (migrated by Alembic), with exact expectations."""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from db import Chunk, ChunkStatus, ErrorEvent, Job, JobStatus, Priority, Request, RequestStatus
from db.repository.chunks import ASSIGN_FETCH_SIZE
from db.repository import (
    IdempotencyKeyReused,
    JobCounts,
    RequestResult,
    add_requests,
    add_usage,
    assign_chunks,
    cancel_job,
    chunk_requests,
    claim_chunk,
    create_api_key,
    create_job,
    create_tenant,
    disable_tenant,
    ensure_tenant,
    get_tenant,
    list_api_keys,
    list_tenants,
    delete_idle_sessions,
    expire_jobs,
    fail_lost_chunk,
    fail_requests,
    get_session,
    iter_requests,
    job_counts,
    job_errors,
    lost_chunks,
    mark_chunks_queued,
    record_error,
    record_errors,
    record_results,
    renew_lease,
    retry_failed,
    revoke_api_key,
    set_status,
    tenant_for_api_key,
    upsert_session,
)

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
MINUTE = timedelta(minutes=1)


def line(n: int, *, prefix: str | None = None, session_id: str | None = None, turn: int | None = None,
         priority: Priority | None = None) -> dict:
    return {
        "line": n,
        "custom_id": f"req-{n}",
        "endpoint": "/v1/completions",
        "body": {"prompt": f"prompt {n}", "max_tokens": 8, "temperature": 0.0},
        "prefix_key": prefix,
        "session_id": session_id,
        "turn": turn,
        "priority": priority,
    }


def new_job(session, requests: int = 0, *, status: JobStatus = JobStatus.IN_PROGRESS, **kwargs) -> Job:
    kwargs.setdefault("now", T0)
    job = create_job(session, input_file="in.jsonl", model="tiny", **kwargs)
    add_requests(session, job.id, [line(n) for n in range(1, requests + 1)])
    if status != JobStatus.VALIDATING:
        set_status(session, job.id, status, now=T0)
    session.commit()
    return job


def chunk_of(session, job_id: str, max_requests: int = 100) -> Chunk:
    [chunk] = assign_chunks(session, job_id, max_requests, now=T0)
    return chunk


def ids(session, job_id: str) -> dict[str, int]:
    """custom_id -> request id."""
    return dict(session.execute(select(Request.custom_id, Request.id).where(Request.job_id == job_id)).all())


def stamps_of(job: Job) -> dict[str, datetime | None]:
    return {s.value: getattr(job, f"{s.value}_at") for s in JobStatus if s != JobStatus.VALIDATING}


def reread(factory, model, key):
    """The committed row, read in a new session (not this test's identity map)."""
    with factory() as other:
        return other.get(model, key)


def ok(request_id: int, text: str = "out", *, prompt: int = 3, cached: int = 1, completion: int = 2) -> RequestResult:
    return RequestResult(
        request_id,
        text=text,
        finish_reason="stop",
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
    )


def err(request_id: int) -> RequestResult:
    return RequestResult(request_id, error_code="engine_error", error_message="prompt too long", prompt_tokens=5)


# --- jobs --------------------------------------------------------------------------------------


def test_create_job_sets_fields_and_expiry(session, factory):
    job = create_job(
        session,
        input_file="in.jsonl",
        model="tiny",
        priority=Priority.HIGH,
        strict=True,
        completion_window=timedelta(hours=24),
        metadata={"team": "evals"},
        now=T0,
    )
    session.commit()
    stored = reread(factory, Job, job.id)
    assert stored.id.startswith("batch_") and len(stored.id) == len("batch_") + 32
    assert (stored.status, stored.priority, stored.strict, stored.model) == (
        JobStatus.VALIDATING,
        Priority.HIGH,
        True,
        "tiny",
    )
    assert stored.created_at == T0 and stored.created_at.tzinfo is not None
    assert stored.expires_at == T0 + timedelta(hours=24)
    assert stored.metadata_ == {"team": "evals"} and stored.errors == []
    assert (stored.request_total, stored.request_completed, stored.request_failed) == (0, 0, 0)
    assert stored.in_progress_at is None and stored.idempotency_key is None
    with pytest.raises(ValueError, match="completion window"):
        create_job(session, input_file="in.jsonl", model="tiny", completion_window=timedelta(0))


def test_create_job_with_a_used_idempotency_key_returns_the_same_job(session, factory):
    first = create_job(session, input_file="a.jsonl", model="tiny", idempotency_key="nightly-2025-01-01")
    session.commit()
    again = create_job(session, input_file="other.jsonl", model="tiny", idempotency_key="nightly-2025-01-01")
    other = create_job(session, input_file="a.jsonl", model="tiny", idempotency_key="nightly-2025-01-02")
    session.commit()
    assert again.id == first.id and again.input_file == "a.jsonl"
    assert other.id != first.id
    assert session.scalar(select(func.count()).select_from(Job)) == 2


def test_an_idempotency_key_returns_its_job_only_for_the_same_file(session):
    first = create_job(session, input_file="/in/a.jsonl", model="tiny", idempotency_key="k", input_digest="a" * 64)
    session.commit()
    same = create_job(session, input_file="/in/copy.jsonl", model="tiny", idempotency_key="k", input_digest="a" * 64)
    assert same.id == first.id  # the same bytes, wherever they lie
    with pytest.raises(IdempotencyKeyReused) as refused:
        create_job(session, input_file="/in/a.jsonl", model="tiny", idempotency_key="k", input_digest="b" * 64)
    assert refused.value.job_id == first.id
    assert str(refused.value) == (
        f"idempotency key 'k' was used for job {first.id} with another file (/in/a.jsonl); submit this file with "
        f"a new key (or none), or see the first job with `pipeline status {first.id}`")
    assert isinstance(refused.value, ValueError)  # the CLI's one error line, beat's logged nightly-run error
    session.rollback()
    assert session.scalar(select(func.count()).select_from(Job)) == 1
    stored = session.scalar(select(Job))
    assert stored.input_digest == "a" * 64


def test_a_job_stored_without_a_digest_is_returned_for_any_file(session):
    """Jobs from before the digest (revision 0001) keep answering their key, as they did."""
    first = create_job(session, input_file="/in/a.jsonl", model="tiny", idempotency_key="old")
    session.commit()
    assert first.input_digest is None
    assert create_job(session, input_file="/in/b.jsonl", model="tiny", idempotency_key="old",
                      input_digest="b" * 64).id == first.id


def test_idempotency_keys_are_scoped_per_tenant(session):
    """Another tenant's key neither returns nor reveals its job: the same key makes a new job."""
    acme, other = create_tenant(session, "acme"), create_tenant(session, "other")
    theirs = create_job(session, input_file="a.jsonl", model="tiny", idempotency_key="k", tenant_id=acme.id,
                        input_digest="a" * 64)
    mine = create_job(session, input_file="b.jsonl", model="tiny", idempotency_key="k", tenant_id=other.id,
                      input_digest="b" * 64)
    untenanted = create_job(session, input_file="c.jsonl", model="tiny", idempotency_key="k")
    session.commit()
    assert len({theirs.id, mine.id, untenanted.id}) == 3
    assert (mine.tenant_id, untenanted.tenant_id) == (other.id, None)
    again = create_job(session, input_file="b.jsonl", model="tiny", idempotency_key="k", tenant_id=other.id,
                       input_digest="b" * 64)
    assert again.id == mine.id


def test_concurrent_submits_with_one_key_get_one_job(factory):
    """The second submit waits for the first to commit (PostgreSQL: on the unique index, then its
    savepoint catches the violation; SQLite: on the write lock), then returns the winner's job."""
    with factory() as first:
        winner = create_job(first, input_file="a.jsonl", model="tiny", idempotency_key="same")
        result: dict[str, str] = {}

        def second_submit() -> None:
            with factory() as second:
                result["id"] = create_job(second, input_file="b.jsonl", model="tiny", idempotency_key="same").id
                second.commit()

        thread = threading.Thread(target=second_submit)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # blocked on the unique index
        first.commit()
        thread.join(timeout=10)
    assert result == {"id": winner.id}
    with factory() as check:
        assert check.scalar(select(func.count()).select_from(Job)) == 1


def test_set_status_follows_the_lifecycle_and_stamps_each_step(session, factory):
    job = new_job(session, status=JobStatus.VALIDATING)
    set_status(session, job.id, JobStatus.IN_PROGRESS, now=T0 + MINUTE)
    set_status(session, job.id, JobStatus.FINALIZING, now=T0 + 2 * MINUTE)
    set_status(session, job.id, JobStatus.COMPLETED, now=T0 + 3 * MINUTE)
    session.commit()
    stored = reread(factory, Job, job.id)
    assert stored.status == JobStatus.COMPLETED
    assert (stored.in_progress_at, stored.finalizing_at, stored.completed_at) == (
        T0 + MINUTE,
        T0 + 2 * MINUTE,
        T0 + 3 * MINUTE,
    )
    assert (stored.failed_at, stored.expired_at, stored.cancelling_at, stored.cancelled_at) == (None,) * 4


def test_set_status_again_is_a_no_op(session):
    job = new_job(session, status=JobStatus.VALIDATING)
    set_status(session, job.id, JobStatus.IN_PROGRESS, now=T0 + MINUTE)
    again = set_status(session, job.id, JobStatus.IN_PROGRESS, now=T0 + 5 * MINUTE)
    assert again.in_progress_at == T0 + MINUTE


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], JobStatus.COMPLETED),  # validating -> completed skips the work
        ([JobStatus.IN_PROGRESS], JobStatus.VALIDATING),
        ([JobStatus.IN_PROGRESS], JobStatus.CANCELLED),  # must pass through cancelling
        ([JobStatus.IN_PROGRESS, JobStatus.FINALIZING, JobStatus.COMPLETED], JobStatus.IN_PROGRESS),
        ([JobStatus.FAILED], JobStatus.IN_PROGRESS),
        ([JobStatus.IN_PROGRESS, JobStatus.EXPIRED], JobStatus.CANCELLING),
    ],
)
def test_illegal_transitions_raise_and_change_nothing(session, factory, path, illegal):
    job = new_job(session, status=JobStatus.VALIDATING)
    for status in path:
        set_status(session, job.id, status, now=T0)
    session.commit()
    before = path[-1] if path else JobStatus.VALIDATING
    stamps = stamps_of(reread(factory, Job, job.id))
    with pytest.raises(ValueError, match=f"cannot go from {before.value} to {illegal.value}"):
        set_status(session, job.id, illegal, now=T0 + MINUTE)
    session.rollback()
    stored = reread(factory, Job, job.id)
    assert stored.status == before and stamps_of(stored) == stamps


def test_set_status_of_an_unknown_job_raises(session):
    with pytest.raises(ValueError, match="no job 'batch_nope'"):
        set_status(session, "batch_nope", JobStatus.IN_PROGRESS)


# --- requests ----------------------------------------------------------------------------------


def test_add_requests_inserts_in_batches_and_counts(session, factory):
    job = new_job(session, status=JobStatus.VALIDATING)
    rows = (line(n, prefix=f"p{n % 2}") for n in range(1, 8))  # a generator, as from a file
    assert add_requests(session, job.id, rows, batch_size=3) == 7
    session.commit()
    assert reread(factory, Job, job.id).request_total == 7
    stored = list(iter_requests(session, job.id))
    assert [r.line for r in stored] == [1, 2, 3, 4, 5, 6, 7]
    assert [r.prefix_key for r in stored[:3]] == ["p1", "p0", "p1"]
    first = stored[0]
    assert (first.custom_id, first.status, first.attempts, first.chunk_id) == ("req-1", RequestStatus.PENDING, 0, None)
    assert first.body == {"prompt": "prompt 1", "max_tokens": 8, "temperature": 0.0}


def test_add_requests_rejects_bad_rows(session):
    job = new_job(session)
    with pytest.raises(ValueError, match=r"unknown request fields \['colour'\]"):
        add_requests(session, job.id, [line(1) | {"colour": "red"}])
    with pytest.raises(ValueError, match=r"request at line 2 lacks \['body'\]"):
        add_requests(session, job.id, [{k: v for k, v in line(2).items() if k != "body"}])


def test_duplicate_custom_id_in_a_job_is_refused(session):
    job = new_job(session, 1)
    with pytest.raises(IntegrityError):
        add_requests(session, job.id, [line(2) | {"custom_id": "req-1"}])


def test_iter_requests_filters_by_status_in_input_order(session):
    job = new_job(session, 4)
    chunk = chunk_of(session, job.id)
    rid = ids(session, job.id)
    record_results(session, chunk.id, [ok(rid["req-3"]), err(rid["req-1"])], now=T0)
    finished = iter_requests(session, job.id, statuses=[RequestStatus.COMPLETED, RequestStatus.FAILED])
    assert [(r.custom_id, r.status) for r in finished] == [
        ("req-1", RequestStatus.FAILED),
        ("req-3", RequestStatus.COMPLETED),
    ]


# --- chunks ------------------------------------------------------------------------------------


def test_assign_chunks_keeps_prefix_groups_and_session_turns_together(session):
    job = new_job(session, status=JobStatus.VALIDATING, priority=Priority.HIGH)
    add_requests(
        session,
        job.id,
        [
            line(1, prefix="P1"),
            line(2, prefix="P2"),
            line(3, prefix="P1"),
            line(4, prefix="P3", session_id="s", turn=2),
            line(5, prefix="P2"),
            line(6, prefix="P3", session_id="s", turn=1),
            line(7),
            line(8, prefix="P1"),
            line(9, prefix="P1"),
        ],
    )
    chunks = assign_chunks(session, job.id, 3, now=T0)
    # P1 (4 requests) cannot fit one chunk: it fills the first and spills one into the second,
    # where P2 (2) still fits whole; session s (2 turns, turn order) and the keyless line 7 follow.
    assert [[r.custom_id for r in chunk_requests(session, c.id)] for c in chunks] == [
        ["req-1", "req-3", "req-8"],
        ["req-2", "req-5", "req-9"],  # run order: by line within a chunk
        ["req-7", "req-6", "req-4"],  # no session first, then turn 1, turn 2
    ]
    assert [(c.seq, c.num_requests, c.status, c.priority, c.attempts) for c in chunks] == [
        (0, 3, ChunkStatus.PENDING, Priority.HIGH, 0),
        (1, 3, ChunkStatus.PENDING, Priority.HIGH, 0),
        (2, 3, ChunkStatus.PENDING, Priority.HIGH, 0),
    ]
    assert assign_chunks(session, job.id, 3, now=T0) == []  # nothing left unassigned


def test_assign_chunks_streams_more_rows_than_one_fetch(session):
    """Packing across fetch boundaries (the rows stream in `ASSIGN_FETCH_SIZE` batches while chunks
    are written): three interleaved prefix groups and keyless lines, every request in exactly one
    chunk, each group in consecutive full chunks in order of its first line."""
    n = 2 * ASSIGN_FETCH_SIZE + 7
    job = new_job(session, status=JobStatus.VALIDATING)
    add_requests(session, job.id, [line(i, prefix=None if i % 4 == 0 else f"P{i % 4}") for i in range(1, n + 1)])
    chunks = assign_chunks(session, job.id, 100, now=T0)
    runs = [[int(r.custom_id[4:]) for r in chunk_requests(session, c.id)] for c in chunks]  # by line
    members = {key: [i for i in range(1, n + 1) if i % 4 == key] for key in range(4)}
    # P1 and P2 (about 1,000 each) cannot fit a chunk's room: each starts a chunk of its own. The
    # keyless lines are groups of one, so they top up P3's last chunk and then fill their own.
    expected = [sorted(part) for members_ in (members[1], members[2], members[3] + members[0])
                for part in (members_[k : k + 100] for k in range(0, len(members_), 100))]
    assert runs == expected
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_a_session_longer_than_a_chunk_stays_whole(session):
    job = new_job(session, status=JobStatus.VALIDATING)
    add_requests(
        session,
        job.id,
        [
            line(1, prefix="A"),
            line(2, prefix="A", session_id="s", turn=3),
            line(3, prefix="C", session_id="s", turn=2),
            line(4, prefix="B", session_id="s", turn=1),
            line(5, prefix="A"),
            line(6, prefix="B"),
        ],
    )
    chunks = assign_chunks(session, job.id, 2, now=T0)
    # Session s is placed by its first turn (prefix B, with line 6), not by its first line (prefix A).
    assert [[r.custom_id for r in chunk_requests(session, c.id)] for c in chunks] == [
        ["req-1", "req-5"],
        ["req-4", "req-3", "req-2"],
        ["req-6"],
    ]
    with pytest.raises(ValueError, match="max_requests must be >= 1"):
        assign_chunks(session, job.id, 0)


def test_assign_chunks_gives_each_line_its_own_priority_and_never_mixes_them(session):
    """A line's priority (None: the job's) decides its chunk's queue: chunks hold one priority each,
    highest first, and a prefix group that spans priorities is split between them."""
    job = new_job(session, status=JobStatus.VALIDATING, priority=Priority.NORMAL)
    add_requests(
        session,
        job.id,
        [
            line(1, prefix="P"),
            line(2, prefix="P", priority=Priority.LOW),
            line(3, prefix="P", priority=Priority.CRITICAL),
            line(4, priority=Priority.NORMAL),  # the job's priority, given: shares the job's chunks
            line(5, prefix="P"),
            line(6, priority=Priority.LOW),
            line(7, priority=Priority.CRITICAL, session_id="s", turn=0),
            line(8, priority=Priority.CRITICAL, session_id="s", turn=1),
        ],
    )
    chunks = assign_chunks(session, job.id, 10, now=T0)
    assert [(c.seq, c.priority, [r.custom_id for r in chunk_requests(session, c.id)]) for c in chunks] == [
        (0, Priority.CRITICAL, ["req-3", "req-7", "req-8"]),
        (1, Priority.NORMAL, ["req-1", "req-4", "req-5"]),
        (2, Priority.LOW, ["req-2", "req-6"]),
    ]


def test_claim_chunk_leases_once_until_the_lease_expires(session, factory):
    job = new_job(session, 2)
    chunk = chunk_of(session, job.id)
    mark_chunks_queued(session, [chunk.id], now=T0)
    claimed = claim_chunk(session, chunk.id, worker="w1", lease=5 * MINUTE, now=T0 + MINUTE)
    session.commit()
    assert (claimed.status, claimed.attempts, claimed.worker) == (ChunkStatus.RUNNING, 1, "w1")
    assert claimed.lease_expires_at == T0 + 6 * MINUTE
    assert [r.attempts for r in chunk_requests(session, chunk.id)] == [1, 1]

    assert claim_chunk(session, chunk.id, worker="w2", lease=5 * MINUTE, now=T0 + 2 * MINUTE) is None  # live lease
    assert renew_lease(session, chunk.id, worker="w1", lease=5 * MINUTE, now=T0 + 3 * MINUTE) is True
    assert claim_chunk(session, chunk.id, worker="w2", lease=5 * MINUTE, now=T0 + 7 * MINUTE) is None  # renewed

    taken = claim_chunk(session, chunk.id, worker="w2", lease=5 * MINUTE, now=T0 + 8 * MINUTE)  # w1 died
    session.commit()
    assert (taken.attempts, taken.worker, taken.lease_expires_at) == (2, "w2", T0 + 13 * MINUTE)
    assert renew_lease(session, chunk.id, worker="w1", lease=5 * MINUTE, now=T0 + 9 * MINUTE) is False
    stored = reread(factory, Chunk, chunk.id)
    assert (stored.status, stored.attempts, stored.worker) == (ChunkStatus.RUNNING, 2, "w2")

    rid = ids(session, job.id)
    record_results(session, chunk.id, [ok(rid["req-1"]), ok(rid["req-2"])], now=T0 + 9 * MINUTE)
    assert claim_chunk(session, chunk.id, worker="w3", lease=5 * MINUTE, now=T0 + 20 * MINUTE) is None  # done
    with pytest.raises(ValueError, match="lease must be positive"):
        claim_chunk(session, chunk.id, worker="w3", lease=timedelta(0))


def test_lost_chunks_finds_exactly_expired_leases_and_stale_messages(session):
    job = new_job(session, 6)
    chunks = assign_chunks(session, job.id, 1, now=T0 - 30 * MINUTE)
    expired_lease, live_lease, stale_queued, recent_queued, done, stale_pending = chunks
    add_requests(session, job.id, [line(7)])
    [recent_pending] = assign_chunks(session, job.id, 1, now=T0 - MINUTE)
    mark_chunks_queued(session, [expired_lease.id, live_lease.id, stale_queued.id, done.id], now=T0 - 20 * MINUTE)
    mark_chunks_queued(session, [recent_queued.id], now=T0 - MINUTE)
    claim_chunk(session, expired_lease.id, worker="w1", lease=5 * MINUTE, now=T0 - 10 * MINUTE)
    claim_chunk(session, live_lease.id, worker="w2", lease=5 * MINUTE, now=T0 - MINUTE)
    claim_chunk(session, done.id, worker="w3", lease=5 * MINUTE, now=T0 - 10 * MINUTE)
    [done_request] = chunk_requests(session, done.id)
    record_results(session, done.id, [ok(done_request.id)], now=T0 - 9 * MINUTE)
    session.commit()

    lost = lost_chunks(session, T0, stale_after=10 * MINUTE)
    assert [c.id for c in lost] == [expired_lease.id, stale_queued.id, stale_pending.id]
    assert [c.status for c in lost] == [ChunkStatus.RUNNING, ChunkStatus.QUEUED, ChunkStatus.PENDING]
    # A lease ending exactly now counts as expired; a shorter staleness window finds the recent ones.
    assert [c.id for c in lost_chunks(session, T0 + 4 * MINUTE, stale_after=MINUTE)] == [
        expired_lease.id,
        live_lease.id,
        stale_queued.id,
        recent_queued.id,
        stale_pending.id,
        recent_pending.id,
    ]


def test_requeued_lost_chunks_are_no_longer_lost(session):
    job = new_job(session, 2)
    first, second = assign_chunks(session, job.id, 1, now=T0 - 30 * MINUTE)
    mark_chunks_queued(session, [first.id, second.id], now=T0 - 20 * MINUTE)
    claim_chunk(session, first.id, worker="w1", lease=5 * MINUTE, now=T0 - 20 * MINUTE)
    assert [c.id for c in lost_chunks(session, T0)] == [first.id, second.id]
    assert mark_chunks_queued(session, [first.id, second.id], now=T0) == 2
    assert lost_chunks(session, T0) == []
    requeued = session.get(Chunk, first.id)
    assert (requeued.status, requeued.enqueued_at, requeued.lease_expires_at, requeued.worker, requeued.attempts) == (
        ChunkStatus.QUEUED,
        T0,
        None,
        None,
        1,
    )


# --- results -----------------------------------------------------------------------------------


def test_record_results_writes_pending_rows_once(session, factory):
    job = new_job(session, 3)
    chunk = chunk_of(session, job.id)
    rid = ids(session, job.id)
    results = [ok(rid["req-1"], "one"), ok(rid["req-2"], "two", prompt=4, cached=0, completion=7), err(rid["req-3"])]

    outcome = record_results(session, chunk.id, results, now=T0 + MINUTE)
    session.commit()
    assert (outcome.completed, outcome.failed, outcome.written, outcome.chunk_done) == (2, 1, 3, True)
    assert (outcome.prompt_tokens, outcome.cached_tokens, outcome.completion_tokens) == (12, 1, 9)
    assert outcome.written_ids == (rid["req-1"], rid["req-2"], rid["req-3"])
    stored = reread(factory, Job, job.id)
    assert (stored.request_total, stored.request_completed, stored.request_failed) == (3, 2, 1)
    first, second, third = (reread(factory, Request, rid[c]) for c in ("req-1", "req-2", "req-3"))
    assert (first.status, first.text, first.finish_reason, first.completed_at) == (
        RequestStatus.COMPLETED,
        "one",
        "stop",
        T0 + MINUTE,
    )
    assert (second.prompt_tokens, second.cached_tokens, second.completion_tokens) == (4, 0, 7)
    assert (third.status, third.text, third.error_code, third.error_message) == (
        RequestStatus.FAILED,
        None,
        "engine_error",
        "prompt too long",
    )
    assert reread(factory, Chunk, chunk.id).status == ChunkStatus.DONE

    # A redelivered chunk with different output: nothing is written, nothing counted twice.
    again = record_results(
        session, chunk.id, [ok(rid["req-1"], "changed"), ok(rid["req-3"], "late")], now=T0 + 2 * MINUTE
    )
    session.commit()
    assert (again.completed, again.failed, again.prompt_tokens, again.written_ids, again.chunk_done) == (
        0,
        0,
        0,
        (),
        True,
    )
    assert reread(factory, Request, rid["req-1"]).text == "one"
    assert reread(factory, Request, rid["req-3"]).status == RequestStatus.FAILED
    stored = reread(factory, Job, job.id)
    assert (stored.request_completed, stored.request_failed) == (2, 1)
    assert session.scalar(select(func.count()).select_from(Request)) == 3


def test_concurrent_redeliveries_of_a_chunk_write_once(session, factory):
    """Two workers record the same chunk at once: the second waits for the first to commit (row
    locks on PostgreSQL, the write lock on SQLite) and then finds nothing pending."""
    job = new_job(session, 2)
    chunk = chunk_of(session, job.id)
    session.commit()
    rid = ids(session, job.id)
    outcomes = {}
    with factory() as first:
        outcomes["first"] = record_results(first, chunk.id, [ok(rid["req-1"], "a"), ok(rid["req-2"], "a")], now=T0)

        def second_worker() -> None:
            with factory() as second:
                outcomes["second"] = record_results(second, chunk.id, [ok(rid["req-1"], "b"), err(rid["req-2"])])
                second.commit()

        thread = threading.Thread(target=second_worker)
        thread.start()
        thread.join(timeout=0.5)
        assert thread.is_alive()  # waiting for the first transaction
        first.commit()
        thread.join(timeout=10)
    assert outcomes["first"].written_ids == (rid["req-1"], rid["req-2"])
    assert (outcomes["second"].written_ids, outcomes["second"].chunk_done) == ((), True)
    stored = reread(factory, Job, job.id)
    assert (stored.request_completed, stored.request_failed) == (2, 0)
    assert reread(factory, Request, rid["req-2"]).text == "a"


def test_an_open_read_transaction_blocks_no_writer(session, factory):
    """A session that has read (and idles with its transaction open, e.g. during inference) must
    not hold up result writes; on SQLite it holds no write lock."""
    job = new_job(session, 1)
    chunk = chunk_of(session, job.id)
    session.commit()
    rid = ids(session, job.id)
    with factory() as reader:
        assert chunk_requests(reader, chunk.id)[0].status == RequestStatus.PENDING  # transaction open
        with factory() as writer:
            assert record_results(writer, chunk.id, [ok(rid["req-1"])], now=T0).completed == 1
            writer.commit()
    assert reread(factory, Request, rid["req-1"]).status == RequestStatus.COMPLETED


def test_record_results_in_parts_closes_the_chunk_at_the_end(session):
    job = new_job(session, 3)
    chunk = chunk_of(session, job.id)
    rid = ids(session, job.id)
    assert record_results(session, chunk.id, [ok(rid["req-2"])], now=T0).chunk_done is False
    assert session.get(Chunk, chunk.id).status == ChunkStatus.PENDING
    last = record_results(session, chunk.id, [ok(rid["req-1"]), ok(rid["req-3"])], now=T0)
    assert (last.completed, last.chunk_done) == (2, True)
    assert (session.get(Chunk, chunk.id).status, session.get(Chunk, chunk.id).finished_at) == (ChunkStatus.DONE, T0)


def test_record_results_ignores_requests_of_other_chunks_and_rejects_duplicates(session):
    job = new_job(session, 2)
    first, second = assign_chunks(session, job.id, 1, now=T0)
    rid = ids(session, job.id)
    outcome = record_results(session, first.id, [ok(rid["req-1"]), ok(rid["req-2"])], now=T0)
    assert outcome.written_ids == (rid["req-1"],)
    assert session.get(Request, rid["req-2"]).status == RequestStatus.PENDING
    with pytest.raises(ValueError, match=rf"more than one result for request ids \[{rid['req-2']}\]"):
        record_results(session, second.id, [ok(rid["req-2"]), ok(rid["req-2"])])
    with pytest.raises(ValueError, match="no chunk 999999"):
        record_results(session, 999999, [])


def test_fail_requests_fails_only_pending_ones(session, factory):
    job = new_job(session, 3)
    chunk = chunk_of(session, job.id)
    rid = ids(session, job.id)
    record_results(session, chunk.id, [ok(rid["req-1"])], now=T0)
    failed = fail_requests(session, rid.values(), code="worker_lost", message="chunk failed 3 times", now=T0 + MINUTE)
    session.commit()
    assert failed == 2
    assert fail_requests(session, rid.values(), code="worker_lost", message="again") == 0
    stored = reread(factory, Job, job.id)
    assert (stored.request_completed, stored.request_failed) == (1, 2)
    assert reread(factory, Request, rid["req-1"]).status == RequestStatus.COMPLETED
    second = reread(factory, Request, rid["req-2"])
    assert (second.status, second.error_code, second.error_message, second.completed_at) == (
        RequestStatus.FAILED,
        "worker_lost",
        "chunk failed 3 times",
        T0 + MINUTE,
    )
    assert (second.prompt_tokens, second.completion_tokens) == (None, None)  # never reached the engine
    assert reread(factory, Chunk, chunk.id).status == ChunkStatus.DONE


def test_a_lost_chunk_given_up_twice_is_recorded_once(session, factory):
    """The beat's sweep and a redelivered task may both give up one chunk: the second finds nothing
    pending and leaves the error history and the counts as the first left them."""
    job = new_job(session, 2)
    chunk = chunk_of(session, job.id)
    claim_chunk(session, chunk.id, worker="w1", lease=5 * MINUTE, now=T0)
    assert fail_lost_chunk(session, chunk.id, tries=2, now=T0 + 10 * MINUTE) == 2
    session.commit()
    assert fail_lost_chunk(session, chunk.id, tries=2, now=T0 + 11 * MINUTE) == 0
    session.commit()
    assert [(e.kind, e.chunk_id) for e in job_errors(session, job.id)] == [("worker_lost", chunk.id)]
    stored = reread(factory, Job, job.id)
    assert (stored.request_completed, stored.request_failed) == (0, 2)
    assert reread(factory, Chunk, chunk.id).status == ChunkStatus.DONE


def test_job_counts_counts_request_rows_by_status(session):
    job = new_job(session, 5)
    chunk = chunk_of(session, job.id)
    rid = ids(session, job.id)
    record_results(session, chunk.id, [ok(rid["req-1"]), ok(rid["req-2"]), err(rid["req-3"])], now=T0)
    assert job_counts(session, job.id) == JobCounts(total=5, pending=2, completed=2, failed=1, cancelled=0, expired=0)
    cancel_job(session, job.id, now=T0)
    assert job_counts(session, job.id) == JobCounts(total=5, pending=0, completed=2, failed=1, cancelled=2, expired=0)
    assert job_counts(session, "batch_none") == JobCounts(0, 0, 0, 0, 0, 0)


# --- cancel, expire, retry ---------------------------------------------------------------------


def test_cancel_keeps_finished_results(session, factory):
    job = new_job(session, 4)
    chunk = chunk_of(session, job.id)
    rid = ids(session, job.id)
    claim_chunk(session, chunk.id, worker="w1", lease=5 * MINUTE, now=T0)
    record_results(session, chunk.id, [ok(rid["req-1"], "kept"), err(rid["req-2"])], now=T0)

    assert cancel_job(session, job.id, now=T0 + MINUTE) == 2
    session.commit()
    stored = reread(factory, Job, job.id)
    assert (stored.status, stored.cancelling_at, stored.cancelled_at) == (JobStatus.CANCELLED, T0 + MINUTE, T0 + MINUTE)
    # The cancelled lines count as failed, as OpenAI counts them: completed + failed == total.
    assert (stored.request_total, stored.request_completed, stored.request_failed) == (4, 1, 3)
    statuses = {c: reread(factory, Request, i).status for c, i in rid.items()}
    assert statuses == {
        "req-1": RequestStatus.COMPLETED,
        "req-2": RequestStatus.FAILED,
        "req-3": RequestStatus.CANCELLED,
        "req-4": RequestStatus.CANCELLED,
    }
    assert reread(factory, Request, rid["req-1"]).text == "kept"
    assert (reread(factory, Chunk, chunk.id).status, reread(factory, Chunk, chunk.id).lease_expires_at) == (
        ChunkStatus.DONE,
        None,
    )

    # The worker still running the chunk finishes: its late results are not written.
    late = record_results(session, chunk.id, [ok(rid["req-3"]), ok(rid["req-4"])], now=T0 + 2 * MINUTE)
    assert late.written_ids == ()
    assert cancel_job(session, job.id) == 0  # already cancelled


def test_cancel_of_a_finished_job_raises(session):
    job = new_job(session, status=JobStatus.VALIDATING)
    set_status(session, job.id, JobStatus.FAILED, now=T0)
    with pytest.raises(ValueError, match="cannot go from failed to cancelling"):
        cancel_job(session, job.id)


def test_expire_jobs_expires_only_due_unfinished_jobs(session, factory):
    window = timedelta(hours=1)
    due = new_job(session, 2, completion_window=window, now=T0)
    due_validating = new_job(session, 1, completion_window=window, status=JobStatus.VALIDATING, now=T0 + MINUTE)
    not_due = new_job(session, 1, completion_window=2 * window, now=T0)
    no_window = new_job(session, 1, now=T0)
    finished = new_job(session, 0, completion_window=window, now=T0)
    set_status(session, finished.id, JobStatus.FINALIZING, now=T0)
    set_status(session, finished.id, JobStatus.COMPLETED, now=T0)
    chunk = chunk_of(session, due.id)
    record_results(session, chunk.id, [ok(ids(session, due.id)["req-1"], "done in time")], now=T0)
    session.commit()

    now = T0 + window + MINUTE
    assert expire_jobs(session, now=now) == [due.id, due_validating.id]
    session.commit()
    assert expire_jobs(session, now=now) == []
    assert {j.id: reread(factory, Job, j.id).status for j in (due, due_validating, not_due, no_window, finished)} == {
        due.id: JobStatus.EXPIRED,
        due_validating.id: JobStatus.EXPIRED,
        not_due.id: JobStatus.IN_PROGRESS,
        no_window.id: JobStatus.IN_PROGRESS,
        finished.id: JobStatus.COMPLETED,
    }
    assert reread(factory, Job, due.id).expired_at == now
    # The expired line counts as failed: completed + failed == total.
    assert (reread(factory, Job, due.id).request_completed, reread(factory, Job, due.id).request_failed) == (1, 1)
    assert job_counts(session, due.id) == JobCounts(total=2, pending=0, completed=1, failed=0, cancelled=0, expired=1)
    assert reread(factory, Chunk, chunk.id).status == ChunkStatus.DONE


def test_retry_failed_resets_only_failed_requests(session, factory):
    job = new_job(session, 4)
    chunk = chunk_of(session, job.id)
    rid = ids(session, job.id)
    record_results(
        session, chunk.id, [ok(rid["req-1"], "kept"), err(rid["req-2"]), err(rid["req-3"]), ok(rid["req-4"])], now=T0
    )
    set_status(session, job.id, JobStatus.FINALIZING, now=T0)
    set_status(session, job.id, JobStatus.COMPLETED, now=T0)
    session.commit()

    assert retry_failed(session, job.id) == 2
    session.commit()
    stored = reread(factory, Job, job.id)
    assert (stored.status, stored.finalizing_at, stored.completed_at, stored.in_progress_at) == (
        JobStatus.IN_PROGRESS,
        None,
        None,
        T0,
    )
    assert (stored.request_total, stored.request_completed, stored.request_failed) == (4, 2, 0)
    retried = reread(factory, Request, rid["req-2"])
    assert (
        retried.status,
        retried.chunk_id,
        retried.error_code,
        retried.error_message,
        retried.prompt_tokens,
        retried.completed_at,
    ) == (RequestStatus.PENDING, None, None, None, None, None)
    kept = reread(factory, Request, rid["req-1"])
    assert (kept.status, kept.text, kept.chunk_id) == (RequestStatus.COMPLETED, "kept", chunk.id)

    [again] = assign_chunks(session, job.id, 10, now=T0 + MINUTE)
    assert (again.seq, [r.custom_id for r in chunk_requests(session, again.id)]) == (1, ["req-2", "req-3"])
    assert retry_failed(session, job.id) == 0  # nothing failed now


def test_retry_of_a_job_that_never_ran_raises(session):
    job = new_job(session, status=JobStatus.VALIDATING)
    with pytest.raises(ValueError, match="cannot retry a job that is validating"):
        retry_failed(session, job.id)


# --- errors, usage, sessions, tenants ----------------------------------------------------------


def test_error_history(session, factory):
    job = new_job(session, 1)
    chunk = chunk_of(session, job.id)
    event = record_error(
        session,
        "engine",
        "CUDA out of memory",
        job_id=job.id,
        chunk_id=chunk.id,
        line=1,
        custom_id="req-1",
        traceback="Traceback ...",
        now=T0 + MINUTE,
    )
    assert (
        record_errors(
            session,
            ({"job_id": job.id, "kind": "validation", "line": n, "message": f"bad line {n}"} for n in (7, 9)),
            now=T0,
            batch_size=1,
        )
        == 2
    )
    session.commit()
    assert [(e.kind, e.line, e.message) for e in job_errors(session, job.id)] == [
        ("validation", 7, "bad line 7"),
        ("validation", 9, "bad line 9"),
        ("engine", 1, "CUDA out of memory"),
    ]
    assert [e.line for e in job_errors(session, job.id, kind="validation")] == [7, 9]
    stored = reread(factory, ErrorEvent, event.id)
    assert (stored.chunk_id, stored.custom_id, stored.traceback, stored.created_at) == (
        chunk.id,
        "req-1",
        "Traceback ...",
        T0 + MINUTE,
    )
    with pytest.raises(ValueError, match="need kind and message"):
        record_errors(session, [{"kind": "validation"}])


def test_add_usage_sums_atomically(session, factory):
    job = new_job(session)
    add_usage(
        session,
        job.id,
        prompt_tokens=100,
        cached_tokens=40,
        completion_tokens=20,
        compute_seconds=1.5,
        cost=Decimal("0.1"),
        now=T0,
    )
    usage = add_usage(
        session,
        job.id,
        prompt_tokens=10,
        completion_tokens=5,
        compute_seconds=0.25,
        cost=Decimal("0.2"),
        now=T0 + MINUTE,
    )
    session.commit()
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (110, 40, 25)
    stored = reread(factory, type(usage), job.id)
    assert (stored.prompt_tokens, stored.compute_seconds, stored.cost, stored.currency, stored.updated_at) == (
        110,
        1.75,
        Decimal("0.3"),
        "USD",
        T0 + MINUTE,
    )
    with pytest.raises(ValueError, match="usage is kept in USD, cannot add EUR"):
        add_usage(session, job.id, cost=Decimal(1), currency="EUR")
    session.rollback()
    with pytest.raises(ValueError, match=r"must not be negative: \['prompt_tokens'\]"):
        add_usage(session, job.id, prompt_tokens=-1)


def test_upsert_session_appends_turns_per_tenant(session, factory):
    job = new_job(session)
    tenant = create_tenant(session, "acme")
    upsert_session(
        session,
        "s1",
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        job_id=job.id,
        now=T0,
    )
    record = upsert_session(
        session,
        "s1",
        [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}],
        job_id=job.id,
        now=T0 + MINUTE,
    )
    upsert_session(session, "s1", [{"role": "user", "content": "tenant's own"}], tenant_id=tenant.id, now=T0)
    session.commit()
    assert (record.turns, record.created_at, record.last_used_at, record.job_id) == (2, T0, T0 + MINUTE, job.id)
    assert [m["content"] for m in get_session(session, "s1").history] == ["hi", "hello", "more", "ok"]
    theirs = get_session(session, "s1", tenant_id=tenant.id)
    assert (theirs.turns, theirs.history) == (1, [{"role": "user", "content": "tenant's own"}])
    assert get_session(session, "s2") is None
    with pytest.raises(ValueError, match="session messages are"):
        upsert_session(session, "s1", [{"role": "user"}])

    assert delete_idle_sessions(session, before=T0 + MINUTE) == 1  # the tenant's, last used at T0
    session.commit()
    assert get_session(session, "s1") is not None and get_session(session, "s1", tenant_id=tenant.id) is None


def test_nul_characters_in_answers_are_stored_as_replacement_characters(session, factory):
    """PostgreSQL's text and JSONB refuse NUL, which a model can generate: results and session
    histories keep U+FFFD instead, on SQLite as well, so both databases return the same."""
    job = new_job(session, 1)
    [chunk] = assign_chunks(session, job.id, 10, now=T0)
    [request] = chunk_requests(session, chunk.id)
    record_results(session, chunk.id, [RequestResult(request.id, text="a\x00b", finish_reason="stop",
                                                     prompt_tokens=3, cached_tokens=0, completion_tokens=3)])
    upsert_session(session, "s1", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\x00"}])
    session.commit()
    with factory() as fresh:
        assert fresh.get(Request, request.id).text == "a\ufffdb"
        assert [m["content"] for m in get_session(fresh, "s1").history] == ["hi", "x\ufffd"]


def test_session_ids_without_a_tenant_are_unique(session):
    from db import SessionRecord

    upsert_session(session, "s1", [{"role": "user", "content": "a"}], now=T0)
    session.add(SessionRecord(session_id="s1", tenant_id=None, turns=0, history=[]))
    with pytest.raises(IntegrityError):
        session.flush()


def test_api_keys_are_stored_hashed_and_can_be_revoked(session, factory):
    tenant = create_tenant(session, "acme", requests_per_minute=600, tokens_per_day=10**9)
    row, key = create_api_key(session, tenant.id, name="nightly", now=T0)
    session.commit()
    assert key.startswith("pk_") and len(key) > 40
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() and key not in row.key_hash
    assert len(tenant.cache_salt) == 32 and reread(factory, type(tenant), tenant.id).tokens_per_day == 10**9
    assert tenant_for_api_key(session, key).id == tenant.id
    assert tenant_for_api_key(session, key + "x") is None
    assert revoke_api_key(session, row.id, now=T0 + MINUTE) is True
    assert revoke_api_key(session, row.id) is False
    assert tenant_for_api_key(session, key) is None
    assert [(k.id, k.revoked_at) for k in list_api_keys(session, tenant.id)] == [(row.id, T0 + MINUTE)]


def test_tenants_are_created_once_by_name_and_can_be_disabled(session, factory):
    first = ensure_tenant(session, "acme")
    assert ensure_tenant(session, "acme").id == first.id
    assert get_tenant(session, "nobody") is None
    _, key = create_api_key(session, first.id)
    beta = create_tenant(session, "beta")
    session.commit()
    assert [t.name for t in list_tenants(session)] == ["acme", "beta"]
    assert first.cache_salt != beta.cache_salt

    assert disable_tenant(session, "acme", now=T0).disabled_at == T0
    assert disable_tenant(session, "acme", now=T0 + MINUTE).disabled_at == T0  # disabled once
    session.commit()
    # The key still names its tenant: the server tells a disabled tenant (403) from a bad key (401).
    assert reread(factory, type(first), first.id).is_disabled and tenant_for_api_key(session, key).is_disabled
    assert not beta.is_disabled
    with pytest.raises(ValueError, match="no tenant 'nobody'"):
        disable_tenant(session, "nobody")


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, "é"])
def test_tenant_names_are_plain(session, name):
    with pytest.raises(ValueError, match="tenant name .* is not valid"):
        ensure_tenant(session, name)
    with pytest.raises(ValueError, match="tenant name .* is not valid"):
        create_tenant(session, name)


def test_error_and_usage_rows_carry_their_jobs_tenant(session):
    tenant = create_tenant(session, "acme")
    job = create_job(session, input_file="a.jsonl", model="tiny", tenant_id=tenant.id)
    assert record_error(session, "engine", "boom", job_id=job.id).tenant_id == tenant.id
    assert record_error(session, "backup", "no disk").tenant_id is None
    assert add_usage(session, job.id, prompt_tokens=3).tenant_id == tenant.id


# --- time --------------------------------------------------------------------------------------


def test_timestamps_come_back_utc_aware_and_naive_ones_are_refused(session, factory, db_url):
    from sqlalchemy import text
    from sqlalchemy.exc import StatementError

    tokyo = timezone(timedelta(hours=9))
    job = create_job(session, input_file="in.jsonl", model="tiny", now=T0.astimezone(tokyo))
    session.commit()
    with factory() as other:
        if db_url.startswith("postgresql"):
            other.execute(text("SET TIME ZONE 'America/New_York'"))  # the server's zone must not matter
        stored = other.get(Job, job.id)
        assert stored.created_at == T0 and stored.created_at.utcoffset() == timedelta(0)
        assert other.scalar(select(Job.id).where(Job.created_at == T0)) == job.id
    with pytest.raises(StatementError, match="naive datetime"):
        create_job(session, input_file="in.jsonl", model="tiny", now=datetime(2025, 1, 1))
