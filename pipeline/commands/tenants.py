"""`pipeline tenant create | list | quota | disable | enable` and `pipeline key create | list | revoke`: the
administrator's commands for tenants and their API keys. They talk to the database directly (the
operator's path, as `submit` is); the API server only checks what they store.

A new key is printed once, on stdout, and stored only as its SHA-256: it never reaches stderr, a
log or the database in clear, and it cannot be shown again (create another and revoke the old).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer

from pipeline.commands.common import JsonOption, guarded, sessions

tenant_app = typer.Typer(help="Tenants: who may use the API server, with their quotas.", no_args_is_help=True)
key_app = typer.Typer(help="API keys of tenants (shown once, stored hashed).", no_args_is_help=True)

TenantArgument = Annotated[str, typer.Argument(help="The tenant's name (letters, digits, '_', '.', '-').")]


@tenant_app.callback()
def tenant() -> None:
    """Tenants: jobs, files, sessions and prefix-cache blocks are each tenant's own."""


@key_app.callback()
def key() -> None:
    """API keys: `Authorization: Bearer KEY` on every request to `pipeline serve`."""


@tenant_app.command("create")
def tenant_create(
    name: TenantArgument,
    requests_per_minute: Annotated[int | None, typer.Option(
        min=1, help="API requests per minute (token bucket); default: unlimited.")] = None,
    max_active_batches: Annotated[int | None, typer.Option(
        min=1, help="Batches validating or in progress at once; default: unlimited.")] = None,
    tokens_per_day: Annotated[int | None, typer.Option(
        min=1, help="Prompt and completion tokens per UTC day; default: unlimited.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create a tenant, with a fresh cache salt and optional quotas."""
    from db.repository import create_tenant, get_tenant
    from pipeline.settings import load_settings

    def action() -> dict[str, Any]:
        with sessions(load_settings().database_url).begin() as session:
            if get_tenant(session, name) is not None:
                raise ValueError(f"tenant {name!r} exists already; `pipeline tenant list` shows it")
            return _tenant_row(create_tenant(session, name, requests_per_minute=requests_per_minute,
                                             tokens_per_day=tokens_per_day, max_active_jobs=max_active_batches))

    row = guarded(action)
    typer.echo(json.dumps(row, indent=2) if as_json else row["name"])


@tenant_app.command("list")
def tenant_list(as_json: JsonOption = False) -> None:
    """Every tenant, by name, with its quotas and whether it is disabled."""
    from db.repository import list_tenants
    from pipeline.settings import load_settings

    def action() -> list[dict[str, Any]]:
        with sessions(load_settings().database_url)() as session:
            return [_tenant_row(t) for t in list_tenants(session)]

    rows = guarded(action)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(_tenant_line(row))


@tenant_app.command("disable")
def tenant_disable(name: TenantArgument) -> None:
    """Disable a tenant: its keys are refused (403) and it can submit nothing; its jobs are kept."""
    from db.repository import disable_tenant

    _change_tenant(name, disable_tenant, "disabled")


@tenant_app.command("enable")
def tenant_enable(name: TenantArgument) -> None:
    """Enable a disabled tenant again: its keys that were not revoked work again."""
    from db.repository import enable_tenant

    _change_tenant(name, enable_tenant, "enabled")


def _change_tenant(name: str, change: Any, done: str) -> None:
    """`change(session, name)` in one transaction, then `tenant NAME <done>` on stderr."""
    from pipeline.settings import load_settings

    def action() -> None:
        with sessions(load_settings().database_url).begin() as session:
            change(session, name)

    guarded(action)
    typer.echo(f"tenant {name} {done}", err=True)


@tenant_app.command("quota")
def tenant_quota(
    name: TenantArgument,
    requests_per_minute: Annotated[str | None, typer.Option(
        metavar="N|unlimited", help="API requests per minute (token bucket).")] = None,
    max_active_batches: Annotated[str | None, typer.Option(
        metavar="N|unlimited", help="Batches validating or in progress at once.")] = None,
    tokens_per_day: Annotated[str | None, typer.Option(
        metavar="N|unlimited", help="Prompt and completion tokens per UTC day.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Change a tenant's quotas (those given; the others stay). They apply from its next request;
    a running batch is never stopped."""
    from db.repository import set_tenant_quotas
    from pipeline.settings import load_settings

    given = {"requests_per_minute": ("--requests-per-minute", requests_per_minute),
             "max_active_jobs": ("--max-active-batches", max_active_batches),
             "tokens_per_day": ("--tokens-per-day", tokens_per_day)}

    def action() -> dict[str, Any]:
        changes = {column: _quota_value(option, text) for column, (option, text) in given.items() if text is not None}
        if not changes:
            raise ValueError("nothing to change: give --requests-per-minute, --max-active-batches or "
                             "--tokens-per-day (a number, or 'unlimited')")
        with sessions(load_settings().database_url).begin() as session:
            return _tenant_row(set_tenant_quotas(session, name, changes))

    row = guarded(action)
    typer.echo(json.dumps(row, indent=2) if as_json else _tenant_line(row))


def _quota_value(option: str, text: str) -> int | None:
    if text.strip().lower() == "unlimited":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected a whole number of at least 1, or 'unlimited'") from None
    if value < 1:
        raise ValueError(f"{option} {value}: expected a whole number of at least 1, or 'unlimited'")
    return value


@key_app.command("create")
def key_create(
    tenant_name: Annotated[str, typer.Option("--tenant", help="The tenant the key belongs to.")],
    label: Annotated[str | None, typer.Option("--name", help="A label for people, e.g. 'nightly evals'.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='{"id", "key", "tenant"} instead of the key alone.')] = False,
) -> None:
    """Create an API key and print it, once: only its hash is stored."""
    from db.repository import create_api_key, require_tenant
    from pipeline.settings import load_settings

    def action() -> tuple[str, str]:
        with sessions(load_settings().database_url).begin() as session:
            owner = require_tenant(session, tenant_name)
            if owner.is_disabled:
                raise ValueError(f"tenant {tenant_name!r} is disabled; its keys would be refused")
            row, secret = create_api_key(session, owner.id, name=label)
            return row.id, secret

    key_id, secret = guarded(action)
    if as_json:
        typer.echo(json.dumps({"id": key_id, "key": secret, "tenant": tenant_name}))
    else:
        typer.echo(secret)
        typer.echo(f"key {key_id} of tenant {tenant_name}: shown once, store it now", err=True)


@key_app.command("list")
def key_list(
    tenant_name: Annotated[str, typer.Option("--tenant", help="Whose keys.")],
    as_json: JsonOption = False,
) -> None:
    """A tenant's keys: ids, labels, creation and revocation times (never the keys themselves)."""
    from db.repository import list_api_keys, require_tenant
    from pipeline.settings import load_settings

    def action() -> list[dict[str, Any]]:
        with sessions(load_settings().database_url)() as session:
            owner = require_tenant(session, tenant_name)
            return [{"id": k.id, "name": k.name, "created_at": _iso(k.created_at), "revoked_at": _iso(k.revoked_at)}
                    for k in list_api_keys(session, owner.id)]

    rows = guarded(action)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        typer.echo(f"{row['id']}  {state}  created {row['created_at']}  {row['name'] or ''}".rstrip())


@key_app.command("revoke")
def key_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (`pipeline key list`), not the key.")]) -> None:
    """Revoke a key: requests with it are refused (401) from now on."""
    from db.repository import revoke_api_key
    from pipeline.settings import load_settings

    def action() -> None:
        with sessions(load_settings().database_url).begin() as session:
            if not revoke_api_key(session, key_id):
                raise ValueError(f"no active key {key_id!r}; `pipeline key list --tenant NAME` shows the ids")

    guarded(action)
    typer.echo(f"key {key_id} revoked", err=True)


def _tenant_row(tenant: Any) -> dict[str, Any]:
    return {"id": tenant.id, "name": tenant.name, "requests_per_minute": tenant.requests_per_minute,
            "max_active_batches": tenant.max_active_jobs, "tokens_per_day": tenant.tokens_per_day,
            "created_at": _iso(tenant.created_at), "disabled_at": _iso(tenant.disabled_at)}


def _tenant_line(row: dict[str, Any]) -> str:
    quotas = ", ".join(f"{name} {row[name] if row[name] is not None else 'unlimited'}"
                       for name in ("requests_per_minute", "max_active_batches", "tokens_per_day"))
    return f"{row['name']}  {'disabled' if row['disabled_at'] else 'active'}  {quotas}"


def _iso(stamp: datetime | None) -> str | None:
    return None if stamp is None else stamp.isoformat()
