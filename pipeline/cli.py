"""The `pipeline` command line (Typer). Data goes to stdout, progress and errors to stderr. Commands
import the engine inside their function, so `pipeline --help` starts without loading torch. Each
command group lives in its own module under `pipeline/commands/`."""

from __future__ import annotations

import typer

from pipeline.commands import accounting, backup, control, generate, jobs, monitor, ops, serve, worker
from pipeline.commands.bench import bench_app
from pipeline.commands.cache import cache_app
from pipeline.commands.config import config_app
from pipeline.commands.database import db_app
from pipeline.commands.tenants import key_app, tenant_app

app = typer.Typer(help="Bulk LLM batch inference.", no_args_is_help=True, add_completion=False)
app.add_typer(bench_app, name="bench")
app.add_typer(cache_app, name="cache")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(tenant_app, name="tenant")
app.add_typer(key_app, name="key")
worker.register(app)
jobs.register(app)
control.register(app)
serve.register(app)
ops.register(app)
accounting.register(app)
monitor.register(app)
generate.register(app)
backup.register(app)


@app.callback()
def main() -> None:
    """Bulk LLM batch inference."""

