"""Operations commands: `pipeline stats` (the fleet over a window) and `pipeline health` (a probe)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from pipeline.commands.common import JsonOption, fail, guarded, sessions

SinceOption = Annotated[str, typer.Option("--since", help="Window: '90s', '30m', '1h', '7d'.")]


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)
    app.command("health")(health)


def stats(since: SinceOption = "1h", as_json: JsonOption = False) -> None:
    """The fleet over a window: lines/s, tokens/s, prefix-cache hit rate, latency, TTFT and queue-wait
    percentiles, queue depths, running jobs and each live worker's KV cache."""
    import redis

    from pipeline.celery_app import make_celery
    from pipeline.fleet import worker_reports
    from pipeline.fleet_stats import fleet_stats
    from pipeline.settings import duration_s, load_settings, mask_url
    from pipeline.worker_registry import expected_answers

    def action() -> dict[str, Any]:
        settings = load_settings()
        window = duration_s(since)
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            workers = worker_reports(make_celery(settings), timeout_s=1.0,
                                     expected=expected_answers(client, settings.redis_key_prefix))
            return fleet_stats(sessions(settings.database_url), client, settings.redis_key_prefix, workers, window)
        except redis.RedisError as e:
            raise ValueError(f"cannot reach Redis at {mask_url(settings.broker_url)}: {e}") from None
        finally:
            client.close()

    data = guarded(action)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    from pipeline.views import console, stats_view

    console().print(stats_view(data))


def health(
    as_json: JsonOption = False,
    worker: Annotated[Optional[str], typer.Option(
        "--worker", help="Check only this worker node (e.g. celery@$HOSTNAME) and the broker.")] = None,
    beat: Annotated[bool, typer.Option("--beat", help="Check only beat and the broker.")] = False,
    timeout: Annotated[float, typer.Option(min=0.1, max=60, help="Seconds to wait for workers to answer.")] = 2.0,
) -> None:
    """Broker, database, beat and every worker: exit 0 when all are healthy, 1 when not (a probe)."""
    import redis

    from pipeline.celery_app import make_celery
    from pipeline.health_check import run_checks
    from pipeline.settings import load_settings

    if worker is not None and beat:
        raise fail("--worker and --beat each pick one thing to check; give one of them")

    def action():
        settings = load_settings()
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
        try:
            return run_checks(settings, make_celery(settings), client, worker=worker, beat_only=beat,
                              timeout_s=timeout)
        finally:
            client.close()

    checks = guarded(action)
    healthy = all(c.ok for c in checks)
    if as_json:
        typer.echo(json.dumps({"healthy": healthy, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for c in checks:
            typer.echo(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
    if not healthy:
        raise typer.Exit(1)
