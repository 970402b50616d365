"""`pipeline cache`: every live worker's KV cache, through Celery remote control (a broadcast each
worker answers for its own cache; `pipeline.celery_app` registers the commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from pipeline.commands.common import JsonOption, fail, guarded

cache_app = typer.Typer(help="The workers' KV caches: stats, warm, pin, unpin, clear, persist.",
                        no_args_is_help=True)
PING_S = 2.0  # how long live workers have to answer the ping that counts them
TimeoutOption = Annotated[float, typer.Option(
    min=0.1, help="Seconds to wait for the workers' answers (warming a large file takes longer).")]
# Cached blocks are hashed under their tenant's salt: warmed prompts are hits for that tenant only.
TenantOption = Annotated[str, typer.Option(help="The tenant whose jobs the prompts are for (their cache hits).")]


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
def cache_warm(file: Annotated[Path, typer.Argument(help="A JSONL or Parquet request file; its prompts are prefilled.")],
               tenant: TenantOption = "default", as_json: JsonOption = False, timeout: TimeoutOption = 300.0) -> None:
    """Prefill the prompts of FILE on every live worker, so their prefixes are cached for TENANT's jobs."""
    _report(_broadcast("cache_warm", {"prompts": _prompts(file), "tenant": tenant}, timeout), as_json)


@cache_app.command("pin")
def cache_pin(file: Annotated[Path, typer.Argument(help="A JSONL or Parquet request file.")],
              tenant: TenantOption = "default", as_json: JsonOption = False, timeout: TimeoutOption = 300.0) -> None:
    """Prefill and pin the prompts of FILE for TENANT's jobs on every live worker: their blocks are
    never evicted. Refused on a worker (nothing pinned there) past max_pinned_fraction of its pool."""
    _report(_broadcast("cache_pin", {"prompts": _prompts(file), "tenant": tenant}, timeout), as_json)


@cache_app.command("unpin")
def cache_unpin(file: Annotated[Optional[Path], typer.Argument(help="The prompts to unpin; none: every pin.")] = None,
                tenant: TenantOption = "default", as_json: JsonOption = False, timeout: TimeoutOption = 30.0) -> None:
    """Unpin the prompts of FILE pinned for TENANT (every pinned block without FILE); they become
    evictable again."""
    arguments = {} if file is None else {"prompts": _prompts(file), "tenant": tenant}
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


def _prompts(file: Path) -> list[dict[str, Any]]:
    from jobs.kv_cache_host import read_prompts

    prompts = guarded(lambda: read_prompts(file))
    if not prompts:
        raise fail(f"{file}: no prompts")
    return prompts


def _broadcast(command: str, arguments: dict[str, Any], timeout: float) -> dict[str, dict[str, Any]]:
    """{worker: its answer} for `command`, from every worker that answered within `timeout`."""
    from pipeline.celery_app import make_celery
    from pipeline.settings import load_settings

    def ask() -> dict[str, dict[str, Any]]:
        app = make_celery(load_settings())
        try:
            # A broadcast cannot know how many workers will answer, so it waits out its timeout;
            # counting the live workers first (a ping) lets it return once each has answered.
            live = app.control.ping(timeout=PING_S) or []
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
