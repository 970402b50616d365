"""Declarative base, constraint naming convention and the portable column types every model uses.

The same models run on SQLite (embedded default) and PostgreSQL (production), and Alembic migrates
both, so each type here is chosen to mean the same thing on both:

- `UTCDateTime`: timezone-aware UTC in Python on both databases (SQLite stores naive UTC text).
- `JSONType`: JSON on SQLite, JSONB on PostgreSQL.
- `IdType`: BIGINT on PostgreSQL, INTEGER on SQLite (only `INTEGER PRIMARY KEY` autoincrements there).
- `str_enum(...)`: a Python enum stored as its string values with a named CHECK constraint, never a
  native PostgreSQL ENUM type (adding a value is a constraint change, not an `ALTER TYPE`).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, Enum, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

# Stable names for every constraint and index, so migrations can refer to them by name on both
# databases (SQLite needs them for batch mode, PostgreSQL to drop or alter them later).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of datetime the models accept)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is timezone-aware UTC in Python whatever the database keeps.

    PostgreSQL stores `timestamptz` and returns it in the session's time zone; SQLite stores text
    without an offset. Values are converted to UTC going in and marked UTC coming out, so comparisons
    inside SQL (`lease_expires_at <= :now`) compare like with like on both. A naive datetime is a
    caller's mistake and is refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime (UTC)")
        value = value.astimezone(timezone.utc)
        # SQLite would format the offset-less text itself; dropping tzinfo makes that explicit.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


JSONType = JSON().with_variant(JSONB(), "postgresql")
IdType = BigInteger().with_variant(Integer(), "sqlite")


def str_enum(enum_cls: type[enum.Enum], name: str, length: int = 16) -> Enum:
    """`enum_cls` stored as its values in a VARCHAR(`length`) with CHECK constraint `ck_<table>_<name>`."""
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=length,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )


class Base(DeclarativeBase):
    """Base class of all models; `Base.metadata` is Alembic's `target_metadata`."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[dict[str, Any]]: JSONType,
    }
