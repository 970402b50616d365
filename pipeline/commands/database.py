"""`pipeline db`: the results database."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.commands.common import guarded

db_app = typer.Typer(help="The results database.", no_args_is_help=True)


@db_app.callback()
def db() -> None:
    """The results database (PIPELINE_DATABASE_URL; SQLite by default)."""


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Alembic revision to migrate to.")] = "head",
) -> None:
    """Apply the schema migrations to the configured database (SQLite or PostgreSQL)."""
    from alembic.util import CommandError

    from db.migrate import current, upgrade
    from pipeline.settings import load_settings, mask_url

    def action() -> str:
        settings = load_settings()
        try:
            upgrade(settings.database_url, revision)
        except CommandError as e:  # an unknown revision, asked for or found in the database (a newer release's)
            raise ValueError(f"cannot migrate: {e}; give `head` or a revision of this release") from None
        return f"{mask_url(settings.database_url)} is at revision {current(settings.database_url)}"

    # A database that is down (or refuses the login) is the same one line as in every other command.
    typer.echo(guarded(action), err=True)
