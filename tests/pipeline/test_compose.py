"""docker-compose.yml and the Dockerfile agree with the code: the commands (services and health
checks) exist in the CLI, PIPELINE_* variables are settings, the queues are ours, Flower asks for a
password, the image has the pg_dump the backups call and the compiler and sources of the CPU kernels, and workers get a chunk's lease to stop.
Docker has no daemon here: the files are parsed, not run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main

from pipeline.cli import app as cli_app
from pipeline.queues import QUEUE_NAMES
from pipeline.settings import FIELD_NAMES, Settings, env_var, load_settings

yaml = pytest.importorskip("yaml", reason="PyYAML parses docker-compose.yml (it comes with transformers)")

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"redis", "postgres", "migrate", "worker", "worker-gpu", "beat", "serve", "flower", "cli"}
WORKERS = ("worker", "worker-gpu")
# The major version of postgresql-client in each Debian release a python:*-slim image may be based on.
DEBIAN_PG_CLIENT = {"bookworm": 15, "trixie": 17}
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


def argv_of(service: dict) -> list[str]:
    """What the container runs: its entrypoint (if set) followed by its command."""
    return [*service.get("entrypoint", []), *service["command"]]


def duration_s(value: str) -> float:
    """A compose duration such as 1m30s, in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", value)
    assert parts and value, value
    hours, minutes, seconds = (int(x or 0) for x in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


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
    assert re.search(r"^FROM python:3\.11-slim-\w+ AS pipeline$", dockerfile, flags=re.M)
    for name in SERVICES - {"redis", "postgres"}:
        target = services[name]["build"]["target"]
        assert re.search(rf"^FROM \S+ AS {target}$", dockerfile, flags=re.M), name


def test_redis_persists_nothing(services: dict) -> None:
    assert services["redis"]["command"] == ["redis-server", "--save", "", "--appendonly", "no"]
    assert "volumes" not in services["redis"]


def test_postgres_has_a_healthcheck_and_a_volume(services: dict) -> None:
    postgres = services["postgres"]
    assert postgres["healthcheck"]["test"][0] == "CMD-SHELL"
    # Over TCP: the init-time server listens on the Unix socket only, and must not pass for the real one.
    assert shlex.split(postgres["healthcheck"]["test"][1])[:3] == ["pg_isready", "-h", "127.0.0.1"]
    assert postgres["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert postgres["environment"]["POSTGRES_PASSWORD"] == "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"


def test_start_order(services: dict) -> None:
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    # It keeps trying while the server still refuses connections (a restart or a slow first start).
    command = services["migrate"]["command"]
    assert command[:3] == ["pipeline", "db", "upgrade"] and int(command[command.index("--wait") + 1]) >= 60
    for name in ("worker", "worker-gpu", "beat", "serve"):
        assert services[name]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"}, "redis": {"condition": "service_healthy"}}


def pipeline_commands(services: dict) -> list[tuple[str, list[str]]]:
    """(where, argv) of every `pipeline ...` the compose file runs: service commands and health checks."""
    found = []
    for name, service in services.items():
        if name not in {"redis", "postgres", "flower"}:
            found.append((name, argv_of(service)))
        test = service.get("healthcheck", {}).get("test", [])
        if test[:2] == ["CMD", "pipeline"]:
            found.append((f"{name} healthcheck", test[1:]))
        elif test[:1] == ["CMD-SHELL"] and test[1].startswith("pipeline "):
            found.append((f"{name} healthcheck", shlex.split(test[1].replace("$$", "$"))))
    return found


PIPELINE_COMMANDS = pipeline_commands(yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"])


def test_every_pipeline_command_is_checked() -> None:
    assert [where for where, _ in PIPELINE_COMMANDS] == [
        "migrate", "worker", "worker healthcheck", "worker-gpu", "worker-gpu healthcheck", "beat",
        "beat healthcheck", "serve", "cli"]


@pytest.mark.parametrize(("name", "argv"), PIPELINE_COMMANDS, ids=[where for where, _ in PIPELINE_COMMANDS])
def test_pipeline_commands_exist_or_are_planned(name: str, argv: list[str]) -> None:
    path, args = split_pipeline_argv(argv)
    if not path:  # the cli service's default: `docker compose run --rm cli` alone shows the help
        assert args == ["--help"], name
        return
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


@pytest.mark.parametrize("name", WORKERS)
def test_workers_stop_gracefully_within_a_chunk_lease_and_probe_their_own_health(services: dict, name: str) -> None:
    worker = services[name]
    # SIGTERM finishes the running chunk; the grace period lets one run for as long as its lease.
    assert duration_s(worker["stop_grace_period"]) >= Settings().visibility_timeout_s
    kind, command = worker["healthcheck"]["test"]
    words = shlex.split(command.replace("$$", "$"))  # compose's $$ is a literal $ for the shell
    assert kind == "CMD-SHELL" and words[:2] == ["pipeline", "health"]
    # Its own node: `pipeline worker` without --name is celery@<hostname>, the container's $HOSTNAME.
    assert "--name" not in worker["command"] and words[words.index("--worker") + 1] == "celery@$HOSTNAME"
    # Answers well within the check's own timeout (compose kills a check that overruns it).
    assert float(words[words.index("--timeout") + 1]) < duration_s(worker["healthcheck"]["timeout"])


def test_beat_and_flower_have_real_health_checks(services: dict) -> None:
    assert services["beat"]["healthcheck"]["test"] == ["CMD", "pipeline", "health", "--beat"]
    flower = services["flower"]
    kind, python, flag, code = flower["healthcheck"]["test"]
    assert (kind, python, flag) == ("CMD", "python", "-c")
    port = next(word.split("=", 1)[1] for word in flower["command"] if word.startswith("--port="))
    assert f"'http://127.0.0.1:{port}/healthcheck'" in code and "b'OK'" in code  # Flower's unauthenticated check
    for name in ("beat", "flower", "serve", *WORKERS):
        assert set(services[name]["healthcheck"]) >= {"test", "interval", "timeout", "retries"}, name


def test_the_batch_api_server_is_reachable_and_keeps_its_files_in_the_volume(services: dict) -> None:
    serve = services["serve"]
    command = serve["command"]
    port = int(command[command.index("--port") + 1])
    kind, python, flag, code = serve["healthcheck"]["test"]
    assert (kind, python, flag) == ("CMD", "python", "-c")
    assert command[command.index("--host") + 1] == "0.0.0.0"  # inside its container; published below
    assert serve["ports"] == [f"127.0.0.1:{port}:{port}"]  # local only, as Flower: TLS goes in front
    assert f"'http://127.0.0.1:{port}/healthz'" in code  # run against a real server in tests/api/test_server.py
    assert serve["environment"]["PIPELINE_FILES_DIR"].startswith("/data/")
    assert "pipeline-data:/data" in serve["volumes"]  # uploads and outputs outlive the container


def test_the_image_has_the_pg_dump_that_backups_call(services: dict) -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert 'shutil.which("pg_dump")' in (REPO_ROOT / "db" / "backup.py").read_text()
    assert re.search(r"apt-get install [^\n]*\bpostgresql-client\b", dockerfile)
    release = re.search(r"^FROM python:[\d.]+-slim-(\w+) AS pipeline$", dockerfile, flags=re.M)[1]
    server_major = int(services["postgres"]["image"].split(":")[1].split(".")[0])
    assert DEBIAN_PG_CLIENT[release] >= server_major  # pg_dump refuses a server newer than itself


def test_the_image_can_build_the_cpu_kernels() -> None:
    """`pip install .` ships the kernels' C++ sources and the image has the compiler that builds them."""
    import tomllib

    from workers import native_kernels

    assert re.search(r"apt-get install [^\n]*\bg\+\+", (REPO_ROOT / "Dockerfile").read_text())
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["workers"]
    package = REPO_ROOT / "workers"
    shipped = {path for pattern in globs for path in package.glob(pattern)}
    assert set(native_kernels.SOURCES + native_kernels.HEADERS) <= shipped
    assert set(package.rglob("*.cpp")) == set(native_kernels.SOURCES)  # no source the build forgets
    assert set(package.rglob("*.h")) == set(native_kernels.HEADERS)  # none its cache key forgets


def test_the_host_reaches_the_stack_through_the_cli_service(services: dict) -> None:
    cli = services["cli"]
    assert cli["entrypoint"] == ["pipeline"] and cli["profiles"] == ["cli"]  # run on demand, not by `up`
    assert cli["working_dir"] == "/work" and "${WORK_DIR:-.}:/work" in cli["volumes"]
    assert cli["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                 "redis": {"condition": "service_healthy"}}
    assert "ports" not in services["postgres"] and "ports" not in services["redis"]
    readme = (REPO_ROOT / "README.md").read_text()
    stack = readme[readme.index("## Running the stack"):]
    stack = stack[:stack.index("\n## ", 1)]
    assert "docker compose run --rm" in stack and "cli submit prompts.jsonl" in stack


def test_flower_uses_the_app_and_requires_basic_auth(services: dict) -> None:
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "pipeline.celery_app", "flower"]
    assert (REPO_ROOT / "pipeline" / "celery_app.py").is_file()
    # Flower reads every option from FLOWER_<OPTION>; ${VAR:?} makes compose refuse to start without them.
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == (
        "${FLOWER_USER:?set FLOWER_USER}:${FLOWER_PASSWORD:?set FLOWER_PASSWORD}")
    assert not any("basic" in word for word in flower["command"])  # no password on the command line
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
