"""Run the Alembic migrations from code (the CLI, tests, worker start-up).

The database URL is always passed in; it is never read from alembic.ini or a global.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext

from db.session import make_engine

import migrations

# The scripts are found through their package, not the repository layout, so an installed wheel
# (the Docker image) migrates too; alembic.ini exists only in a checkout and is optional.
SCRIPT_LOCATION = Path(migrations.__file__).resolve().parent
ALEMBIC_INI = SCRIPT_LOCATION.parent / "alembic.ini"


def alembic_config(url: str) -> Config:
    """The repository's alembic.ini with `url` as the database and Alembic's logging setup off
    (an application that migrates keeps its own logging configuration)."""
    config = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.exists() else Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    config.attributes["configure_logger"] = False
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at `url` up to `revision` (the latest by default)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Migrate the database at `url` down to `revision` ("base" empties it)."""
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at `url` is at, or None if it was never migrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The revision this release's migrations end at."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
