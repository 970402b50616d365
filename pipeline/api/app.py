"""The ASGI app of `pipeline serve`: routers, error handlers, health; built from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from sqlalchemy import text

from pipeline.api import batches, files
from pipeline.api.context import ServerContext, server_context
from pipeline.api.errors import error_response, install_handlers
from pipeline.api.metrics import install_metrics
from pipeline.quotas import Quotas
from pipeline.settings import Settings


def create_app(settings: Settings, *, send_chunk: Callable[[int, str], None] | None = None) -> FastAPI:
    """The server's app. Chunks go to the Celery queues of `settings.broker_url` unless
    `send_chunk` is given."""
    from db.session import make_engine, session_factory

    engine = make_engine(settings.database_url)
    celery = None
    if send_chunk is None:
        from pipeline.celery_app import chunk_sender, make_celery

        celery = make_celery(settings)
        send_chunk = chunk_sender(celery)
    settings.files_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    quotas = Quotas.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if celery is not None:
            celery.close()
        quotas.close()
        engine.dispose()

    app = FastAPI(title="pipeline: OpenAI-compatible Batch API", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.context = ServerContext(settings, session_factory(engine), send_chunk, quotas)
    install_handlers(app)
    app.state.metrics = install_metrics(app)
    app.include_router(files.router)
    app.include_router(batches.router)

    @app.get("/healthz")
    def healthz(context: ServerContext = Depends(server_context)) -> Any:
        """The server is up and reaches its database (no key needed; says nothing about tenants)."""
        try:
            with context.sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - a health check reports, it does not raise
            return error_response(503, "The database is not reachable.", type="server_error")
        return {"status": "ok"}

    return app
