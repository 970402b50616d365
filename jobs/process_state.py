"""What a worker process builds once and keeps: its settings and its database connection pools.
Light on purpose (no engine, no torch), so that every task module can share them."""

from __future__ import annotations

import functools

from sqlalchemy.orm import Session, sessionmaker

from db.session import make_engine, session_factory
from pipeline.quotas import Quotas
from pipeline.settings import Settings, load_settings


@functools.cache
def worker_settings() -> Settings:
    """The settings of this worker process (pipeline.toml and PIPELINE_* as it started)."""
    return load_settings()


@functools.cache
def worker_sessions(database_url: str) -> sessionmaker[Session]:
    """One connection pool per process and database, shared by the task threads."""
    return session_factory(make_engine(database_url))


@functools.cache
def worker_quotas(settings: Settings) -> Quotas:
    """The quota counters the worker adds each tenant's tokens to (one Redis client per process)."""
    return Quotas.from_settings(settings)
