"""`pipeline tenant` and `pipeline key` as an administrator runs them, on a SQLite database of the
test's own: a key is printed once on stdout, stored only as its SHA-256, never shown again (not by
`key list`, not on stderr); a revoked key and a disabled tenant stop resolving as they should."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.repository import tenant_for_api_key
from db.session import make_engine, session_factory
from db.tenants import ApiKey

from support.processes import assert_one_error_line, cli, cli_ok, pipeline_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'admin.sqlite3'}"
    env = pipeline_env(PIPELINE_DATABASE_URL=url)
    cli_ok(env, tmp_path, "db", "upgrade")
    return env


def _factory(env: dict[str, str]):
    return session_factory(make_engine(env["PIPELINE_DATABASE_URL"]))


def test_tenants_are_created_listed_and_disabled(env, tmp_path: Path) -> None:
    assert cli_ok(env, tmp_path, "tenant", "create", "acme", "--requests-per-minute", "60",
                  "--max-active-batches", "2").stdout == "acme\n"
    cli_ok(env, tmp_path, "tenant", "create", "beta")
    assert_one_error_line(cli(env, tmp_path, "tenant", "create", "acme"), mentions="tenant 'acme' exists already")
    assert_one_error_line(cli(env, tmp_path, "tenant", "create", "a/b"), mentions="tenant name 'a/b' is not valid")

    rows = json.loads(cli_ok(env, tmp_path, "tenant", "list", "--json").stdout)
    assert [(r["name"], r["requests_per_minute"], r["max_active_batches"], r["tokens_per_day"], r["disabled_at"])
            for r in rows] == [("acme", 60, 2, None, None), ("beta", None, None, None, None)]
    assert cli_ok(env, tmp_path, "tenant", "list").stdout.splitlines()[0] == (
        "acme  active  requests_per_minute 60, max_active_batches 2, tokens_per_day unlimited")

    cli_ok(env, tmp_path, "tenant", "disable", "beta")
    rows = json.loads(cli_ok(env, tmp_path, "tenant", "list", "--json").stdout)
    assert [r["disabled_at"] is not None for r in rows] == [False, True]
    assert_one_error_line(cli(env, tmp_path, "tenant", "disable", "nobody"), mentions="no tenant 'nobody'")
    cli_ok(env, tmp_path, "tenant", "enable", "beta")
    assert json.loads(cli_ok(env, tmp_path, "tenant", "list", "--json").stdout)[1]["disabled_at"] is None
    assert_one_error_line(cli(env, tmp_path, "tenant", "enable", "nobody"), mentions="no tenant 'nobody'")


def test_quotas_change_only_where_given(env, tmp_path: Path) -> None:
    cli_ok(env, tmp_path, "tenant", "create", "acme", "--requests-per-minute", "60", "--tokens-per-day", "1000")
    changed = cli_ok(env, tmp_path, "tenant", "quota", "acme", "--requests-per-minute", "unlimited",
                     "--max-active-batches", "3")
    assert changed.stdout == "acme  active  requests_per_minute unlimited, max_active_batches 3, tokens_per_day 1000\n"
    row = json.loads(cli_ok(env, tmp_path, "tenant", "quota", "acme", "--tokens-per-day", "5", "--json").stdout)
    assert (row["requests_per_minute"], row["max_active_batches"], row["tokens_per_day"]) == (None, 3, 5)

    before = cli_ok(env, tmp_path, "tenant", "list", "--json").stdout
    refusals = {
        ("--tokens-per-day", "0"): "--tokens-per-day 0: expected a whole number of at least 1, or 'unlimited'",
        ("--max-active-batches", "many"): "--max-active-batches 'many': expected a whole number",
        (): "nothing to change: give --requests-per-minute",
    }
    for args, message in refusals.items():
        assert_one_error_line(cli(env, tmp_path, "tenant", "quota", "acme", *args), mentions=message)
    assert_one_error_line(cli(env, tmp_path, "tenant", "quota", "nobody", "--tokens-per-day", "5"),
                          mentions="no tenant 'nobody'")
    assert cli_ok(env, tmp_path, "tenant", "list", "--json").stdout == before  # each refusal changed nothing


def test_a_key_is_shown_once_and_stored_hashed(env, tmp_path: Path) -> None:
    cli_ok(env, tmp_path, "tenant", "create", "acme")
    created = cli_ok(env, tmp_path, "key", "create", "--tenant", "acme", "--name", "nightly")
    secret = created.stdout.strip()
    assert secret.startswith("pk_") and secret not in created.stderr
    as_json = json.loads(cli_ok(env, tmp_path, "key", "create", "--tenant", "acme", "--json").stdout)
    assert set(as_json) == {"id", "key", "tenant"} and as_json["tenant"] == "acme"

    with _factory(env)() as session:
        stored = {k.id: k for k in session.scalars(select(ApiKey))}
        assert {k.key_hash for k in stored.values()} == {
            hashlib.sha256(s.encode()).hexdigest() for s in (secret, as_json["key"])}
        assert tenant_for_api_key(session, secret).name == "acme"
    # The database file holds no key in clear.
    database = Path(env["PIPELINE_DATABASE_URL"].removeprefix("sqlite:///")).read_bytes()
    assert secret.encode() not in database and as_json["key"].encode() not in database

    listed = cli_ok(env, tmp_path, "key", "list", "--tenant", "acme", "--json")
    assert secret not in listed.stdout and as_json["key"] not in listed.stdout
    rows = json.loads(listed.stdout)
    assert {r["id"] for r in rows} == set(stored) and [r["name"] for r in rows].count("nightly") == 1

    revoked = cli_ok(env, tmp_path, "key", "revoke", as_json["id"])
    assert as_json["key"] not in revoked.stdout + revoked.stderr
    with _factory(env)() as session:
        assert tenant_for_api_key(session, as_json["key"]) is None
        assert tenant_for_api_key(session, secret).name == "acme"
    assert_one_error_line(cli(env, tmp_path, "key", "revoke", as_json["id"]), mentions=f"no active key '{as_json['id']}'")
    states = {r["id"]: r["revoked_at"] is not None
              for r in json.loads(cli_ok(env, tmp_path, "key", "list", "--tenant", "acme", "--json").stdout)}
    assert states == {as_json["id"]: True, next(i for i in stored if i != as_json["id"]): False}


def test_keys_need_an_existing_active_tenant(env, tmp_path: Path) -> None:
    assert_one_error_line(cli(env, tmp_path, "key", "create", "--tenant", "nobody"), mentions="no tenant 'nobody'")
    cli_ok(env, tmp_path, "tenant", "create", "gone")
    cli_ok(env, tmp_path, "tenant", "disable", "gone")
    refused = cli(env, tmp_path, "key", "create", "--tenant", "gone")
    assert_one_error_line(refused, mentions="tenant 'gone' is disabled")
    assert refused.stdout == ""
    with _factory(env)() as session:
        assert session.scalars(select(ApiKey)).all() == []

