"""API keys (``Authorization: Bearer rlk_<id>_<secret>``), tenants and rate limits.

A key is a public id plus a random secret; only ``sha256(key)`` is stored, so a
leaked database does not leak keys. Each key is bound to one tenant, and every
collection, session and job is looked up within that tenant.

Example:
    >>> key_id, key = create_key(db, tenant="acme")
    >>> authenticate(db, key).tenant
    'acme'
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select

from app.db import ApiKey, Database
from app.errors import ApiError

KEY_PREFIX = "rlk"
LOCAL_TENANT = "local"
_TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,15}$")
_KEY_RE = re.compile(r"^rlk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")


class InvalidKeyRequest(ValueError):
    """A bad tenant name or key id given to the key commands."""


@dataclass(slots=True, frozen=True)
class Principal:
    """Who is calling: the tenant and the key used (``None`` when auth is off)."""

    tenant: str
    key_id: str | None


@dataclass(slots=True, frozen=True)
class KeyInfo:
    """A key as listed (never the secret)."""

    id: str
    tenant: str
    name: str | None
    created_at: float
    revoked: bool


def validate_tenant(tenant: str) -> str:
    """Check a tenant name: 1-16 of ``a-z 0-9 -``, starting with a letter or digit."""
    if not _TENANT_RE.match(tenant):
        raise InvalidKeyRequest(
            f"invalid tenant {tenant!r}: use 1-16 characters from a-z 0-9 -, "
            "starting with a letter or digit"
        )
    return tenant


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: Database, tenant: str, name: str | None = None) -> tuple[str, str]:
    """Make a key for ``tenant``; returns ``(key_id, key)``. The key is shown only once."""
    validate_tenant(tenant)
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    with db.session() as s:
        s.add(ApiKey(id=key_id, tenant=tenant, key_hash=hash_key(key), name=name))
    return key_id, key


def list_keys(db: Database) -> list[KeyInfo]:
    """All keys, oldest first."""
    with db.session() as s:
        rows = s.scalars(select(ApiKey).order_by(ApiKey.created_at)).all()
        return [
            KeyInfo(r.id, r.tenant, r.name, r.created_at, r.revoked_at is not None) for r in rows
        ]


def revoke_key(db: Database, key_id: str) -> None:
    """Revoke a key.

    Raises:
        InvalidKeyRequest: no key has this id.
    """
    with db.session() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise InvalidKeyRequest(f"no API key with id {key_id!r}")
        if row.revoked_at is None:
            row.revoked_at = time.time()


def authenticate(db: Database, key: str) -> Principal:
    """The principal of a presented key.

    Raises:
        ApiError: 401 when the key is malformed, unknown or revoked.
    """
    match = _KEY_RE.match(key)
    if match is None:
        raise ApiError(401, "invalid API key", "invalid_api_key")
    with db.session() as s:
        row = s.get(ApiKey, match.group(1))
        valid = row is not None and hmac.compare_digest(row.key_hash, hash_key(key))
        if row is None or not valid:
            raise ApiError(401, "invalid API key", "invalid_api_key")
        if row.revoked_at is not None:
            raise ApiError(401, "API key revoked", "api_key_revoked")
        return Principal(row.tenant, row.id)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer ...`` header.

    Raises:
        ApiError: 401 when the header is missing or not a bearer token.
    """
    if not authorization:
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer <key>'", "missing_api_key"
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "the Authorization header must be 'Bearer <key>'", "invalid_authorization"
        )
    return token.strip()


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests, refilled continuously.

    Args:
        per_minute: Sustained requests per minute (also the burst size).
    """

    def __init__(self, per_minute: int) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be >= 1, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one token for ``key``.

        Raises:
            ApiError: 429 with ``Retry-After`` (seconds) when the bucket is empty.
        """
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                wait = max(1, int((1.0 - tokens) / self.rate + 0.999))
                self._buckets[key] = (tokens, now)
                raise ApiError(
                    429,
                    f"rate limit of {int(self.capacity)} requests per minute exceeded; "
                    f"retry in {wait} s",
                    "rate_limit_exceeded",
                    headers={"Retry-After": str(wait)},
                )
            self._buckets[key] = (tokens - 1.0, now)
