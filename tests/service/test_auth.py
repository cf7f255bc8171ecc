"""The policy, durations and the authenticator (cache, expiry, rate) on a fake token table.

The fake stands in for the ``tokens`` table only here, to drive the clock; the same paths run
against PostgreSQL in tests/api/test_auth.py and tests/integration/test_tokens.py.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from typing import Any

import pytest

from service.auth import (
    ANONYMOUS,
    Authenticator,
    Needs,
    Principal,
    Scope,
    Target,
    Tokens,
    authorize,
    check,
    cluster_pools,
    generate,
    parse_duration,
    rule_of,
)
from service.config import TOKEN
from service.errors import (
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
)

CTL = Principal("ctl", Scope.ALLOCATE, ("eu1-prod/*",), key_id="0" * 16)


@pytest.mark.parametrize(
    ("principal", "needs", "allowed"),
    [
        (ANONYMOUS, Needs(Scope.ADMIN, None), True),
        (Principal("r", Scope.READ), Needs(Scope.READ, None), True),
        (Principal("r", Scope.READ), Needs(Scope.ALLOCATE, ["p"]), False),
        (Principal("a", Scope.ALLOCATE), Needs(Scope.READ, None), True),
        (Principal("a", Scope.ALLOCATE), Needs(Scope.ADMIN), False),
        (CTL, Needs(Scope.ALLOCATE, ["eu1-prod/pod"]), True),
        (CTL, Needs(Scope.ALLOCATE, ["eu1-prod/ipv4/pod"]), True),  # * crosses /
        (CTL, Needs(Scope.ALLOCATE, ["eu1-prod"]), False),  # the block itself
        (CTL, Needs(Scope.ALLOCATE, ["eu1-prod-x/pod"]), False),
        (CTL, Needs(Scope.ALLOCATE, ["eu1-prod/pod", "us2/pod"]), False),  # every one must match
        (CTL, Needs(Scope.READ, None), False),  # spans every pool
        (CTL, Needs(Scope.READ), True),  # no pool involved (templates)
        (CTL, Needs(Scope.ALLOCATE, ["EU1-PROD/pod"]), False),  # case matters
    ],
)
def test_the_policy(principal: Principal, needs: Needs, *, allowed: bool) -> None:
    """Scopes include the ones below; every pool touched must match a pattern."""
    if allowed:
        authorize(principal, needs)
    else:
        with pytest.raises(PermissionDeniedError):
            authorize(principal, needs)


async def test_check_looks_the_allocation_up_only_for_a_scope_that_could_act() -> None:
    """A read token releasing is refused before any lookup; the controller's is looked up."""
    looked: list[int] = []

    async def pool_of(allocation_id: int) -> str:
        looked.append(allocation_id)
        return "eu1-prod/pod" if allocation_id == 1 else "other"

    reader = Principal("r", Scope.READ, ("eu1-prod/*",))
    with pytest.raises(PermissionDeniedError):
        await check(reader, "ReleasePrefix", lambda _t: 1, pool_of)
    assert looked == []
    await check(CTL, "ReleasePrefix", lambda _t: 1, pool_of)
    with pytest.raises(PermissionDeniedError):
        await check(CTL, "ReleasePrefix", lambda _t: 2, pool_of)
    assert looked == [1, 2]
    await check(CTL, "AllocateNodePrefix", lambda _t: "eu1-prod", pool_of)
    with pytest.raises(PermissionDeniedError):
        await check(CTL, "AllocateNodePrefix", lambda _t: "eu1-prodx", pool_of)
    with pytest.raises(PermissionDeniedError):  # an operation nobody listed: admin only
        await check(CTL, "SomethingNew", lambda _t: None, pool_of)
    assert rule_of("SomethingNew").scope is Scope.ADMIN
    assert rule_of("ListPools").target is Target.EVERY
    assert "eu1/ipv4/egress" in cluster_pools("eu1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90d", dt.timedelta(days=90)),
        ("1w2d", dt.timedelta(days=9)),
        ("12h30m", dt.timedelta(hours=12, minutes=30)),
        ("3600s", dt.timedelta(hours=1)),
        ("3650d", dt.timedelta(days=3650)),
    ],
)
def test_durations(text: str, expected: dt.timedelta) -> None:
    """What --expires takes."""
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0s", "3651d", "90", "1y", "-1d", "1d 2h", "9" * 30 + "w"])
def test_bad_durations_are_refused(text: str) -> None:
    """Never an exception other than a clear invalid-input one."""
    with pytest.raises(InvalidRequestError):
        parse_duration(text)


def test_generated_tokens_are_well_formed_and_unique() -> None:
    """``kipam_<16 hex>_<43 base64url>``; no two alike."""
    made = {generate() for _ in range(200)}
    assert len(made) == 200
    assert all(TOKEN.fullmatch(t) for t in made)


class _FakeTokens:
    """The token table's two calls the authenticator makes, in memory."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.reads = 0
        self.uses = 0
        self.now = dt.datetime(2026, 11, 26, tzinfo=dt.UTC)

    def add(self, name: str, scope: Scope, **row: Any) -> str:
        text = generate()
        found = TOKEN.fullmatch(text)
        assert found is not None
        key_id, secret = found.groups()
        salt = b"s" * 16
        self.rows[key_id] = {
            "salt": salt,
            "hash": hashlib.sha256(salt + secret.encode()).digest(),
            "name": name,
            "scope": scope.value,
            "pools": [],
            "expires_at": None,
            "revoked_at": None,
            "last_used_at": None,
            **row,
        }
        return text

    async def find(self, key_id: str) -> dict[str, Any] | None:
        self.reads += 1
        await asyncio.sleep(0)  # a round trip: other calls run meanwhile
        row = self.rows.get(key_id)
        return None if row is None else {**row, "now": self.now}

    async def used(self, key_id: str) -> None:
        self.uses += 1
        self.rows[key_id]["last_used_at"] = self.now


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _auth(fake: _FakeTokens, clock: _Clock, **kw: Any) -> Authenticator:
    tokens: Tokens = fake  # type: ignore[assignment] # the two methods it calls
    return Authenticator(tokens, required=True, clock=clock, **kw)


async def test_tokens_are_cached_and_revocation_is_seen_after_the_cache() -> None:
    """One read per cache period; a revocation elsewhere shows after it, ``forget`` at once."""
    fake, clock = _FakeTokens(), _Clock()
    auth = _auth(fake, clock, cache_s=5.0)
    text = fake.add("ctl", Scope.ALLOCATE)
    for _ in range(3):
        assert (await auth.authenticate(f"Bearer {text}")).name == "ctl"
    assert fake.reads == 1
    assert fake.uses == 1  # last-used written once
    key_id = next(iter(fake.rows))
    fake.rows[key_id]["revoked_at"] = fake.now
    await auth.authenticate(f"bearer {text}")  # the scheme is case-insensitive; still cached
    clock.t += 5.1
    with pytest.raises(UnauthenticatedError, match="revoked"):
        await auth.authenticate(f"Bearer {text}")
    fake.rows[key_id]["revoked_at"] = None
    clock.t += 5.1
    await auth.authenticate(f"Bearer {text}")
    fake.rows[key_id]["revoked_at"] = fake.now
    auth.forget(key_id)
    with pytest.raises(UnauthenticatedError):
        await auth.authenticate(f"Bearer {text}")


async def test_expired_wrong_and_missing_tokens_are_refused() -> None:
    """Expiry is checked on every call; a right key id with a wrong secret is no token."""
    fake, clock = _FakeTokens(), _Clock()
    auth = _auth(fake, clock, cache_s=60.0)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    old = fake.add("old", Scope.READ, expires_at=past)
    with pytest.raises(UnauthenticatedError, match="expired"):
        await auth.authenticate(f"Bearer {old}")
    good = fake.add("good", Scope.READ)
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    with pytest.raises(UnauthenticatedError, match="not valid"):
        await auth.authenticate(f"Bearer {forged}")
    for value in (None, "", "Bearer", "Token " + good, good):
        with pytest.raises(UnauthenticatedError):
            await auth.authenticate(value)
    open_auth = Authenticator(fake, required=False)  # type: ignore[arg-type]
    assert await open_auth.authenticate("garbage") is ANONYMOUS


async def test_the_rate_limit_is_a_token_bucket_per_token() -> None:
    """``burst`` at once, then ``rate`` a second; the error says when to retry."""
    fake, clock = _FakeTokens(), _Clock()
    auth = _auth(fake, clock, cache_s=60.0, rate=2.0, burst=3)
    busy, calm = fake.add("busy", Scope.READ), fake.add("calm", Scope.READ)
    for _ in range(3):
        await auth.authenticate(f"Bearer {busy}")
    with pytest.raises(RateLimitedError) as limited:
        await auth.authenticate(f"Bearer {busy}")
    assert limited.value.retry_after_s == pytest.approx(0.5)
    await auth.authenticate(f"Bearer {calm}")  # a bucket per token
    clock.t += 0.5
    await auth.authenticate(f"Bearer {busy}")
    with pytest.raises(RateLimitedError):
        await auth.authenticate(f"Bearer {busy}")


async def test_calls_waiting_on_an_expired_cache_entry_read_the_token_once() -> None:
    """32 calls at once with an uncached token: one read of the table, every call admitted."""
    fake, clock = _FakeTokens(), _Clock()
    auth = _auth(fake, clock, cache_s=5.0)
    text = fake.add("busy", Scope.READ)
    principals = await asyncio.gather(*(auth.authenticate(f"Bearer {text}") for _ in range(32)))
    assert {p.name for p in principals} == {"busy"}
    assert fake.reads == 1
    clock.t += 5.1
    await asyncio.gather(*(auth.authenticate(f"Bearer {text}") for _ in range(32)))
    assert fake.reads == 2
