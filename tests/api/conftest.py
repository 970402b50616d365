"""API server fixtures: a fresh PostgreSQL database, Redis under a key prefix of the test's own, a
`pipeline serve` process, and tenants with keys made by the admin CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from openai import OpenAI

from jobs.worker_process import delete_prefixed_keys

from support.processes import BROKER_URL, api_server, cli_ok, key_prefix, pipeline_env


@dataclass(frozen=True)
class Server:
    url: str
    env: dict[str, str]
    cwd: Path
    log: Path
    files_dir: Path

    def tenant(self, name: str) -> str:
        """Create tenant `name` (quota options after it) and return a new key of it."""
        cli_ok(self.env, self.cwd, "tenant", "create", name)
        return self.key(name)

    def key(self, tenant: str) -> str:
        return json.loads(cli_ok(self.env, self.cwd, "key", "create", "--tenant", tenant, "--json").stdout)["key"]

    def client(self, key: str) -> OpenAI:
        # No retries: a refusal must come back as it is, once (the SDK retries 429 and 5xx).
        return OpenAI(api_key=key, base_url=f"{self.url}/v1", max_retries=0, timeout=60)


@contextmanager
def serving(pg_url: str, cwd: Path) -> Iterator[Server]:
    """A migrated database at `pg_url`, Redis keys under a prefix of its own (deleted after) and a
    `pipeline serve` process over them, working in `cwd`."""
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                       PIPELINE_FILES_DIR=str(cwd / "files"), PIPELINE_MAX_UPLOAD_BYTES="64KiB",
                       PIPELINE_CHUNK_SIZE="4")
    cli_ok(env, cwd, "db", "upgrade")
    client = redis.Redis.from_url(BROKER_URL)
    try:
        with api_server(env, cwd, cwd / "server.log") as url:
            yield Server(url, env, cwd, cwd / "server.log", cwd / "files")
    finally:
        delete_prefixed_keys(client, prefix)
        client.close()


@pytest.fixture
def server(pg_url: str, tmp_path: Path, redis_client):
    with serving(pg_url, tmp_path) as started:
        yield started


@pytest.fixture(scope="module")
def module_server(pg_url_module: str, tmp_path_factory):
    """One server for a module's tests, for tests that make their own tenants (unique names) and
    check only what they themselves change: starting a server and a database per test cost ~5 s."""
    with serving(pg_url_module, tmp_path_factory.mktemp("api")) as started:
        yield started
