"""`pipeline db upgrade --wait` (docker compose's `migrate`) started before PostgreSQL accepts
connections keeps trying, then migrates once the server is up; a private server, started late."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from fault_services import PrivatePostgres
from support.processes import PIPELINE, background, log_count, pipeline_env, wait_until

WAITING = "waiting for the database at"


@pytest.mark.postgres
def test_db_upgrade_waits_for_a_server_that_is_still_starting(tmp_path: Path) -> None:
    pg = PrivatePostgres()  # initialised, not started: connections are refused
    log = tmp_path / "migrate.log"
    try:
        with background([*PIPELINE, "db", "upgrade", "--wait", "300"], pipeline_env(PIPELINE_DATABASE_URL=pg.url),
                        tmp_path, log) as process:
            wait_until(lambda: log_count(log, WAITING) >= 1, "db upgrade waiting for the server", log,
                       process=process)
            pg.start()
            wait_until(lambda: process.poll() is not None, "db upgrade ending", log)
        assert process.returncode == 0, log.read_text()
        text = log.read_text()
        assert "is at revision" in text and "Traceback" not in text
        assert "postgres@127.0.0.1" in text.split(WAITING, 1)[1]  # the URL it waits for, as shown
        engine = create_engine(pg.url)
        try:
            assert "jobs" in inspect(engine).get_table_names()
        finally:
            engine.dispose()
    finally:
        pg.close()
