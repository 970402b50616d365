"""Requests the server must refuse, each checked for its refusal (status and OpenAI's error shape)
AND for changing nothing: the database rows and the files on disk are the same before and after.

Another tenant's ids must be answered exactly as ids that do not exist, so no answer tells a
tenant whether someone else's file or batch is there.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select, text

from db.files import StoredFile
from db.models import Job, Request
from db.repository.tenants import create_api_key, create_tenant
from db.session import make_engine, session_factory
from db.tenants import ApiKey, Tenant

from support.http import assert_error, call, multipart
from support.processes import cli_ok

LINE = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": "The secret plan", "max_tokens": 4, "temperature": 0}}


class World:
    """Two tenants of this test's own with a file and a batch each (the server and its database
    serve the whole module); `snapshot()` is everything a refusal must not change."""

    def __init__(self, server, tmp_path: Path) -> None:
        self.server = server
        suffix = next(_worlds)
        self.alice, self.bob = f"alice-{suffix}", f"bob-{suffix}"
        self.factory = session_factory(make_engine(server.env["PIPELINE_DATABASE_URL"]))
        # Made in the database directly (the admin CLI has its own tests): two CLI runs per tenant
        # cost more than the rest of a test.
        with self.factory.begin() as session:
            self.alice_key, self.bob_key = (create_api_key(session, create_tenant(session, name).id)[1]
                                            for name in (self.alice, self.bob))
        path = tmp_path / "in.jsonl"
        path.write_text(json.dumps(LINE) + "\n")
        alice = server.client(self.alice_key)
        self.alice_file = alice.files.create(file=path.open("rb"), purpose="batch").id
        self.alice_batch = alice.batches.create(input_file_id=self.alice_file, endpoint="/v1/completions",
                                                completion_window="24h").id

    def snapshot(self) -> dict:
        with self.factory() as session:
            counts = {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                      for model in (Job, Request, StoredFile, Tenant, ApiKey)}
            states = session.execute(text("SELECT id, status, request_failed FROM jobs ORDER BY id")).all()
            keys = session.execute(text("SELECT id, revoked_at FROM api_keys ORDER BY id")).all()
            tenants = session.execute(text("SELECT name, disabled_at FROM tenants ORDER BY name")).all()
        on_disk = sorted((str(p.relative_to(self.server.files_dir)), p.stat().st_size)
                         for p in self.server.files_dir.rglob("*") if p.is_file())
        return {"counts": counts, "jobs": states, "keys": keys, "tenants": tenants, "disk": on_disk}


_worlds = itertools.count(1)


@pytest.fixture
def server(module_server):
    return module_server


@pytest.fixture
def world(server, tmp_path: Path) -> World:
    return World(server, tmp_path)


def test_keys_are_required_checked_and_revocable(world: World, server) -> None:
    before = world.snapshot()
    files = f"{server.url}/v1/files"
    assert_error(call(files), 401, "missing_api_key")
    assert_error(call(files, headers={"Authorization": "Basic YWxpY2U6cHc="}), 401, "missing_api_key")
    assert_error(call(files, key="pk_wrong"), 401, "invalid_api_key")
    assert_error(call(files, key=world.alice_key + "x"), 401, "invalid_api_key")
    assert_error(call(files, key="x" * 10_000), 401, "invalid_api_key")
    body, content_type = multipart({"purpose": "batch"}, "in.jsonl", json.dumps(LINE).encode() + b"\n")
    assert_error(call(files, "POST", key="pk_wrong", body=body, content_type=content_type), 401)
    # The SDK raises its own class for it.
    with pytest.raises(openai.AuthenticationError):
        server.client("pk_wrong").batches.list()
    assert world.snapshot() == before
    assert world.alice_key not in server.log.read_text()  # a key never reaches the server's log

    key_id = json.loads(cli_ok(server.env, server.cwd, "key", "list", "--tenant", world.bob, "--json").stdout)[0]["id"]
    cli_ok(server.env, server.cwd, "key", "revoke", key_id)
    before = world.snapshot()
    assert_error(call(files, key=world.bob_key), 401, "invalid_api_key")
    assert_error(call(f"{server.url}/v1/batches", "POST", key=world.bob_key, content_type="application/json",
                      body=json.dumps({"input_file_id": world.alice_file, "endpoint": "/v1/completions",
                                       "completion_window": "24h"}).encode()), 401)
    assert world.snapshot() == before


def test_a_disabled_tenant_is_forbidden(world: World, server) -> None:
    cli_ok(server.env, server.cwd, "tenant", "disable", world.alice)
    before = world.snapshot()
    assert_error(call(f"{server.url}/v1/files", key=world.alice_key), 403, "tenant_disabled")
    assert_error(call(f"{server.url}/v1/batches/{world.alice_batch}/cancel", "POST", key=world.alice_key), 403)
    with pytest.raises(openai.PermissionDeniedError):
        server.client(world.alice_key).batches.retrieve(world.alice_batch)
    assert world.snapshot() == before
    # Enabled again, its keys work again, and everything it had is there.
    cli_ok(server.env, server.cwd, "tenant", "enable", world.alice)
    assert server.client(world.alice_key).batches.retrieve(world.alice_batch).id == world.alice_batch


def test_another_tenants_ids_are_answered_as_unknown_ids(world: World, server) -> None:
    before = world.snapshot()
    unknown_file, unknown_batch = "file-" + "0" * 32, "batch_" + "0" * 32
    pairs = [
        ("GET", "/v1/files/{}", world.alice_file, unknown_file),
        ("GET", "/v1/files/{}/content", world.alice_file, unknown_file),
        ("DELETE", "/v1/files/{}", world.alice_file, unknown_file),
        ("GET", "/v1/batches/{}", world.alice_batch, unknown_batch),
        ("POST", "/v1/batches/{}/cancel", world.alice_batch, unknown_batch),
        ("GET", "/v1/batches?after={}", world.alice_batch, unknown_batch),
        ("GET", "/v1/files?after={}", world.alice_file, unknown_file),
    ]
    for method, path, theirs, unknown in pairs:
        stolen = call(server.url + path.format(theirs), method, key=world.bob_key)
        missing = call(server.url + path.format(unknown), method, key=world.bob_key)
        assert_error(stolen, 404, "not_found")
        # Word for word the same, but for the id itself.
        assert stolen.body["error"]["message"].replace(theirs, "ID") == missing.body["error"]["message"].replace(
            unknown, "ID"), (method, path)
    create = call(f"{server.url}/v1/batches", "POST", key=world.bob_key, content_type="application/json",
                  body=json.dumps({"input_file_id": world.alice_file, "endpoint": "/v1/completions",
                                   "completion_window": "24h"}).encode())
    assert_error(create, 404, "not_found")
    bob = server.client(world.bob_key)
    assert bob.files.list().data == [] and bob.batches.list().data == []
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(world.alice_file)
    assert world.snapshot() == before


@pytest.mark.parametrize("path", [
    "/v1/files/..%2F..%2Fetc%2Fpasswd", "/v1/files/../../etc/passwd", "/v1/files/file-%2e%2e",
    "/v1/files/%00", "/v1/batches/..%2Fbatch_", "/v1/batches/batch_%2F..%2F..%2Fcancel",
    "/v1/files/{file}%2F..%2F..%2Ftenants",
])
def test_ids_with_path_characters_are_unknown(world: World, server, path: str) -> None:
    before = world.snapshot()
    reply = call(server.url + path.format(file=world.alice_file), key=world.alice_key)
    assert_error(reply, 404)
    assert world.snapshot() == before


@pytest.mark.parametrize("case", ["no boundary", "not multipart", "truncated", "no file part", "two files",
                                  "wrong purpose", "garbage", "unknown type", "not jsonl"])
def test_malformed_uploads_are_refused(world: World, server, case: str) -> None:
    good, content_type = multipart({"purpose": "batch"}, "in.jsonl", json.dumps(LINE).encode() + b"\n")
    body = {
        "no boundary": (good, "multipart/form-data"),
        "not multipart": (json.dumps(LINE).encode(), "application/json"),
        "truncated": (good[: len(good) // 2], content_type),
        "no file part": (b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--XyZ--\r\n',
                         content_type),
        "two files": (multipart({"purpose": "batch"}, "a.jsonl", b"{}\n")[0].replace(b"--XyZ--\r\n", b"")
                      + multipart({}, "b.jsonl", b"{}\n")[0], content_type),
        "wrong purpose": (multipart({"purpose": "fine-tune"}, "in.jsonl", b"{}\n")[0], content_type),
        "garbage": (b"\x00\xff" * 100, content_type),
        "unknown type": (multipart({"purpose": "batch"}, "in.exe", b"MZ")[0], content_type),
        "not jsonl": (multipart({"purpose": "batch"}, "in.jsonl", b'[{"text": "a"}]\n')[0], content_type),
    }[case]
    before = world.snapshot()
    reply = call(f"{server.url}/v1/files", "POST", key=world.alice_key, body=body[0], content_type=body[1])
    assert_error(reply, 400)
    assert str(server.files_dir) not in reply.body["error"]["message"]  # no server path in any answer
    assert world.snapshot() == before


def test_an_oversized_upload_is_refused_with_413(world: World, server) -> None:
    """The test server takes 64 KiB; the refusal comes while reading, and nothing is kept."""
    line = (json.dumps(LINE) + "\n").encode()
    big = line * (70 * 1024 // len(line) + 1)
    body, content_type = multipart({"purpose": "batch"}, "big.jsonl", big)
    before = world.snapshot()
    assert_error(call(f"{server.url}/v1/files", "POST", key=world.alice_key, body=body, content_type=content_type),
                 413, "file_too_large")
    with pytest.raises(openai.APIStatusError) as refused:
        server.client(world.alice_key).files.create(file=("big.jsonl", big), purpose="batch")
    assert refused.value.status_code == 413
    assert world.snapshot() == before
