"""API tokens in PostgreSQL, and the secure defaults ``kipam serve`` applies at start."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import TYPE_CHECKING

import pytest

from service.app import check_auth, use_cases
from service.auth import Scope, Tokens, generate
from service.errors import (
    AlreadyExistsError,
    PreconditionFailedError,
    ResourceNotFoundError,
    ServiceError,
)

if TYPE_CHECKING:
    from service.config import Settings
    from service.store import Database

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_tokens_are_stored_as_salted_hashes_and_revoked(db: Database, clean: None) -> None:
    """Create, list, name taken while live, revoke frees the name, never the secret stored."""
    _ = clean
    tokens = Tokens(db)
    made, text = await tokens.create(
        "eu1-ctl",
        Scope.ALLOCATE,
        pools=["eu1-prod/*", "eu1-prod/*"],
        expires_in=dt.timedelta(days=1),
        created_by="test",
    )
    assert made.pools == ("eu1-prod/*",)
    assert made.state == "active"
    assert made.expires_at is not None
    with pytest.raises(AlreadyExistsError):
        await tokens.create("eu1-ctl", Scope.READ, created_by="test")
    rows = await db.fetch("SELECT * FROM tokens")
    stored = b"".join(bytes(v) if isinstance(v, bytes) else str(v).encode() for v in rows[0])
    secret = text.rsplit("_", 1)[1]
    assert secret.encode() not in stored
    assert text.encode() not in stored
    revoked, _ = await tokens.revoke("eu1-ctl")
    assert revoked.state == "revoked"
    with pytest.raises(ResourceNotFoundError):
        await tokens.revoke("eu1-ctl")
    again, _ = await tokens.create("eu1-ctl", Scope.READ, created_by="test")
    assert again.scope is Scope.READ
    assert [t.state for t in await tokens.list(include_revoked=True)] == ["revoked", "active"]
    assert [t.state for t in await tokens.list()] == ["active"]
    # Two tokens made alike never share a salt or a hash.
    _, second = await tokens.create("other", Scope.READ, created_by="test")
    salts = await db.fetch("SELECT salt, hash FROM tokens")
    assert len({bytes(r["salt"]) for r in salts}) == len(salts)
    assert second != text


async def test_the_database_refuses_what_the_service_would(db: Database, clean: None) -> None:
    """The table's own checks: an admin token has no pools; one live token per name."""
    _ = clean
    with pytest.raises(ServiceError):  # the check constraint, translated
        await db.fetch(
            "INSERT INTO tokens (name, key_id, salt, hash, scope, pools, created_by) "
            "VALUES ('x', '0123456789abcdef', $1, $2, 'admin', '{a/*}', 't')",
            b"s" * 16,
            b"h" * 32,
        )


async def test_serve_refuses_when_nobody_could_call(
    db: Database, settings: Settings, clean: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond loopback (or KIPAM_AUTH=required) without a live token: a clear refusal."""
    _ = clean
    wide = dataclasses.replace(settings, http_addr="[::]:0", grpc_addr="[::]:0")
    assert wide.auth_required
    async with use_cases(wide, db) as res:
        with pytest.raises(PreconditionFailedError, match="kipam token create"):
            await check_auth(res)
        expired, _ = await res.auth.tokens.create(
            "old", Scope.ADMIN, expires_in=dt.timedelta(seconds=1), created_by="t"
        )
        await db.fetch("UPDATE tokens SET expires_at = now() - interval '1 s'")
        with pytest.raises(PreconditionFailedError):  # an expired token does not count
            await check_auth(res)
        assert expired.name == "old"
        await res.auth.tokens.create("ops", Scope.ADMIN, created_by="t")
        await check_auth(res)
    assert not settings.auth_required  # the test settings listen on loopback
    async with use_cases(settings, db) as res:
        with caplog.at_level(logging.WARNING, logger="kipam"):
            await check_auth(res)  # open on loopback, and says so
    assert "authentication is off: kipam listens on loopback only" in caplog.text
    opted_out = dataclasses.replace(wide, auth="off")
    async with use_cases(opted_out, db) as res:
        with caplog.at_level(logging.WARNING, logger="kipam"):
            await check_auth(res)
    assert "authentication is OFF" in caplog.text


async def test_the_bootstrap_token_is_stored_once_and_stays_revoked(
    db: Database, settings: Settings, clean: None
) -> None:
    """KIPAM_BOOTSTRAP_TOKEN becomes admin token `bootstrap`, unless its key is known."""
    _ = clean
    text = generate()
    boot = dataclasses.replace(settings, auth="required", bootstrap_token=text)
    async with use_cases(boot, db) as res:
        await check_auth(res)  # stored, so the start is allowed
        principal = await res.auth.authenticate(f"Bearer {text}")
        assert (principal.name, principal.scope) == ("bootstrap", Scope.ADMIN)
        await check_auth(res)  # a restart: nothing more
        assert len(await res.auth.tokens.list()) == 1
        await res.auth.tokens.revoke("bootstrap")
        assert not await res.auth.tokens.bootstrap(text)  # revoked stays revoked
        with pytest.raises(PreconditionFailedError):
            await check_auth(res)
