"""`pipeline cache`: every live worker's KV cache, through Celery remote control (a broadcast each
worker answers for its own cache; `pipeline.celery_app` registers the commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from pipeline.commands.common import JsonOption, fail, guarded, sessions

if TYPE_CHECKING:
    from pipeline.job_prefixes import JobPrefixes

cache_app = typer.Typer(help="The workers' KV caches: stats, warm, pin, unpin, clear, persist.",
                        no_args_is_help=True)
PING_S = 2.0  # how long live workers have to answer the ping that counts them
TimeoutOption = Annotated[float, typer.Option(
    min=0.1, help="Seconds to wait for the workers' answers (warming a large file takes longer).")]
# Cached blocks are hashed under their tenant's salt: warmed prompts are hits for that tenant only.
TenantOption = Annotated[Optional[str], typer.Option(
    help="The tenant whose jobs the prompts are for (their cache hits); default: 'default' (with --job: the job's).")]
FileArgument = Annotated[Optional[Path], typer.Argument(help="A JSONL or Parquet request file; its prompts are used.")]
JobOption = Annotated[Optional[str], typer.Option(
    "--job", help="Instead of FILE: the system prompts of this job's chat lines and the prompt starts its "
                  "completion lines share, for the job's tenant.")]
MaxPromptsOption = Annotated[int, typer.Option(
    min=1, help="With --job: at most this many prefixes, those the most lines share first.")]


@cache_app.callback()
def cache() -> None:
    """The KV caches of the live workers (each answers for its own)."""


@cache_app.command("stats")
def cache_stats(as_json: JsonOption = False, timeout: TimeoutOption = 10.0) -> None:
    """Per worker: blocks used, free, cached and pinned, and the prefix cache's hit rate."""
    replies = _broadcast("cache_stats", {}, timeout)
    if as_json:
        typer.echo(json.dumps(replies, indent=2))
        return
    typer.echo(f"{'worker':<32} {'used':>7} {'free':>7} {'cached':>7} {'pinned':>7} {'hit rate':>9}")
    for node, r in replies.items():
        if "error" in r:
            typer.echo(f"{node:<32} error: {r['error']}")
            continue
        typer.echo(f"{node:<32} {r['num_used_blocks']:>7} {r['num_free_blocks']:>7} {r['num_cached_blocks']:>7} "
                   f"{r['num_pinned_blocks']:>7} {r['prefix_cache_hit_rate']:>8.1%}")


@cache_app.command("warm")
def cache_warm(file: FileArgument = None, job: JobOption = None, tenant: TenantOption = None,
               max_prompts: MaxPromptsOption = 64, as_json: JsonOption = False, timeout: TimeoutOption = 300.0) -> None:
    """Prefill the prompts of FILE (or the shared prefixes of --job JOB) on every live worker, so
    they are cached for the tenant's jobs."""
    prompts, tenant = _prompts_for(file, job, tenant, max_prompts)
    _report(_broadcast("cache_warm", {"prompts": prompts, "tenant": tenant}, timeout), as_json)


@cache_app.command("pin")
def cache_pin(file: FileArgument = None, job: JobOption = None, tenant: TenantOption = None,
              max_prompts: MaxPromptsOption = 64, as_json: JsonOption = False, timeout: TimeoutOption = 300.0) -> None:
    """Prefill and pin the prompts of FILE (or the shared prefixes of --job JOB) on every live
    worker: their blocks are never evicted. Refused on a worker (nothing pinned there) past
    max_pinned_fraction of its pool."""
    prompts, tenant = _prompts_for(file, job, tenant, max_prompts)
    _report(_broadcast("cache_pin", {"prompts": prompts, "tenant": tenant}, timeout), as_json)


@cache_app.command("unpin")
def cache_unpin(file: FileArgument = None, job: JobOption = None, tenant: TenantOption = None,
                max_prompts: MaxPromptsOption = 64, as_json: JsonOption = False, timeout: TimeoutOption = 30.0) -> None:
    """Unpin the prompts of FILE (or the shared prefixes of --job JOB); with neither, every pinned
    block. They become evictable again."""
    arguments: dict[str, Any] = {}
    if file is not None or job is not None:
        prompts, tenant = _prompts_for(file, job, tenant, max_prompts)
        arguments = {"prompts": prompts, "tenant": tenant}
    _report(_broadcast("cache_unpin", arguments, timeout), as_json)


@cache_app.command("clear")
def cache_clear(unpin: Annotated[bool, typer.Option("--unpin", help="Drop pinned blocks too.")] = False,
                as_json: JsonOption = False, timeout: TimeoutOption = 30.0) -> None:
    """Drop every cached prefix no running request holds (pinned ones stay unless --unpin)."""
    _report(_broadcast("cache_clear", {"unpin": unpin}, timeout), as_json)


@cache_app.command("persist")
def cache_persist(as_json: JsonOption = False, timeout: TimeoutOption = 120.0) -> None:
    """Write a KV snapshot on every live worker now (each into its own folder under cache_dir)."""
    _report(_broadcast("cache_persist", {}, timeout), as_json)


def _prompts_for(file: Path | None, job: str | None, tenant: str | None,
                 max_prompts: int) -> tuple[list[dict[str, Any]], str]:
    """The warm prompts and the tenant they are hashed for, from FILE or from --job's lines."""
    from db.repository.tenants import DEFAULT_TENANT
    from jobs.kv_cache_host import read_prompts

    if file is not None and job is not None:
        raise fail("give FILE or --job, not both")
    if job is None:
        if file is None:
            raise fail("give a request FILE or --job JOB")
        prompts = guarded(lambda: read_prompts(file))
        if not prompts:
            raise fail(f"{file}: no prompts")
        return prompts, tenant or DEFAULT_TENANT
    if tenant is not None:
        raise fail("--tenant does not go with --job: the job's prefixes are cached for the job's own tenant")
    found, job_tenant = guarded(lambda: _job_prefixes(job, max_prompts))
    if not found.prompts:
        raise fail(f"job {job} has no system prompt and no prompt start shared by its lines; nothing to cache")
    more = f"; {found.left_out} less shared ones left out (--max-prompts)" if found.left_out else ""
    count = len(found.prompts)
    typer.echo(f"job {job} (tenant {job_tenant}): {count} shared prefix{'es' if count > 1 else ''}; lines starting "
               f"with each: {', '.join(map(str, found.lines_sharing))} (of {found.lines_read}){more}", err=True)
    return found.prompts, job_tenant


def _job_prefixes(job_id: str, limit: int) -> tuple[JobPrefixes, str]:
    from db.repository.jobs import get_job
    from db.repository.requests import iter_prompt_bodies
    from db.tenants import Tenant
    from pipeline.job_prefixes import job_prefixes
    from pipeline.settings import load_settings

    with sessions(load_settings().database_url)() as session:
        job = get_job(session, job_id)
        if job is None:
            raise ValueError(f"no job {job_id!r}; `pipeline list` shows the jobs")
        tenant = session.get(Tenant, job.tenant_id)
        return job_prefixes(iter_prompt_bodies(session, job_id), limit), tenant.name


def _broadcast(command: str, arguments: dict[str, Any], timeout: float) -> dict[str, dict[str, Any]]:
    """{worker: its answer} for `command`, from every worker that answered within `timeout`."""
    from pipeline.celery_app import make_celery
    from pipeline.settings import load_settings
    from pipeline.worker_registry import expected_answers_at

    def ask() -> dict[str, dict[str, Any]]:
        settings = load_settings()
        app = make_celery(settings)
        try:
            # A broadcast cannot know how many workers will answer, so it waits out its timeout;
            # counting the live workers first (a ping) lets it return once each has answered. The
            # ping itself returns once the registered workers have answered.
            limit = expected_answers_at(settings.broker_url, settings.redis_key_prefix)
            live = app.control.ping(timeout=PING_S, limit=limit) or []
            if not live:
                return {}
            replies = app.control.broadcast(command, arguments=arguments, reply=True, timeout=timeout,
                                            limit=len(live))
        finally:
            app.close()
        return {node: answer for reply in replies or [] for node, answer in reply.items()}

    answers = guarded(ask)
    if not answers:
        raise fail(f"no worker answered {command} within {timeout:g} s; is a worker running against this broker "
                   "(`celery -A pipeline.celery_app inspect ping`)? A long warm may need a larger --timeout")
    return dict(sorted(answers.items()))


def _report(replies: dict[str, dict[str, Any]], as_json: bool) -> None:
    """Each worker's answer on stdout; exit 1 when any worker refused."""
    if as_json:
        typer.echo(json.dumps(replies, indent=2))
    else:
        for node, answer in replies.items():
            if "error" in answer:
                typer.echo(f"{node}: error: {answer['error']}")
            else:
                typer.echo(f"{node}: " + ", ".join(f"{k}={v}" for k, v in answer.items()))
    if any("error" in answer for answer in replies.values()):
        failed = sorted(node for node, answer in replies.items() if "error" in answer)
        raise fail(f"{len(failed)} of {len(replies)} workers refused: {', '.join(failed)}")
