"""`pipeline serve`: the OpenAI-compatible Batch API for tenants with API keys (pipeline/api/)."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8000,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level: debug, info, warning, error.")] = "info",
) -> None:
    """Serve the Batch API (`/v1/files`, `/v1/batches`) for the `openai` SDK: every request needs
    `Authorization: Bearer KEY` (`pipeline key create`). Put TLS in front of it when it leaves the machine."""
    from pipeline.commands.common import guarded
    from pipeline.settings import load_settings

    def build():
        from pipeline.api.app import create_app

        return create_app(load_settings())

    app = guarded(build)
    import uvicorn

    # The access log shows method, path and status, never headers: keys do not reach it.
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False)
