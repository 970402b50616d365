"""`pipeline db`: the results database."""

from __future__ import annotations

from typing import Annotated

import typer


db_app = typer.Typer(help="The results database.", no_args_is_help=True)


@db_app.callback()
def db() -> None:
    """The results database (PIPELINE_DATABASE_URL; SQLite by default)."""


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Alembic revision to migrate to.")] = "head",
) -> None:
    """Apply the schema migrations to the configured database (SQLite or PostgreSQL)."""
    from db.migrate import current, upgrade
    from pipeline.settings import load_settings, mask_url

    try:
        settings = load_settings()
        upgrade(settings.database_url, revision)
        typer.echo(f"{mask_url(settings.database_url)} is at revision {current(settings.database_url)}", err=True)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None

