"""CLI commands: ``ragloom keys create --tenant T | list | revoke ID``.

Keys live (hashed) in the API database (``RAGLOOM_API__DATABASE_URL``, default
``api.sqlite`` in the data folder); a new key is printed once and never again.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli._common import fail, load_settings

if TYPE_CHECKING:
    from app.db import Database

keys_app = typer.Typer(name="keys", help="Create, list and revoke API keys.", no_args_is_help=True)


def _db() -> Database:
    from app.db import Database
    from app.main import database_url

    return Database(database_url(load_settings()))


@keys_app.command("create")
def create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to (a-z 0-9 -).")],
    name: Annotated[str | None, typer.Option(help="A note, e.g. who uses it.")] = None,
) -> None:
    """Create a key for TENANT and print it (shown only once)."""
    from app.auth import InvalidKeyRequest, create_key

    try:
        key_id, key = create_key(_db(), tenant, name)
    except InvalidKeyRequest as exc:
        fail(str(exc))
    typer.echo(f"id: {key_id}\ntenant: {tenant}\nkey: {key}")
    typer.echo("store the key now; it cannot be shown again", err=True)


@keys_app.command("list")
def list_() -> None:
    """List keys (id, tenant, created, status); never the secrets."""
    from app.auth import list_keys

    keys = list_keys(_db())
    if not keys:
        typer.echo("no keys")
    for k in keys:
        created = dt.datetime.fromtimestamp(k.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
        status = "revoked" if k.revoked else "active"
        typer.echo(f"{k.id}\t{k.tenant}\t{created}\t{status}\t{k.name or ''}")


@keys_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key id (from `keys list`).")]) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    from app.auth import InvalidKeyRequest, revoke_key

    try:
        revoke_key(_db(), key_id)
    except InvalidKeyRequest as exc:
        fail(str(exc))
    typer.echo(f"revoked {key_id}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(keys_app, name="keys")
