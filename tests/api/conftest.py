"""API server fixtures: a fresh PostgreSQL database, Redis under a key prefix of the test's own, a
`pipeline serve` process, and tenants with keys made by the admin CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
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


@pytest.fixture
def server_env(pg_url: str, tmp_path: Path, redis_client):
    prefix = key_prefix()
    env = pipeline_env(PIPELINE_DATABASE_URL=pg_url, PIPELINE_BROKER_URL=BROKER_URL, PIPELINE_REDIS_KEY_PREFIX=prefix,
                       PIPELINE_FILES_DIR=str(tmp_path / "files"), PIPELINE_MAX_UPLOAD_BYTES="64KiB",
                       PIPELINE_CHUNK_SIZE="4")
    cli_ok(env, tmp_path, "db", "upgrade")
    yield env
    delete_prefixed_keys(redis_client, prefix)


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path):
    log = tmp_path / "server.log"
    with api_server(server_env, tmp_path, log) as url:
        yield Server(url, server_env, tmp_path, log, tmp_path / "files")
