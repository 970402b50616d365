"""What the server holds for its whole life: settings, database sessions, the Celery sender."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from pipeline.quotas import Quotas
from pipeline.settings import Settings


@dataclass(frozen=True, slots=True)
class ServerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    send_chunk: Callable[[int, str], None]
    quotas: Quotas


def server_context(request: Request) -> ServerContext:
    """The context of the app serving `request` (a FastAPI dependency)."""
    return request.app.state.context
