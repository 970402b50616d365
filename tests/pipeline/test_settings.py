"""Settings: defaults, precedence (defaults < preset < pipeline.toml < environment), presets, error
messages that name their source, masking, and the TOML round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.presets import PRESETS
from pipeline.settings import (
    ATTENTION_BACKENDS, DTYPES, EVICTION_POLICIES, FIELD_NAMES, KV_CACHE_DTYPES, NightlyRun, Settings, load_settings,
    load_settings_with_sources, mask_url, preset_settings,
)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative defaults land here, and no stray ./pipeline.toml is read
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def error(**kwargs) -> str:
    with pytest.raises(ValueError) as e:
        load_settings(**kwargs)
    return str(e.value)


# -- defaults and precedence ---------------------------------------------------------------------


def test_defaults(in_tmp: Path) -> None:
    s = load_settings(env={})
    assert s.database_url == f"sqlite:///{in_tmp}/pipeline.sqlite3"  # absolute: four slashes
    assert s.database_url.startswith("sqlite:////")
    assert (s.broker_url, s.redis_key_prefix, s.model, s.device, s.dtype) == (
        "redis://127.0.0.1:6379/0", "pipeline:", "tiny", "cpu", "auto")
    assert (s.block_size, s.kv_cache_memory_bytes, s.kv_cache_dtype, s.eviction_policy) == (16, None, "auto", "lru")
    assert (s.max_num_seqs, s.max_num_batched_tokens, s.chunk_size) == (256, 2048, 64)
    assert (s.visibility_timeout_s, s.task_max_redeliveries, s.completion_window) == (600, 3, "24h")
    assert s.completion_window_s == 86400
    assert (s.results_dir, s.backups_dir, s.cache_dir) == (in_tmp / "results", in_tmp / "backups", in_tmp / "kv_cache")
    assert (s.nightly_runs, s.preset, s.timezone) == ((), None, "UTC")
    assert s == Settings()


def test_environment_beats_file_beats_preset_beats_default(in_tmp: Path) -> None:
    config = write(in_tmp / "custom.toml", "chunk_size = 100\nmax_num_seqs = 50\n")
    s, sources = load_settings_with_sources(
        env={"PIPELINE_CONFIG": str(config), "PIPELINE_MAX_NUM_SEQS": "7"}, preset="memory_efficient")
    assert (s.kv_cache_dtype, s.chunk_size, s.max_num_seqs, s.block_size) == ("int8", 100, 7, 16)
    assert sources["kv_cache_dtype"] == "preset 'memory_efficient'"
    assert sources["chunk_size"] == f"{config}: key 'chunk_size'"
    assert sources["max_num_seqs"] == "environment variable PIPELINE_MAX_NUM_SEQS"
    assert sources["block_size"] == "default"
    assert sources["preset"] == "argument --preset"


def test_preset_argument_beats_environment_beats_file(in_tmp: Path) -> None:
    write(in_tmp / "pipeline.toml", 'preset = "production"\n')
    assert load_settings(env={}).preset == "production"
    assert load_settings(env={"PIPELINE_PRESET": "development"}).preset == "development"
    assert load_settings(env={"PIPELINE_PRESET": "development"}, preset="bulk_processing").preset == "bulk_processing"
    assert load_settings(env={"PIPELINE_PRESET": "development"}).chunk_size == PRESETS["development"].overrides[
        "chunk_size"]


def test_reads_pipeline_toml_in_the_working_folder_only_when_present(in_tmp: Path) -> None:
    assert load_settings(env={}).chunk_size == 64
    write(in_tmp / "pipeline.toml", "chunk_size = 5\n")
    assert load_settings(env={}).chunk_size == 5
    other = write(in_tmp / "other.toml", "chunk_size = 6\n")
    assert load_settings(env={"PIPELINE_CONFIG": str(other)}).chunk_size == 6
    assert load_settings(env={"PIPELINE_CONFIG": str(other)}, config_path=in_tmp / "pipeline.toml").chunk_size == 5


def test_a_missing_config_file_is_an_error_naming_who_asked_for_it(in_tmp: Path) -> None:
    missing = in_tmp / "nope.toml"
    assert error(env={"PIPELINE_CONFIG": str(missing)}) == (
        f"environment variable PIPELINE_CONFIG: {missing} does not exist or is not a file")
    assert error(env={}, config_path=missing) == f"config file: {missing} does not exist or is not a file"


def test_environment_values_of_every_type(in_tmp: Path) -> None:
    s = load_settings(env={
        "PIPELINE_KV_CACHE_MEMORY_BYTES": "4GiB", "PIPELINE_ENABLE_PREFIX_CACHING": "off",
        "PIPELINE_PRICE_PER_1K_PROMPT_TOKENS": "0.25", "PIPELINE_RESULTS_DIR": "out/results",
        "PIPELINE_CACHE_DIR": "/srv/cache", "PIPELINE_DEVICE": "cuda:1", "PIPELINE_TIMEZONE": "Europe/Paris",
        "PIPELINE_NIGHTLY_RUNS": '[{"name": "evals", "cron": "0 2 * * *", "input_path": "evals.jsonl"}]',
    })
    assert s.kv_cache_memory_bytes == 4 * 2**30
    assert s.enable_prefix_caching is False
    assert s.price_per_1k_prompt_tokens == 0.25
    assert s.results_dir == in_tmp / "out" / "results"  # relative to the working folder
    assert s.cache_dir == Path("/srv/cache")
    assert (s.device, s.timezone) == ("cuda:1", "Europe/Paris")
    assert s.nightly_runs == (NightlyRun("evals", "0 2 * * *", in_tmp / "evals.jsonl", "low"),)
    assert load_settings(env={"PIPELINE_KV_CACHE_MEMORY_BYTES": "auto"}).kv_cache_memory_bytes is None
    assert load_settings(env={"PIPELINE_MODEL_ALIASES": "gpt-4o-mini, gpt-4.1"}).model_aliases == (
        "gpt-4o-mini", "gpt-4.1")
    assert load_settings(env={"PIPELINE_MODEL_ALIASES": ""}).model_aliases == ()
    assert load_settings(env={"PIPELINE_KV_CACHE_MEMORY_BYTES": "1048576"}).kv_cache_memory_bytes == 2**20


def test_unrelated_pipeline_variables_are_ignored_but_near_misses_fail() -> None:
    assert load_settings(env={"PIPELINE_WORKSPACE": "/agent/_work/1"}).chunk_size == 64  # set by Azure Pipelines
    assert error(env={"PIPELINE_BROKER_ULR": "redis://x"}) == (
        "environment variable PIPELINE_BROKER_ULR is not a setting; did you mean PIPELINE_BROKER_URL?")


# -- presets -----------------------------------------------------------------------------------


def test_the_five_presets() -> None:
    assert list(PRESETS) == ["development", "production", "high_performance", "memory_efficient", "bulk_processing"]
    assert PRESETS["memory_efficient"].overrides["kv_cache_dtype"] == "int8"
    assert PRESETS["development"].overrides["model"] == "tiny"
    assert PRESETS["production"].overrides["device"] == "cuda"


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_applies_exactly_its_overrides(name: str) -> None:
    preset = PRESETS[name]
    assert preset.description
    assert set(preset.overrides) <= set(FIELD_NAMES) - {"preset"}
    assert not {"database_url", "broker_url", "redis_key_prefix"} & set(preset.overrides)  # presets invent no URLs
    s, sources = load_settings_with_sources(env={}, preset=name)
    defaults = Settings()
    for field in FIELD_NAMES:
        expected = name if field == "preset" else preset.overrides.get(field, getattr(defaults, field))
        assert getattr(s, field) == expected, field
        assert sources[field] == ("argument --preset" if field == "preset"
                                  else f"preset {name!r}" if field in preset.overrides else "default")
    assert preset_settings(name) == s


@pytest.mark.parametrize("name", [None, *PRESETS])
def test_every_preset_makes_a_valid_engine_config(name: str | None) -> None:
    from workers.config import EngineConfig

    config = EngineConfig(**preset_settings(name).engine_kwargs())
    assert config.block_size == preset_settings(name).block_size


def test_engine_choices_match_the_engine() -> None:
    import workers.config

    assert DTYPES == workers.config.SUPPORTED_DTYPES
    assert ATTENTION_BACKENDS == workers.config.ATTENTION_BACKENDS
    assert KV_CACHE_DTYPES == workers.config.KV_CACHE_DTYPES
    assert EVICTION_POLICIES == workers.config.EVICTION_POLICIES
    engine_fields = {f.name for f in dataclasses.fields(workers.config.EngineConfig)}
    assert set(Settings().engine_kwargs()) <= engine_fields


def test_an_unknown_preset_names_its_source(in_tmp: Path) -> None:
    choices = "development, production, high_performance, memory_efficient, bulk_processing"
    assert error(env={"PIPELINE_PRESET": "fast"}) == (
        f"environment variable PIPELINE_PRESET: unknown preset 'fast'; expected one of {choices}")
    config = write(in_tmp / "pipeline.toml", 'preset = "fast"\n')
    assert error(env={}) == f"{config}: key 'preset': unknown preset 'fast'; expected one of {choices}"


# -- errors name their source --------------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("PIPELINE_BLOCK_SIZE", "sixteen", "expected an integer"),
    ("PIPELINE_BLOCK_SIZE", "0", "expected an integer between 1 and 256 (tokens per block; 16 is usual)"),
    ("PIPELINE_CHUNK_SIZE", "1.5", "expected an integer"),
    ("PIPELINE_VISIBILITY_TIMEOUT_S", "4", "expected an integer at least 5 (seconds before a dead worker's chunk is redelivered)"),
    ("PIPELINE_KV_CACHE_DTYPE", "int4", "expected one of auto, int8, fp8"),
    ("PIPELINE_EVICTION_POLICY", "random", "expected one of lru, lfu, fifo, adaptive"),
    ("PIPELINE_DTYPE", "fp16", "expected one of auto, float32, bfloat16, float16"),
    ("PIPELINE_ATTENTION_BACKEND", "flash", "expected one of auto, reference, cpu, triton"),
    ("PIPELINE_DEVICE", "gpu", "expected 'cpu', 'cuda' or 'cuda:N'"),
    ("PIPELINE_ENABLE_PREFIX_CACHING", "maybe", "expected true or false"),
    ("PIPELINE_KV_CACHE_MEMORY_BYTES", "4GB",
     "expected a size in bytes or with a unit: KiB, MiB, GiB, TiB (e.g. '4GiB')"),
    ("PIPELINE_PRICE_PER_1K_COMPLETION_TOKENS", "-1", "expected a price of 0 or more"),
    ("PIPELINE_PRICE_PER_1K_COMPLETION_TOKENS", "nan", "expected a price of 0 or more"),
    ("PIPELINE_COMPLETION_WINDOW", "1 day", "expected a duration such as '24h', '90m' or '7d'"),
    ("PIPELINE_TIMEZONE", "Mars/Olympus", "expected an IANA time zone name such as 'UTC' or 'Europe/Paris'"),
    ("PIPELINE_REDIS_KEY_PREFIX", "a*", "expected 1-64 letters, digits or '_.:-' (no glob characters), e.g. 'pipeline:'"),
    ("PIPELINE_BROKER_URL", "amqp://localhost", "expected a Redis URL such as redis://host:6379/0 (rediss:// for TLS)"),
    ("PIPELINE_NIGHTLY_RUNS", '[{"name": "a", "cron": "0 2 * *", "input_path": "x"}]',
     "nightly_runs[0]: cron '0 2 * *': expected 5 fields, 'minute hour day-of-month month day-of-week'"),
    ("PIPELINE_NIGHTLY_RUNS", '[{"name": "a", "cron": "0 2 * * *", "input_path": "x", "priority": "top"}]',
     "nightly_runs[0]: priority 'top': expected one of critical, high, normal, low"),
    ("PIPELINE_MODEL_ALIASES", "gpt-4o,,o1",
     "'' is not a model name: expected non-empty names without commas or outer spaces"),
])
def test_a_bad_environment_value_names_the_variable(variable: str, value: str, expected: str) -> None:
    assert error(env={variable: value}) == f"environment variable {variable}: {expected}; got {value!r}"


def test_a_bad_file_value_names_the_file_and_key(in_tmp: Path) -> None:
    config = write(in_tmp / "pipeline.toml", 'block_size = "16"\n')
    assert error(env={}) == f"{config}: key 'block_size': expected an integer; got '16'"
    write(config, "enable_prefix_caching = 1\n")
    assert error(env={}) == f"{config}: key 'enable_prefix_caching': expected true or false; got 1"
    write(config, "[[nightly_runs]]\nname = \"evals\"\ncron = \"61 2 * * *\"\ninput_path = \"a.jsonl\"\n")
    message = error(env={})
    assert message.startswith(f"{config}: key 'nightly_runs': nightly_runs[0]: cron '61 2 * * *': ")
    write(config, "[[nightly_runs]]\nname = \"evals\"\ncron = \"0 2 * * *\"\n")
    assert error(env={}) == (f"{config}: key 'nightly_runs': nightly_runs[0]: missing keys input_path; "
                             "got [{'name': 'evals', 'cron': '0 2 * * *'}]")


def test_an_unknown_file_key_is_an_error_with_a_suggestion(in_tmp: Path) -> None:
    config = write(in_tmp / "pipeline.toml", "chunksize = 8\n")
    assert error(env={}) == f"{config}: key 'chunksize' is not a setting; did you mean chunk_size?"


def test_invalid_toml_names_the_file_and_line(in_tmp: Path) -> None:
    config = write(in_tmp / "pipeline.toml", "chunk_size = 8\nmodel = \n")
    assert error(env={}) == f"{config}: not valid TOML: Invalid value (at line 2, column 9)"


def test_a_bad_combination_names_both_fields_and_their_sources(in_tmp: Path) -> None:
    config = write(in_tmp / "pipeline.toml", "block_size = 64\n")
    assert error(env={"PIPELINE_MAX_NUM_BATCHED_TOKENS": "32"}) == (
        "max_num_batched_tokens=32 must be at least block_size=64 (max_num_batched_tokens from environment "
        f"variable PIPELINE_MAX_NUM_BATCHED_TOKENS; block_size from {config}: key 'block_size')")
    assert error(env={"PIPELINE_KV_CACHE_DTYPE": "fp8"}) == (
        "kv_cache_dtype='fp8' needs device 'cuda'; on the CPU use 'int8' (kv_cache_dtype from environment "
        "variable PIPELINE_KV_CACHE_DTYPE; device from default)")
    assert load_settings(env={"PIPELINE_KV_CACHE_DTYPE": "fp8", "PIPELINE_DEVICE": "cuda"}).kv_cache_dtype == "fp8"


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError) as e:
        Settings(block_size=0)
    assert str(e.value) == "block_size=0: expected an integer between 1 and 256 (tokens per block; 16 is usual)"
    with pytest.raises(ValueError) as e:
        Settings(chunk_size=True)
    assert str(e.value) == "chunk_size=True: expected an integer"
    with pytest.raises(ValueError) as e:
        Settings(nightly_runs=(NightlyRun("a", "0 1 * * *", Path("/x")), NightlyRun("a", "0 2 * * *", Path("/y"))))
    assert str(e.value).endswith(": expected unique names; repeated: a")


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().chunk_size = 1  # type: ignore[misc]


# -- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "masked"), [
    ("postgresql+psycopg://pipeline:s3cret@db:5432/pipeline", "postgresql+psycopg://pipeline:***@db:5432/pipeline"),
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("redis://user:p@ss/w0rd@redis:6379/0", "redis://user:***@redis:6379/0"),  # unescaped '@' and '/' too
    ("postgresql://db/pipeline?user=u&password=s3cret&sslmode=require",
     "postgresql://db/pipeline?user=u&password=***&sslmode=require"),
    ("redis://user@redis:6379/0", "redis://user@redis:6379/0"),  # no password
    ("sqlite:////srv/pipeline.sqlite3", "sqlite:////srv/pipeline.sqlite3"),
    # Mistyped, with no "://": masked all the same, from the start up to the '@'.
    ("pipeline:s3cret@db:5432/pipeline", "pipeline:***@db:5432/pipeline"),
    ("postgresql+psycopg:/pipeline:s3cret@db/pipeline", "postgresql+psycopg:***@db/pipeline"),
    ("postgresql//pipeline:s3cret@db/pipeline", "postgresql//pipeline:***@db/pipeline"),
])
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_passwords_never_shown() -> None:
    env = {"PIPELINE_DATABASE_URL": "postgresql+psycopg://pipeline:s3cret@db/pipeline",
           "PIPELINE_BROKER_URL": "redis://:hunter2@redis:6379/0"}
    s = load_settings(env=env)
    assert s.database_url == env["PIPELINE_DATABASE_URL"]  # the real value is kept
    assert s.as_dict()["database_url"] == "postgresql+psycopg://pipeline:***@db/pipeline"
    assert s.as_dict()["broker_url"] == "redis://:***@redis:6379/0"
    for text in (repr(s), s.to_toml(), str(s.as_dict())):
        assert "s3cret" not in text and "hunter2" not in text
    assert error(env={"PIPELINE_BROKER_URL": "http://u:hunter2@redis"}) == (
        "environment variable PIPELINE_BROKER_URL: expected a Redis URL such as redis://host:6379/0 "
        "(rediss:// for TLS); got 'http://u:***@redis'")


def test_as_dict_is_json_ready(in_tmp: Path) -> None:
    s = load_settings(env={"PIPELINE_NIGHTLY_RUNS": '[{"name": "n", "cron": "0 3 * * 1", "input_path": "/d/n.jsonl",'
                                                    ' "priority": "normal"}]'})
    data = s.as_dict()
    assert list(data) == list(FIELD_NAMES)
    assert data["results_dir"] == str(in_tmp / "results")
    assert data["nightly_runs"] == [{"name": "n", "cron": "0 3 * * 1", "input_path": "/d/n.jsonl",
                                     "priority": "normal"}]


# -- pipeline.toml round trip --------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, *PRESETS])
def test_to_toml_reads_back_to_the_same_settings(name: str | None, in_tmp: Path) -> None:
    s = preset_settings(name)
    config = write(in_tmp / "generated.toml", s.to_toml())
    assert load_settings(env={}, config_path=config) == s


def test_to_toml_round_trips_every_kind_of_value(in_tmp: Path) -> None:
    s = dataclasses.replace(
        Settings(), model='/models/"odd" name\\ü\t', kv_cache_memory_bytes=3 * 2**30, enable_prefix_caching=False,
        price_per_1k_prompt_tokens=1e-05, results_dir=Path("/srv/results"), model_aliases=("gpt-4o-mini", 'a"b'),
        nightly_runs=(NightlyRun("evals", "30 2 * * 1-5", Path("/data/evals.jsonl"), "normal"),
                      NightlyRun("labels", "0 4 1 * *", Path("/data/labels.parquet"))))
    text = s.to_toml()
    assert "[[nightly_runs]]\nname = \"evals\"\ncron = \"30 2 * * 1-5\"\n" in text
    assert load_settings(env={}, config_path=write(in_tmp / "g.toml", text)) == s


def test_to_toml_comments_out_unset_values_and_urls_with_passwords() -> None:
    s = dataclasses.replace(Settings(), database_url="postgresql+psycopg://u:s3cret@db/p")
    lines = s.to_toml().splitlines()
    assert "# kv_cache_memory_bytes = \"4GiB\"" in lines
    assert "# preset = \"development\"" in lines
    assert "# holds a password: set PIPELINE_DATABASE_URL in the environment instead" in lines
    assert "# database_url = \"postgresql+psycopg://u:***@db/p\"" in lines
    assert not any(line.startswith("database_url") for line in lines)
    assert "chunk_size = 64" in lines


EXPECTED_URL = ("expected an SQLAlchemy URL such as sqlite:////srv/pipeline.sqlite3 or "
                "postgresql+psycopg://user:password@host:5432/pipeline")


@pytest.mark.parametrize(("url", "problem", "shown"), [
    ("pipeline:s3cret@db/pipeline", EXPECTED_URL, "pipeline:***@db/pipeline"),
    ("postgresql+psycopg:/pipeline:s3cret@db/pipeline", EXPECTED_URL, "postgresql+psycopg:***@db/pipeline"),
    ("postgresq://pipeline:s3cret@db/pipeline", "unknown database driver 'postgresq'; use sqlite or "
     "postgresql+psycopg", "postgresq://pipeline:***@db/pipeline"),
    ("postgresql+psycopg3://pipeline:s3cret@db/pipeline", "unknown database driver 'postgresql+psycopg3'; use "
     "sqlite or postgresql+psycopg", "postgresql+psycopg3://pipeline:***@db/pipeline"),
    ("mysql+mysqldb://pipeline:s3cret@db/pipeline", "the driver of 'mysql+mysqldb' is not installed (no module "
     "'MySQLdb'); use sqlite or postgresql+psycopg, or install it", "mysql+mysqldb://pipeline:***@db/pipeline"),
    ("postgresql+psycopg://pipeline:s3cret@db:port/pipeline", f"{EXPECTED_URL} (this one cannot be parsed: is "
     "the port a number?)", "postgresql+psycopg://pipeline:***@db:port/pipeline"),
])
def test_a_bad_database_url_is_one_masked_error(url: str, problem: str, shown: str) -> None:
    assert error(env={"PIPELINE_DATABASE_URL": url}) == (
        f"environment variable PIPELINE_DATABASE_URL: {problem}; got {shown!r}")


def test_metrics_port_is_a_port_a_range_or_off() -> None:
    assert Settings().metrics_ports == range(9464, 9480)
    assert Settings(metrics_port="9100").metrics_ports == range(9100, 9101)
    assert Settings(metrics_port="off").metrics_ports is None
    for bad in ("9480-9464", "0", "70000", "9464-", "on"):
        with pytest.raises(ValueError, match="metrics_port=.*expected a port such as '9464'"):
            Settings(metrics_port=bad)


def test_a_webhook_url_is_kept_out_of_logs_and_files() -> None:
    settings = Settings(webhook_url="https://user:pw@hooks.example.com/T0/B0/tok3n?x=1")
    shown = repr(settings) + json.dumps(settings.as_dict()) + settings.to_toml()
    assert "tok3n" not in shown and "pw@" not in shown and "https://hooks.example.com/***" in shown
    with pytest.raises(ValueError, match="webhook_url='ftp://h/\\*\\*\\*': expected an http:// or https:// URL"):
        Settings(webhook_url="ftp://h/secret")
