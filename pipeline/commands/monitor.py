"""`pipeline monitor`: a live terminal dashboard (rich Live, redrawn in place; `q` quits): running
jobs with their rate and ETA, queues, workers, hit rate and tokens/s, refreshed every `--interval`."""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Annotated, Any

import typer

from pipeline.commands.common import fail, guarded, sessions

WINDOW_S = 60  # throughput and hit rate over the last minute: what "now" means on a dashboard


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor)


def monitor(
    interval: Annotated[float, typer.Option(min=0.2, max=60, help="Seconds between refreshes.")] = 1.0,
) -> None:
    """A live dashboard of jobs, queues and workers; press q to quit."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise fail("pipeline monitor needs a terminal; in scripts use `pipeline stats --json`")
    import redis
    from rich.console import Console
    from rich.live import Live

    from pipeline.celery_app import make_celery
    from pipeline.settings import load_settings

    settings = guarded(load_settings)
    factory = sessions(settings.database_url)
    app = make_celery(settings)
    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)
    console = Console()
    try:
        with _keys() as pressed, Live(console=console, auto_refresh=False, transient=False) as live:
            while True:
                live.update(guarded(lambda: _frame(factory, client, settings.redis_key_prefix, app)), refresh=True)
                if pressed(interval) == "q":
                    break
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def _frame(factory: Any, client: Any, key_prefix: str, app: Any) -> Any:
    from rich.console import Group
    from rich.text import Text

    import redis

    from db.base import utcnow
    from pipeline.fleet import worker_reports
    from pipeline.fleet_stats import fleet_stats
    from pipeline.worker_registry import expected_answers
    from pipeline.views import jobs_table, queues_table, throughput_table, workers_table

    try:
        workers = worker_reports(app, timeout_s=0.5, expected=expected_answers(client, key_prefix))
        data = fleet_stats(factory, client, key_prefix, workers, WINDOW_S)
    except redis.RedisError as e:
        return Text(f"cannot reach Redis: {e} (retrying; q quits)")
    now = utcnow()
    for job in data["running_jobs"]:
        add_rate_and_eta(job, now)
    title = Text(f"pipeline monitor  {time.strftime('%H:%M:%S')}  (q quits)", style="bold")
    return Group(title, jobs_table(data["running_jobs"]), queues_table(data["queues"]), throughput_table(data),
                 workers_table(data["workers"]))


def add_rate_and_eta(job: dict[str, Any], now: datetime) -> None:
    """Set a running job's `lines_per_s` and `eta_s` (None for both before its first results).

    The rate is lines done since the job was submitted: the span of its results alone is near zero
    while one chunk has finished (a chunk's results are written at once), which made the rate absurd
    just when the first figures appear."""
    from pipeline.job_stats import eta_s

    done = job["completed"] + job["failed"]
    elapsed = (now - datetime.fromisoformat(job["created_at"])).total_seconds()
    rate = done / elapsed if done and elapsed > 0 else None
    job["lines_per_s"] = rate
    job["eta_s"] = eta_s(job["total"] - done, rate)


@contextmanager
def _keys() -> Iterator[Callable[[float], str | None]]:
    """`pressed(timeout)`: the key typed within `timeout` seconds, or None. The terminal is in cbreak
    mode meanwhile (keys arrive unbuffered and unechoed) and restored after."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def pressed(timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                key = os.read(fd, 1).decode(errors="replace").lower()
                if key == "q":
                    return key
        return None

    try:
        yield pressed
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
