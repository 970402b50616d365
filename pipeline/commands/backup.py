"""`pipeline backup` and `pipeline restore`: the results database (and the KV snapshots) on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.commands.common import fail, guarded


def register(app: typer.Typer) -> None:
    app.command("backup")(backup)
    app.command("restore")(restore)


def backup(
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="The backup file (.sqlite3.gz for SQLite, .dump for PostgreSQL); default: a new "
                               "pipeline-<UTC time> file in backups_dir, keeping the newest backups_keep.")] = None,
    kv: Annotated[bool, typer.Option("--kv/--no-kv", help="Also archive the KV snapshots of cache_dir "
                                                         "(a .kv.tar beside the database backup).")] = True,
) -> None:
    """Back up the results database now (beat does it nightly at 03:00). Prints the file."""
    from db.backup import BackupError, backup_database, prune_backups
    from pipeline.kv_backup import archive_snapshots
    from pipeline.settings import load_settings

    def action() -> list[Path]:
        settings = load_settings()
        try:
            path = backup_database(settings.database_url, settings.backups_dir, output=output)
            made = [path]
            if kv:
                archive = archive_snapshots(settings.cache_dir, path)
                made += [archive] if archive is not None else []
            if output is None:
                prune_backups(settings.backups_dir, settings.backups_keep)
        except BackupError as e:
            raise ValueError(str(e)) from None
        return made

    for path in guarded(action):
        typer.echo(str(path))


def restore(
    path: Annotated[Path, typer.Argument(help="A backup file of `pipeline backup`: .sqlite3.gz or .dump (the "
                                              "database), or .kv.tar.gz (the KV snapshots, into cache_dir).")],
    force: Annotated[bool, typer.Option("--force", help="Replace a database that already holds tables.")] = False,
) -> None:
    """Restore a backup into the configured database, which must be empty (a new SQLite file, a new
    PostgreSQL database) unless --force; or KV snapshots into an empty cache_dir. Stop the workers
    and beat first."""
    from db.restore import RestoreError, restore_database
    from pipeline.kv_backup import KV_SUFFIX, restore_snapshots
    from pipeline.settings import load_settings, mask_url

    def action() -> str:
        settings = load_settings()
        if path.name.endswith(KV_SUFFIX):
            count = restore_snapshots(path, settings.cache_dir, force=force)
            return f"{path}: {count} KV snapshots restored into {settings.cache_dir}"
        try:
            restore_database(path, settings.database_url, force=force)
        except RestoreError as e:
            raise ValueError(str(e)) from None
        return f"{path} restored into {mask_url(settings.database_url)}"

    if not path.exists():
        raise fail(f"{path}: no such backup file")
    typer.echo(guarded(action), err=True)
