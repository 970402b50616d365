"""Typed settings shared by the CLI, the workers and beat, named after Celery's settings where they map.

`load_settings()` reads them once per process: defaults < preset < `pipeline.toml` < environment
variables `PIPELINE_<FIELD>`. A bad value raises `ValueError` naming where it came from (the
environment variable, or the file and key) and what is expected. The result is frozen and passed
down; nothing writes discovered values back into it.
"""

from __future__ import annotations

import math
import os
import re
import typing
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline.presets import PRESETS
from pipeline.queues import QUEUE_NAMES

ENV_PREFIX = "PIPELINE_"
CONFIG_ENV_VAR = "PIPELINE_CONFIG"  # the one PIPELINE_ variable that is not a field
CONFIG_FILE_NAME = "pipeline.toml"

# The engine's choices, repeated because importing workers/ loads torch; a test keeps them equal.
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "reference", "cpu", "triton")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")
EVICTION_POLICIES = ("lru", "lfu", "fifo", "adaptive")
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")  # Redis transports: priority order needs one
SIZE_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _doc(text: str, example: str | None = None) -> dict[str, str]:
    """Field metadata: the comment `to_toml` writes above the key, and an example for unset keys."""
    return {"doc": text} if example is None else {"doc": text, "example": example}


@dataclass(frozen=True, slots=True)
class NightlyRun:
    """A bulk run that beat submits on a schedule: `cron` is "minute hour day-of-month month
    day-of-week" in `Settings.timezone`; `input_path` is read when the run starts."""

    name: str
    cron: str
    input_path: Path
    priority: str = "low"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise ValueError(f"name {self.name!r}: expected 1-64 letters, digits, '_' or '-'")
        cron_fields(self.cron)
        if self.priority not in QUEUE_NAMES:
            raise ValueError(f"priority {self.priority!r}: expected one of {', '.join(QUEUE_NAMES)}")


def cron_fields(cron: str) -> dict[str, str]:
    """`crontab(**cron_fields(cron))` keyword arguments for a five-field cron string."""
    parts = cron.split()
    if len(parts) != 5:
        raise ValueError(f"cron {cron!r}: expected 5 fields, 'minute hour day-of-month month day-of-week'")
    names = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
    kwargs = dict(zip(names, parts))
    from celery.schedules import crontab  # lazily: only configs with nightly runs pay for the import

    try:
        crontab(**kwargs)
    except Exception as e:  # celery raises its own ParseException or ValueError
        raise ValueError(f"cron {cron!r}: {e}") from None
    return kwargs


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """Everything a pipeline process is configured with. Build it with `load_settings()`."""

    preset: str | None = field(
        default=None, metadata=_doc(f"A preset applied under this file: {', '.join(PRESETS)}.", '"development"')
    )
    # Services
    database_url: str = field(
        default_factory=lambda: f"sqlite:///{Path.cwd() / 'pipeline.sqlite3'}",
        metadata=_doc("SQLAlchemy URL of the results database: SQLite (embedded) or postgresql+psycopg://..."),
    )
    broker_url: str = field(default="redis://127.0.0.1:6379/0", metadata=_doc("Redis URL of the Celery broker."))
    redis_key_prefix: str = field(
        default="pipeline:",
        metadata=_doc("Prefix of every Redis key the pipeline writes (kombu's global_keyprefix), so that "
                      "deployments and test runs can share one Redis."),
    )
    # Minutes, not hours: the lease is renewed while a chunk runs, so this bounds how long a dead
    # worker's chunk waits, not how long a chunk may take.
    visibility_timeout_s: int = field(
        default=600,
        metadata=_doc("Seconds before a dead worker's chunk is redelivered: Redis's visibility timeout and the "
                      "chunk lease, which a worker renews while its chunk runs."),
    )
    stall_timeout_s: int = field(
        default=600,
        metadata=_doc("Seconds a worker's engine may make no progress on a chunk (no step, no prompt built) "
                      "before the worker gives the chunk up (stops renewing its lease) and reports itself "
                      "unhealthy."),
    )
    task_max_redeliveries: int = field(
        default=3, metadata=_doc("Deliveries of a chunk after the first before its requests are failed.")
    )
    chunk_size: int = field(default=64, metadata=_doc("Requests per Celery task (chunk)."))
    completion_window: str = field(
        default="24h", metadata=_doc("Default time a job may take before it expires: '24h', '90m', '7d'.")
    )
    session_idle_timeout: str = field(
        default="7d", metadata=_doc("Sessions unused this long are deleted by beat: '7d', '12h', '90m'.")
    )
    sweep_interval: str = field(
        default="10m", metadata=_doc("How often beat resends lost chunks (dead workers, a Redis restart): "
                                     "'10m', '1h', '30s'.")
    )
    no_worker_notice_after: str = field(
        default="1m", metadata=_doc("`submit --wait` and `status --watch` say once that no worker has taken the "
                                    "job when none has in this long, and wait on: '1m', '30s', '1h'.")
    )
    timezone: str = field(default="UTC", metadata=_doc("IANA time zone of the nightly run crons."))
    # Engine
    model: str = field(default="tiny", metadata=_doc("'tiny' (built in, gibberish) or a local Hugging Face folder."))
    model_aliases: tuple[str, ...] = field(
        default=(),
        metadata=_doc("Other names that request lines (a line's model, an OpenAI body.model) and --model may use "
                      "for `model`, such as an OpenAI model name; any other name is refused (model_not_found). "
                      "A TOML list, or comma-separated in the environment.", '["gpt-4o-mini"]'),
    )
    device: str = field(default="cpu", metadata=_doc("'cpu', 'cuda' or 'cuda:N'."))
    dtype: str = field(default="auto", metadata=_doc(
        f"Model dtype: {', '.join(DTYPES)}; 'auto': bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, "
        "else float32."))
    attention_backend: str = field(default="auto", metadata=_doc(
        "Attention kernels: 'cpu' (C++, built with the system's compiler on first use), 'triton' (CUDA), "
        "'reference' (plain PyTorch); 'auto': the fastest that runs here."))
    cuda_graphs: bool = field(default=True, metadata=_doc(
        "Replay decode steps as CUDA graphs (the triton backend on a GPU); no effect on the CPU."))
    block_size: int = field(default=16, metadata=_doc("Tokens per KV cache block."))
    kv_cache_memory_bytes: int | None = field(
        default=None,
        metadata=_doc("Memory for the KV cache, in bytes or with a unit ('4GiB'); unset: sized from the "
                      "device's free memory.", '"4GiB"'),
    )
    kv_cache_dtype: str = field(
        default="auto", metadata=_doc("KV storage: 'auto' (the model dtype), 'int8' anywhere, 'fp8' on GPUs.")
    )
    eviction_policy: str = field(
        default="lru", metadata=_doc(f"Which cached prefix blocks go first: {', '.join(EVICTION_POLICIES)}.")
    )
    enable_prefix_caching: bool = field(default=True, metadata=_doc("Reuse the KV blocks of shared prefixes."))
    max_num_seqs: int = field(default=256, metadata=_doc("Sequences the scheduler runs at once."))
    cpu_threads: int | None = field(
        default=None, metadata=_doc("CPU threads of a worker's engine; unset: one per core. Workers sharing a "
                                    "machine should split its cores (2 workers on 8 cores: 4 each).", "4"),
    )
    max_num_batched_tokens: int = field(default=2048, metadata=_doc("Token budget of one engine step."))
    chat_template_timeout_s: float = field(
        default=10.0, metadata=_doc("Seconds a model's chat template may take to render one conversation; "
                                    "past it that line fails with chat_template_error.")
    )
    # Cost table
    price_per_1k_prompt_tokens: float = field(default=0.0, metadata=_doc("Price of 1,000 uncached prompt tokens."))
    price_per_1k_cached_tokens: float = field(
        default=0.0, metadata=_doc("Price of 1,000 prompt tokens served from the prefix cache.")
    )
    price_per_1k_completion_tokens: float = field(
        default=0.0, metadata=_doc("Price of 1,000 generated tokens.")
    )
    # Operations
    metrics_port: str = field(
        default="9464-9479", metadata=_doc(
            "Port of each worker's Prometheus metrics (and beat's queue depths): one port, or a range "
            "'first-last' of which each process on a host takes the first free one; 'off' serves none.",
            '"9464-9479"'))
    webhook_url: str | None = field(
        default=None, metadata=_doc("Where a JSON summary is POSTed when a nightly run's job finishes or fails; "
                                    "unset: none. Kept out of logs (it may hold a token).",
                                    '"https://hooks.example.com/T0/B0/secret"'))
    webhook_timeout_s: float = field(default=10.0, metadata=_doc("Seconds one webhook POST may take."))
    webhook_retries: int = field(default=2, metadata=_doc("Webhook POSTs retried this many times after a failure."))
    # Files
    results_dir: Path = field(
        default_factory=lambda: Path.cwd() / "results", metadata=_doc("Where exported result files go.")
    )
    backups_dir: Path = field(
        default_factory=lambda: Path.cwd() / "backups", metadata=_doc("Where database backups go.")
    )
    backups_keep: int = field(
        default=7, metadata=_doc("Database backups kept in backups_dir; older ones are deleted after each backup.")
    )
    cache_dir: Path = field(
        default_factory=lambda: Path.cwd() / "kv_cache",
        metadata=_doc("Where KV cache snapshots go: one folder per worker (its node name) under it."),
    )
    # KV cache persistence, warming and pinning
    kv_snapshot_on_start: bool = field(
        default=True, metadata=_doc("A worker loads its newest valid KV snapshot when it starts (a warm restart).")
    )
    kv_checkpoint_interval: str = field(
        default="15m", metadata=_doc("How often beat has every worker write a KV snapshot: '15m', '1h', '30s'.")
    )
    kv_snapshot_max_blocks: int | None = field(
        default=None, metadata=_doc("Most KV blocks a snapshot holds (the hottest); unset: every cached block.",
                                    "4096"),
    )
    kv_snapshots_keep: int = field(default=2, metadata=_doc("KV snapshots kept per worker; older ones are deleted."))
    max_pinned_fraction: float = field(
        default=0.5, metadata=_doc("Share of the KV pool that pinned prefixes may fill; pinning more is refused.")
    )
    kv_warm_file: str | None = field(
        default=None, metadata=_doc("A JSONL file whose prompts a worker prefills when it starts.", '"warm.jsonl"')
    )
    kv_pin_file: str | None = field(
        default=None, metadata=_doc("A JSONL file whose prompts a worker prefills and pins when it starts.",
                                    '"system_prompts.jsonl"'),
    )
    kv_warm_tenant: str = field(
        default="default", metadata=_doc("The tenant whose jobs the start-up warm and pin files are for: "
                                         "cached blocks are hits for that tenant's requests only.", '"acme"'),
    )
    nightly_runs: tuple[NightlyRun, ...] = field(
        default=(), metadata=_doc("Bulk runs beat submits on a schedule: [[nightly_runs]] tables.")
    )
    # Celery message signing (pipeline/message_signing.py): all three, or none
    security_key_file: str | None = field(
        default=None, metadata=_doc("PEM private key that signs task messages (owner-only file, unencrypted); "
                                    "with security_certificate_file and security_cert_store.",
                                    '"/etc/pipeline/signing.key"'))
    security_certificate_file: str | None = field(
        default=None, metadata=_doc("PEM certificate of security_key_file.", '"/etc/pipeline/signing.crt"'))
    security_cert_store: str | None = field(
        default=None, metadata=_doc("Glob of the PEM certificates whose signatures workers trust.",
                                    '"/etc/pipeline/trusted/*.crt"'))
    # The API server (`pipeline serve`)
    files_dir: Path = field(
        default_factory=lambda: Path.cwd() / "files",
        metadata=_doc("Where `pipeline serve` keeps uploaded batch files and their outputs (owner-only)."),
    )
    max_upload_bytes: int | None = field(
        default=200 * 2**20,
        metadata=_doc("Largest file `POST /v1/files` accepts, in bytes or with a unit ('1GiB'); larger ones "
                      "get 413. Unset: the reader's own limit (10 GiB).", '"200MiB"'),
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            problem = field_problem(f.name, value)
            if problem is not None:
                raise ValueError(f"{f.name}={_shown(f.name, value)}: {problem}")
        _check_combinations(self)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `workers.EngineConfig` (which validates them again)."""
        names = ("model", "device", "dtype", "attention_backend", "cuda_graphs", "block_size", "kv_cache_memory_bytes",
                 "kv_cache_dtype", "eviction_policy", "enable_prefix_caching", "max_num_seqs", "max_num_batched_tokens",
                 "cpu_threads", "chat_template_timeout_s", "max_pinned_fraction")
        return {name: getattr(self, name) for name in names}

    @property
    def completion_window_s(self) -> int:
        return duration_s(self.completion_window)

    @property
    def session_idle_timeout_s(self) -> int:
        return duration_s(self.session_idle_timeout)

    @property
    def sweep_interval_s(self) -> int:
        return duration_s(self.sweep_interval)

    @property
    def kv_checkpoint_interval_s(self) -> int:
        return duration_s(self.kv_checkpoint_interval)

    @property
    def no_worker_notice_after_s(self) -> int:
        return duration_s(self.no_worker_notice_after)

    @property
    def metrics_ports(self) -> range | None:
        """The ports `metrics_port` names, None for 'off'."""
        if self.metrics_port == "off":
            return None
        first, _, last = self.metrics_port.partition("-")
        return range(int(first), int(last or first) + 1)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values for `config show`; passwords in URLs are masked as ***."""
        return {f.name: _jsonable(f.name, getattr(self, f.name)) for f in fields(self)}

    def to_toml(self) -> str:
        """A commented pipeline.toml holding these settings (for `config generate`). A URL with a
        password is written commented out: secrets belong in the environment, not in files."""
        from pipeline.settings_toml import render_toml

        return render_toml(self)

    def __repr__(self) -> str:  # masked: settings end up in logs
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Settings))
URL_FIELDS = ("database_url", "broker_url")
FIELD_TYPES = typing.get_type_hints(Settings)


def env_var(name: str) -> str:
    """The environment variable that sets field `name`."""
    return ENV_PREFIX + name.upper()


def duration_s(text: str) -> int:
    """Seconds in a duration such as '24h', '90m', '7d' or '30s'."""
    match = re.fullmatch(r"([1-9][0-9]*)([smhd])", text)
    if match is None:
        raise ValueError(f"{text!r}: expected a duration such as '24h', '90m', '7d' or '30s'")
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def mask_url(url: str) -> str:
    """`url` with the password of its user info and any password= query parameter replaced by ***.

    A mistyped URL with no "://" ("user:pw@host/db", "postgresql:/user:pw@host") is masked too, from
    its start: what is a password there cannot be told, so all of it up to the '@' may be one."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")  # the last '@': an unescaped one in a password stays hidden
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return re.sub(r"(?i)\b(password|passwd|pwd)=[^&;]*", r"\1=***", f"{scheme}{sep}{rest}")


# -- validation ---------------------------------------------------------------------------------


def _no_check(value: Any) -> str | None:
    return None


def _int_range(low: int, high: int | None, what: str) -> typing.Callable[[int], str | None]:
    def check(value: int) -> str | None:
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            return f"expected an integer {bound} ({what})"
        return None

    return check


def _choice(choices: tuple[str, ...]) -> typing.Callable[[str], str | None]:
    return lambda value: None if value in choices else f"expected one of {', '.join(choices)}"


def _check_device(value: str) -> str | None:
    if value in ("cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", value):
        return None
    return "expected 'cpu', 'cuda' or 'cuda:N'"


def _check_timezone(value: str) -> str | None:
    try:
        zoneinfo.ZoneInfo(value)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return "expected an IANA time zone name such as 'UTC' or 'Europe/Paris'"
    return None


def _check_database_url(value: str) -> str | None:
    """A URL SQLAlchemy can parse, of a dialect it knows, whose driver is installed: otherwise the
    first use of the database would end in a traceback, far from the setting that caused it."""
    expected = ("expected an SQLAlchemy URL such as sqlite:////srv/pipeline.sqlite3 or "
                "postgresql+psycopg://user:password@host:5432/pipeline")
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        return expected
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(value)
    except (ArgumentError, ValueError):  # the messages are not shown: they may quote the password
        return f"{expected} (this one cannot be parsed: is the port a number?)"
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        return f"unknown database driver {url.drivername!r}; use sqlite or postgresql+psycopg"
    try:
        dialect.import_dbapi()
    except ImportError as e:
        return (f"the driver of {url.drivername!r} is not installed (no module {e.name!r}); use sqlite or "
                "postgresql+psycopg, or install it")
    return None


def _check_tenant_name(name: str) -> str | None:
    from db.repository.tenants import check_tenant_name  # the one rule for tenant names

    try:
        check_tenant_name(name)
    except ValueError as e:
        return str(e)
    return None


def _check_price(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "expected a price of 0 or more"


def _check_aliases(aliases: tuple[str, ...]) -> str | None:
    for alias in aliases:
        if not alias.strip() or alias != alias.strip() or "," in alias or len(alias) > 512:
            return f"{alias!r} is not a model name: expected non-empty names without commas or outer spaces"
    return None


def _check_nightly_runs(runs: tuple[NightlyRun, ...]) -> str | None:
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    return f"expected unique names; repeated: {', '.join(duplicates)}" if duplicates else None


def mask_webhook(url: str) -> str:
    """A webhook URL as logs may show it: scheme and host; its path and query often hold the token."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.split('/', 1)[0].rpartition('@')[2]}/***" if sep else "***"


def _check_metrics_port(value: str) -> str | None:
    match = re.fullmatch(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", value)
    if value == "off" or (match and 1 <= int(match[1]) <= int(match[2] or match[1]) <= 65535):
        return None
    return "expected a port such as '9464', a range such as '9464-9479', or 'off'"


_CHECKS: dict[str, typing.Callable[[Any], str | None]] = {
    "preset": lambda v: None if v is None or v in PRESETS else f"expected one of {', '.join(PRESETS)}",
    "database_url": _check_database_url,
    "broker_url": lambda v: None if v.partition("://")[0] in BROKER_SCHEMES and "://" in v else (
        "expected a Redis URL such as redis://host:6379/0 (rediss:// for TLS)"),
    "redis_key_prefix": lambda v: None if re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", v) else (
        "expected 1-64 letters, digits or '_.:-' (no glob characters), e.g. 'pipeline:'"),
    # Also the chunk lease, which the worker renews while the chunk runs (jobs/lease_keeper.py), so
    # it bounds how long a dead worker's chunk waits, not how long a chunk may take. A few seconds
    # is allowed, not only minutes, for deployments (and the fault tests, which kill workers) that
    # want a killed worker's chunk back soon; the cost is a renewal write every third of it.
    "visibility_timeout_s": _int_range(5, None, "seconds before a dead worker's chunk is redelivered"),
    "stall_timeout_s": _int_range(1, None, "seconds without progress before a worker gives its chunk up"),
    "task_max_redeliveries": _int_range(0, 100, "redeliveries of a chunk"),
    "chunk_size": _int_range(1, 100_000, "requests per task"),
    "completion_window": lambda v: None if re.fullmatch(r"[1-9][0-9]*[mhd]", v) else (
        "expected a duration such as '24h', '90m' or '7d'"),
    "session_idle_timeout": lambda v: None if re.fullmatch(r"[1-9][0-9]*[mhd]", v) else (
        "expected a duration such as '7d', '12h' or '90m'"),
    "sweep_interval": lambda v: None if re.fullmatch(r"[1-9][0-9]*[smhd]", v) else (
        "expected a duration such as '10m', '1h' or '30s'"),
    "no_worker_notice_after": lambda v: None if re.fullmatch(r"[1-9][0-9]*[smhd]", v) else (
        "expected a duration such as '1m', '30s' or '1h'"),
    "timezone": _check_timezone,
    "backups_keep": _int_range(1, 10_000, "backups kept"),
    "kv_checkpoint_interval": lambda v: None if re.fullmatch(r"[1-9][0-9]*[smhd]", v) else (
        "expected a duration such as '15m', '1h' or '30s'"),
    "kv_snapshot_max_blocks": lambda v: None if v is None or v >= 1 else "expected a positive number of blocks, or unset",
    "kv_snapshots_keep": _int_range(1, 100, "snapshots kept per worker"),
    "max_pinned_fraction": lambda v: None if math.isfinite(v) and 0 <= v < 1 else "expected a fraction in [0, 1)",
    "kv_warm_tenant": _check_tenant_name,
    "model": lambda v: None if v.strip() else "expected 'tiny' or the path of a local Hugging Face model folder",
    "model_aliases": _check_aliases,
    "device": _check_device,
    "dtype": _choice(DTYPES),
    "attention_backend": _choice(ATTENTION_BACKENDS),
    "block_size": _int_range(1, 256, "tokens per block; 16 is usual"),
    "kv_cache_memory_bytes": lambda v: None if v is None or v > 0 else "expected a positive size such as '4GiB'",
    "kv_cache_dtype": _choice(KV_CACHE_DTYPES),
    "eviction_policy": _choice(EVICTION_POLICIES),
    "max_num_seqs": _int_range(1, None, "sequences per step"),
    "cpu_threads": lambda v: None if v is None or v >= 1 else "expected a positive number of threads, or unset",
    "max_num_batched_tokens": _int_range(1, None, "tokens per step"),
    "chat_template_timeout_s": lambda v: None if math.isfinite(v) and 0 < v <= 3600 else (
        "expected a number of seconds in (0, 3600]"),
    "price_per_1k_prompt_tokens": _check_price,
    "price_per_1k_cached_tokens": _check_price,
    "price_per_1k_completion_tokens": _check_price,
    "nightly_runs": _check_nightly_runs,
    "max_upload_bytes": lambda v: None if v is None or v > 0 else "expected a positive size such as '200MiB'",
    "metrics_port": _check_metrics_port,
    "webhook_url": lambda v: None if v is None or re.fullmatch(r"https?://[^/\s]+(/\S*)?", v) else (
        "expected an http:// or https:// URL"),
    "webhook_timeout_s": lambda v: None if math.isfinite(v) and 0 < v <= 300 else "expected seconds in (0, 300]",
    "webhook_retries": _int_range(0, 10, "retries"),
}


class CombinationError(ValueError):
    """Two fields that are fine alone but not together; `fields` lets the loader name their sources."""

    def __init__(self, message: str, field_names: tuple[str, ...]) -> None:
        super().__init__(message)
        self.field_names = field_names


def _check_combinations(s: Settings) -> None:
    if s.kv_cache_dtype == "fp8" and s.device == "cpu":
        raise CombinationError("kv_cache_dtype='fp8' needs device 'cuda'; on the CPU use 'int8'",
                               ("kv_cache_dtype", "device"))
    signing = ("security_key_file", "security_certificate_file", "security_cert_store")
    given = [name for name in signing if getattr(s, name) is not None]
    if given and len(given) != len(signing):
        raise CombinationError("message signing needs security_key_file, security_certificate_file and "
                               f"security_cert_store together; only {', '.join(given)} is set", signing)
    if s.max_num_batched_tokens < s.block_size:
        raise CombinationError(
            f"max_num_batched_tokens={s.max_num_batched_tokens} must be at least block_size={s.block_size}",
            ("max_num_batched_tokens", "block_size"))


def _type_problem(name: str, value: Any) -> str | None:
    hint = FIELD_TYPES[name]
    ok = {
        str: lambda: isinstance(value, str),
        int: lambda: isinstance(value, int) and not isinstance(value, bool),
        float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        bool: lambda: isinstance(value, bool),
        Path: lambda: isinstance(value, Path),
        int | None: lambda: value is None or (isinstance(value, int) and not isinstance(value, bool)),
        str | None: lambda: value is None or isinstance(value, str),
        tuple[NightlyRun, ...]: lambda: isinstance(value, tuple) and all(isinstance(r, NightlyRun) for r in value),
        tuple[str, ...]: lambda: isinstance(value, tuple) and all(isinstance(v, str) for v in value),
    }[hint]()
    return None if ok else f"expected {_KIND_NAMES[hint]}"


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path",
               int | None: "an integer or nothing", str | None: "a string or nothing",
               tuple[NightlyRun, ...]: "a list of nightly runs", tuple[str, ...]: "a list of strings"}


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with `value` for field `name` on its own ("expected ..."), or None."""
    return _type_problem(name, value) or _CHECKS.get(name, _no_check)(value)


def _shown(name: str, value: Any) -> str:
    if name == "webhook_url" and isinstance(value, str):
        return repr(mask_webhook(value))
    return repr(mask_url(value)) if name in URL_FIELDS and isinstance(value, str) else repr(value)


def _jsonable(name: str, value: Any) -> Any:
    if name == "webhook_url":
        return None if value is None else mask_webhook(value)
    if name in URL_FIELDS:
        return mask_url(value)
    if isinstance(value, Path):
        return str(value)
    if name == "model_aliases":
        return list(value)
    if name == "nightly_runs":
        return [{"name": r.name, "cron": r.cron, "input_path": str(r.input_path), "priority": r.priority}
                for r in value]
    return value


# -- loading ------------------------------------------------------------------------------------


def load_settings(
    env: Mapping[str, str] | None = None, config_path: str | Path | None = None, preset: str | None = None
) -> Settings:
    """The settings from defaults < `preset` < pipeline.toml < environment variables `PIPELINE_<FIELD>`.

    The file is `config_path`, else `$PIPELINE_CONFIG`, else ./pipeline.toml when it exists. `preset`
    overrides `PIPELINE_PRESET`, which overrides the file's `preset` key.
    """
    return load_settings_with_sources(env, config_path, preset)[0]


def load_settings_with_sources(
    env: Mapping[str, str] | None = None, config_path: str | Path | None = None, preset: str | None = None
) -> tuple[Settings, dict[str, str]]:
    """`load_settings()` and, for every field, where its value came from: 'default', "preset 'NAME'",
    "FILE: key 'KEY'" or 'environment variable PIPELINE_KEY'."""
    from pipeline.settings_loader import load

    return load(os.environ if env is None else env, config_path, preset)


def preset_settings(preset: str | None = None) -> Settings:
    """The defaults with `preset` applied; no file and no environment (for `config generate`)."""
    return load_settings(env={}, config_path=None, preset=preset) if preset else Settings()
