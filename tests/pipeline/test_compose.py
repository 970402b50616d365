"""docker-compose.yml agrees with the code: its commands exist in the CLI (or are planned), its
PIPELINE_* variables are settings, its queues are ours, and Flower asks for a password."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from pipeline.cli import app as cli_app
from pipeline.queues import QUEUE_NAMES
from pipeline.settings import FIELD_NAMES, env_var, load_settings

yaml = pytest.importorskip("yaml", reason="PyYAML parses docker-compose.yml (it comes with transformers)")

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"redis", "postgres", "migrate", "worker", "worker-gpu", "beat", "flower"}
# Commands the compose file runs that the CLI does not have yet: the lead developer adds them.
# Remove an entry when its command lands; it is then checked against the real CLI instead.
PLANNED_COMMANDS: dict[tuple[str, ...], set[str]] = {}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict:
    return compose["services"]


def interpolate(value: str) -> str:
    """What compose makes of ${VAR:?message} (a dummy: the variable is required) and ${VAR:-default}."""
    value = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"dummy-{m[1].lower()}", value)
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def split_pipeline_argv(argv: list[str]) -> tuple[tuple[str, ...], list[str]]:
    """(subcommand path, the arguments after it) of a `pipeline ...` argv."""
    assert argv[0] == "pipeline"
    words = argv[1:]
    first_option = next((i for i, word in enumerate(words) if word.startswith("-")), len(words))
    return tuple(words[:first_option]), words[first_option:]


def cli_command(path: tuple[str, ...]):
    """`pipeline <path>` in the real CLI (a click command), or None if it has no such command."""
    command = typer.main.get_command(cli_app)
    for word in path:
        if word not in getattr(command, "commands", {}):
            return None
        command = command.commands[word]
    return command


def test_services(services: dict) -> None:
    assert set(services) == SERVICES
    assert services["redis"]["image"] == "redis:7"
    assert services["postgres"]["image"] == "postgres:16"
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim AS pipeline$", dockerfile, flags=re.M)
    for name in SERVICES - {"redis", "postgres"}:
        target = services[name]["build"]["target"]
        assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, flags=re.M), name


def test_redis_persists_nothing(services: dict) -> None:
    assert services["redis"]["command"] == ["redis-server", "--save", "", "--appendonly", "no"]
    assert "volumes" not in services["redis"]


def test_postgres_has_a_healthcheck_and_a_volume(services: dict) -> None:
    postgres = services["postgres"]
    assert postgres["healthcheck"]["test"][0] == "CMD-SHELL"
    assert "pg_isready" in postgres["healthcheck"]["test"][1]
    assert postgres["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"


def test_start_order(services: dict) -> None:
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name in ("worker", "worker-gpu", "beat"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"}, "redis": {"condition": "service_healthy"}}


@pytest.mark.parametrize("name", sorted(SERVICES - {"redis", "postgres", "flower"}))
def test_pipeline_commands_exist_or_are_planned(services: dict, name: str) -> None:
    path, args = split_pipeline_argv(services[name]["command"])
    command = cli_command(path)
    if path in PLANNED_COMMANDS:
        assert command is None, f"`pipeline {' '.join(path)}` exists now: remove it from PLANNED_COMMANDS"
        options = {word.split("=", 1)[0] for word in args if word.startswith("-")}
        assert options <= PLANNED_COMMANDS[path], f"{name}: unplanned options {options - PLANNED_COMMANDS[path]}"
    else:
        assert command is not None, f"{name}: the CLI has no command `pipeline {' '.join(path)}`"
        command.make_context(" ".join(("pipeline", *path)), list(args))  # raises on an unknown option or value


@pytest.mark.parametrize("name", ["worker", "worker-gpu"])
def test_workers_consume_our_queues_in_priority_order(services: dict, name: str) -> None:
    command = services[name]["command"]
    assert command[command.index("--queues") + 1].split(",") == list(QUEUE_NAMES)
    assert command[command.index("--concurrency") + 1] == "1"


def test_gpu_worker_reserves_a_gpu_under_a_profile(services: dict) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["PIPELINE_DEVICE"] == "cuda"


@pytest.mark.parametrize("name", sorted(SERVICES - {"redis", "postgres"}))
def test_environment_variables_are_settings_with_valid_values(services: dict, name: str,
                                                              tmp_path: Path, monkeypatch) -> None:
    environment = services[name]["environment"]
    pipeline_vars = {key: interpolate(value) for key, value in environment.items() if key.startswith("PIPELINE_")}
    assert {"PIPELINE_DATABASE_URL", "PIPELINE_BROKER_URL", "PIPELINE_MODEL"} <= set(pipeline_vars)
    assert set(pipeline_vars) <= {env_var(field) for field in FIELD_NAMES}
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env=pipeline_vars)
    assert settings.database_url == "postgresql+psycopg://pipeline:dummy-postgres_password@postgres:5432/pipeline"
    assert settings.broker_url == "redis://redis:6379/0"


def test_flower_uses_the_app_and_requires_basic_auth(services: dict) -> None:
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "pipeline.celery_app", "flower"]
    assert (REPO_ROOT / "pipeline" / "celery_app.py").is_file()
    # Flower reads every option from FLOWER_<OPTION>; ${VAR:?} makes compose refuse to start without them.
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == (
        "${FLOWER_USER:?set FLOWER_USER}:${FLOWER_PASSWORD:?set FLOWER_PASSWORD}")
    assert not any("basic" in word for word in flower["command"])  # no password on the command line
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
