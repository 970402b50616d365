"""`pipeline config show | generate`: data on stdout, one-line errors on stderr with exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.settings import FIELD_NAMES, load_settings, preset_settings

from support.workdir import clean_workdir


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return clean_workdir(monkeypatch, tmp_path)


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, ["config", *args], env=env)


def test_show_json_is_the_settings_as_dict() -> None:
    result = run("show", "--json", "--preset", "memory_efficient",
                 env={"PIPELINE_DATABASE_URL": "postgresql+psycopg://u:s3cret@db/p"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert list(data) == list(FIELD_NAMES)
    assert data["preset"] == "memory_efficient"
    assert data["kv_cache_dtype"] == "int8"
    assert data["database_url"] == "postgresql+psycopg://u:***@db/p"
    assert "s3cret" not in result.output


def test_show_table_names_each_source(clean_env: Path) -> None:
    (clean_env / "pipeline.toml").write_text("chunk_size = 9\n")
    result = run("show", env={"PIPELINE_BLOCK_SIZE": "32"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert list(rows) == list(FIELD_NAMES)
    assert rows["block_size"].split(None, 1)[1] == "32  (environment variable PIPELINE_BLOCK_SIZE)"
    assert rows["chunk_size"].split(None, 1)[1] == f"9  ({clean_env / 'pipeline.toml'}: key 'chunk_size')"
    assert rows["model"].split(None, 1)[1] == '"tiny"  (default)'


def test_a_bad_setting_is_one_line_on_stderr_and_exit_1() -> None:
    result = run("show", env={"PIPELINE_MAX_NUM_SEQS": "many"})
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "error: environment variable PIPELINE_MAX_NUM_SEQS: expected an integer; got 'many'\n"


def test_an_unknown_preset_is_a_usage_error() -> None:
    result = run("show", "--preset", "turbo")
    assert result.exit_code == 2
    assert "turbo" in result.stderr


def test_generate_to_stdout_reads_back_to_the_preset(clean_env: Path) -> None:
    result = run("generate", "--preset", "bulk_processing", env={"PIPELINE_CHUNK_SIZE": "3"})
    assert result.exit_code == 0, result.output
    config = clean_env / "generated.toml"
    config.write_text(result.stdout)
    assert load_settings(env={}, config_path=config) == preset_settings("bulk_processing")  # env not read


def test_generate_to_a_file_refuses_to_overwrite_without_force(clean_env: Path) -> None:
    target = clean_env / "pipeline.toml"
    result = run("generate", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == f"settings written to {target}\n"
    assert target.read_text() == preset_settings(None).to_toml()

    result = run("generate", "--preset", "production", "-o", str(target))
    assert result.exit_code == 1
    assert result.stderr == f"error: {target} exists; pass --force to replace it\n"
    result = run("generate", "--preset", "production", "-o", str(target), "--force")
    assert result.exit_code == 0, result.output
    assert load_settings(env={}, config_path=target).preset == "production"
