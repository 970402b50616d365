"""`pipeline db`: the results database."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.commands.common import guarded

db_app = typer.Typer(help="The results database.", no_args_is_help=True)


@db_app.callback()
def db() -> None:
    """The results database (PIPELINE_DATABASE_URL; SQLite by default)."""


WAIT_POLL_S = 2.0


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Alembic revision to migrate to.")] = "head",
    wait: Annotated[int, typer.Option(min=0, help="Seconds to keep trying while the database refuses "
                                             "connections (a server still starting, as in docker compose).")] = 0,
) -> None:
    """Apply the schema migrations to the configured database (SQLite or PostgreSQL)."""
    from alembic.util import CommandError

    from db.migrate import current
    from pipeline.settings import load_settings, mask_url

    def action() -> str:
        settings = load_settings()
        try:
            _upgrade_when_reachable(settings.database_url, revision, wait, mask_url(settings.database_url))
        except CommandError as e:  # an unknown revision, asked for or found in the database (a newer release's)
            raise ValueError(f"cannot migrate: {e}; give `head` or a revision of this release") from None
        return f"{mask_url(settings.database_url)} is at revision {current(settings.database_url)}"

    # A database that is down (or refuses the login) is the same one line as in every other command.
    typer.echo(guarded(action), err=True)


def _upgrade_when_reachable(url: str, revision: str, wait_s: int, shown_url: str) -> None:
    """`upgrade`, tried again every WAIT_POLL_S while the server refuses connections (a transient
    error, `db.retry.is_transient`), until `wait_s` has passed; the last error propagates."""
    import time

    from sqlalchemy.exc import DBAPIError

    from db.migrate import upgrade
    from db.retry import is_transient

    deadline = time.monotonic() + wait_s
    while True:
        try:
            upgrade(url, revision)
            return
        except DBAPIError as e:
            if not is_transient(e) or time.monotonic() >= deadline:
                raise
            reason = str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else type(e.orig).__name__
            typer.echo(f"waiting for the database at {shown_url}: {reason}", err=True)
            time.sleep(WAIT_POLL_S)
