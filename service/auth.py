"""Who may do what: API tokens, their scopes and pool patterns, and the one policy function.

Tokens
    ``kipam_<key id>_<secret>``: 16 hex digits that find the token's row, and 256 random bits
    (base64url) checked against the row's salted SHA-256 hash with a constant-time compare.
    The secret is shown once, when the token is created, and never stored; a secret of 256
    random bits needs no slow password hash. Tokens have a name (the actor in the history of
    every change they make), a scope, optional pool patterns, an optional expiry, and a
    last-used time (written at most once a minute per replica). Revoked tokens stay, for
    the audit trail; their name may be used again.

Scopes
    ``read`` < ``allocate`` < ``admin``: each includes the ones before it. ``read`` reads
    pools, allocations, clusters and history; ``allocate`` also takes and releases prefixes
    (allocations, cluster nodes, Service and egress addresses); ``admin`` also creates and
    deletes pools, clusters and templates, and manages tokens.

Pool patterns
    A ``read`` or ``allocate`` token may be limited to pools whose names match one of its
    patterns (shell-style: ``eu1-prod/*`` matches ``eu1-prod/pod`` and ``eu1-prod/ipv4/pod``;
    ``*`` crosses ``/``). Such a token may only call operations on named pools (or a named
    cluster, whose pools are ``<cluster>/<role>``): every pool the operation touches must
    match. Operations across every pool (listing pools, looking an address up, history or
    a watch without a pool) need a token that is not limited.

:func:`authorize` is the policy; each transport calls it in one place (a Litestar guard,
:mod:`service.rest.guard`; a gRPC interceptor, :mod:`service.grpc.auth`) with what the
operation needs (:class:`Needs`). :class:`Authenticator` turns a bearer token into a
:class:`Principal`, with a short cache and per-token rate limits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import enum
import hashlib
import hmac
import logging
import re
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Final

from service.clusters import CLUSTER_ROLES
from service.config import TOKEN
from service.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    PermissionDeniedError,
    RateLimitedError,
    ResourceNotFoundError,
    UnauthenticatedError,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    import asyncpg

    from service.store import Database

__all__ = [
    "ANONYMOUS",
    "PRINCIPAL",
    "Authenticator",
    "Needs",
    "Principal",
    "Rule",
    "Scope",
    "Target",
    "Token",
    "Tokens",
    "authorize",
    "check",
    "generate",
    "parse_duration",
    "rule_of",
]

_log = logging.getLogger("kipam.auth")

TOKEN_PREFIX: Final = "kipam_"  # noqa: S105 - a prefix, not a secret
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
_PATTERN: Final = re.compile(r"[\x21-\x7e]{1,253}")  # printable ASCII, no spaces
MAX_PATTERNS: Final = 16
_MAX_LIFETIME: Final = dt.timedelta(days=3650)
_LAST_USED_EVERY: Final = dt.timedelta(minutes=1)
_DURATION: Final = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


class Scope(enum.Enum):
    """What a token may do; each scope includes the ones before it."""

    READ = "read"
    ALLOCATE = "allocate"
    ADMIN = "admin"

    def __init__(self, _value: str) -> None:
        # 0 for read, 1 for allocate, 2 for admin: the order of definition (a plain int,
        # compared on every call).
        self.rank = len(type(self).__members__)

    @classmethod
    def parse(cls, text: str) -> Scope:
        """The scope named ``text``.

        Raises:
            InvalidRequestError: not read, allocate or admin.
        """
        try:
            return cls(text)
        except ValueError:
            raise InvalidRequestError(
                f"scope {text!r} is not one of read, allocate, admin.", field="scope"
            ) from None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who makes a request: a token's name, scope and pool patterns.

    Attributes:
        name: The actor recorded in the history.
        scope: What it may do.
        pools: Pool name patterns it is limited to; empty: every pool.
        key_id: The token's key id; None for the anonymous caller (authentication off).
    """

    name: str
    scope: Scope
    pools: tuple[str, ...] = ()
    key_id: str | None = None


# Every caller when authentication is off.
ANONYMOUS: Final = Principal("anonymous", Scope.ADMIN)
# Who makes the running gRPC call (set by the interceptor before the handler runs).
PRINCIPAL: ContextVar[Principal] = ContextVar("kipam_principal", default=ANONYMOUS)


@dataclass(frozen=True, slots=True)
class Needs:
    """What one operation needs: a scope, and the pools it touches.

    Attributes:
        scope: The least scope allowed.
        pools: The pool names the operation touches; None: it spans every pool.
    """

    scope: Scope
    pools: Sequence[str] | None = ()


class Target(enum.Enum):
    """Which pools an operation touches, as its request names them."""

    NONE = "none"  # no pool (templates; pools and clusters created or deleted by admins)
    POOL = "pool"  # the pool it names
    POOL_OR_EVERY = "pool_or_every"  # the pool it filters on, else every pool
    CLUSTER = "cluster"  # the pools of the cluster it names
    ALLOCATION = "allocation"  # the pool of the allocation it names
    EVERY = "every"  # every pool


@dataclass(frozen=True, slots=True)
class Rule:
    """What an operation needs: its scope, and how to tell the pools it touches."""

    scope: Scope
    target: Target = Target.NONE


_R, _A, _W = Scope.READ, Scope.ALLOCATE, Scope.ADMIN
# Every operation of both transports, by its gRPC method name (the REST operation id). An
# operation missing here needs admin (fail closed); a test checks that none is missing.
RULES: Final[dict[str, Rule]] = {
    "CreatePool": Rule(_W),
    "DeletePool": Rule(_W),
    "GetPool": Rule(_R, Target.POOL),
    "GetPoolUsage": Rule(_R, Target.POOL),
    "ListAvailablePrefixes": Rule(_R, Target.POOL),
    "ListPools": Rule(_R, Target.EVERY),
    "AllocatePrefix": Rule(_A, Target.POOL),
    "AllocatePrefixes": Rule(_A, Target.POOL),
    "ReleasePrefix": Rule(_A, Target.ALLOCATION),
    "GetAllocation": Rule(_R, Target.ALLOCATION),
    "ListPoolAllocations": Rule(_R, Target.POOL),
    "ListAllocations": Rule(_R, Target.POOL_OR_EVERY),
    "LookupAddress": Rule(_R, Target.EVERY),
    "ListChanges": Rule(_R, Target.POOL_OR_EVERY),
    "WatchAllocations": Rule(_R, Target.POOL_OR_EVERY),
    "PlanCluster": Rule(_W),
    "DeleteCluster": Rule(_W),
    "ListClusters": Rule(_R, Target.EVERY),
    "GetCluster": Rule(_R, Target.CLUSTER),
    "RenderCluster": Rule(_R, Target.CLUSTER),
    "AllocateNodePrefix": Rule(_A, Target.CLUSTER),
    "ReleaseNodePrefix": Rule(_A, Target.CLUSTER),
    "AllocateServiceAddress": Rule(_A, Target.CLUSTER),
    "ReleaseServiceAddress": Rule(_A, Target.CLUSTER),
    "AllocateEgressAddress": Rule(_A, Target.CLUSTER),
    "ReleaseEgressAddress": Rule(_A, Target.CLUSTER),
    "ListTemplates": Rule(_R),
    "GetTemplate": Rule(_R),
    "CreateTemplate": Rule(_W),
    "DeleteTemplate": Rule(_W),
    "CreateToken": Rule(_W),
    "ListTokens": Rule(_W),
    "RevokeToken": Rule(_W),
}
_UNKNOWN: Final = Rule(_W)


def rule_of(operation: str) -> Rule:
    """The rule of an operation (admin for one the table does not know)."""
    return RULES.get(operation, _UNKNOWN)


async def check(
    principal: Principal,
    operation: str,
    named: Callable[[Target], object],
    pool_of: Callable[[int], Awaitable[str]],
) -> None:
    """Authorize ``principal`` for ``operation``: the one check both transports make.

    Args:
        principal: Who asks.
        operation: The gRPC method name (REST operation id).
        named: What the request names for a target: a pool or cluster name, an allocation
            id, or None when it names none.
        pool_of: The pool name of an allocation id.

    Raises:
        PermissionDeniedError: not allowed.
        NotFoundError: the allocation named does not exist (for a token that could see it).
    """
    rule = rule_of(operation)
    authorize(principal, Needs(rule.scope))  # the scope first: no lookups for a wrong one
    if not principal.pools or rule.target is Target.NONE:
        return
    value = named(rule.target) if rule.target is not Target.EVERY else None
    pools: Sequence[str] | None
    if rule.target is Target.POOL:
        pools = [str(value or "")]
    elif rule.target is Target.CLUSTER:
        pools = cluster_pools(str(value or ""))
    elif rule.target is Target.ALLOCATION:
        pools = [await pool_of(value)] if isinstance(value, int) else []
    else:  # POOL_OR_EVERY, EVERY
        pools = [str(value)] if value else None
    authorize(principal, Needs(rule.scope, pools))


def cluster_pools(cluster: str) -> list[str]:
    """The pools of a cluster: ``<cluster>/<role>`` and ``<cluster>/ipv4/<role>``."""
    return [f"{cluster}{family}/{role}" for family in ("", "/ipv4") for role in CLUSTER_ROLES]


def authorize(principal: Principal, needs: Needs) -> None:
    """The policy: may ``principal`` do what ``needs`` describes?

    Raises:
        PermissionDeniedError: its scope is too small, or a pool is outside its patterns.
    """
    if principal.scope.rank < needs.scope.rank:
        raise PermissionDeniedError(
            f"Token {principal.name!r} has scope {principal.scope.value}; this operation needs "
            f"{needs.scope.value}."
        )
    if not principal.pools:
        return
    limited = ", ".join(principal.pools)
    if needs.pools is None:
        raise PermissionDeniedError(
            f"Token {principal.name!r} is limited to pools matching {limited}; this operation "
            "spans every pool (name a pool, or use a token that is not limited)."
        )
    for pool in needs.pools:
        if not any(fnmatchcase(pool, pattern) for pattern in principal.pools):
            raise PermissionDeniedError(
                f"Token {principal.name!r} is limited to pools matching {limited}; "
                f"{pool!r} is not one of them."
            )


def parse_duration(text: str) -> dt.timedelta:
    """``90d``, ``12h``, ``1w2d``, ``30m``, ``3600s``: a positive duration of at most 10 years.

    Raises:
        InvalidRequestError: not of that shape, zero, or longer than 10 years.
    """
    found = _DURATION.fullmatch(text.strip())
    if not text.strip() or found is None:
        raise InvalidRequestError(
            f"expires {text!r} is not a duration like 90d, 12h, 1w2d, 30m or 3600s.",
            field="expires",
        )
    weeks, days, hours, minutes, seconds = (int(g or 0) for g in found.groups())
    try:
        duration = dt.timedelta(
            weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds
        )
    except OverflowError:
        duration = _MAX_LIFETIME * 2
    if not dt.timedelta(0) < duration <= _MAX_LIFETIME:
        raise InvalidRequestError(
            f"expires {text!r} must be more than 0 and at most 3650 days.", field="expires"
        )
    return duration


@dataclass(frozen=True, slots=True)
class Token:
    """A token as listed: everything but its secret (which is never stored)."""

    name: str
    scope: Scope
    pools: tuple[str, ...]
    created_by: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    @property
    def state(self) -> str:
        """``active``, ``expired`` or ``revoked``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= dt.datetime.now(dt.UTC):
            return "expired"
        return "active"

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Token:
        """From a ``tokens`` row."""
        return cls(
            name=row["name"],
            scope=Scope(row["scope"]),
            pools=tuple(row["pools"]),
            created_by=row["created_by"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            last_used_at=row["last_used_at"],
        )


def generate() -> str:
    """A new token's text: ``kipam_<16 hex digits>_<256 random bits, base64url>``."""
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
    return f"{TOKEN_PREFIX}{secrets.token_hex(8)}_{secret}"


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def check_pools(pools: Sequence[str], scope: Scope) -> tuple[str, ...]:
    """Valid pool patterns for a token of ``scope`` (admin tokens take none).

    Raises:
        InvalidRequestError: an empty or over-long pattern, too many, or given for admin.
    """
    if pools and scope is Scope.ADMIN:
        raise InvalidRequestError(
            "An admin token cannot be limited to pools; use scope read or allocate.",
            field="pools",
        )
    if len(pools) > MAX_PATTERNS:
        raise InvalidRequestError(
            f"A token takes at most {MAX_PATTERNS} pool patterns, not {len(pools)}.",
            field="pools",
        )
    for pattern in pools:
        if not _PATTERN.fullmatch(pattern):
            raise InvalidRequestError(
                f"pool pattern {pattern!r} must be 1-253 printable characters without spaces.",
                field="pools",
            )
    return tuple(dict.fromkeys(pools))


_COLUMNS: Final = "name, scope, pools, created_by, created_at, expires_at, revoked_at, last_used_at"
_INSERT: Final = f"""
    INSERT INTO tokens (name, key_id, salt, hash, scope, pools, created_by, expires_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, now() + $8::interval)
    ON CONFLICT (name) WHERE revoked_at IS NULL DO NOTHING
    RETURNING {_COLUMNS}
"""  # noqa: S608 - fixed text
_LIST: Final = f"""
    SELECT {_COLUMNS} FROM tokens WHERE $1 OR revoked_at IS NULL ORDER BY name, id
"""  # noqa: S608 - fixed text
_REVOKE: Final = f"""
    UPDATE tokens SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL
    RETURNING key_id, {_COLUMNS}
"""  # noqa: S608 - fixed text


class Tokens:
    """The ``tokens`` table: create, list, revoke, and find a token by its key id."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self,
        name: str,
        scope: Scope,
        *,
        pools: Sequence[str] = (),
        expires_in: dt.timedelta | None = None,
        created_by: str,
    ) -> tuple[Token, str]:
        """A new token; returns it and its secret text (shown once, never stored).

        Raises:
            InvalidRequestError: a bad name or pool pattern.
            AlreadyExistsError: a live token has that name.
        """
        if not _NAME.fullmatch(name):
            raise InvalidRequestError(
                f"token name {name!r} must be 1-128 characters: letters, digits and ._:@/- "
                "(starting with a letter or digit).",
                field="name",
            )
        patterns = check_pools(pools, scope)
        text = generate()
        row = await self._insert(
            text,
            name=name,
            scope=scope,
            pools=patterns,
            created_by=created_by,
            expires_in=expires_in,
        )
        if row is None:
            raise AlreadyExistsError(
                f"A token named {name!r} exists; revoke it first or choose another name."
            )
        _log.info("token %s created (scope %s) by %s", name, scope.value, created_by)
        return Token.from_row(row), text

    async def bootstrap(self, text: str) -> bool:
        """Store ``text`` as admin token ``bootstrap`` unless its key id is known already.

        A revoked bootstrap token stays revoked; a live token named ``bootstrap`` with
        another key is left alone (and said so). Returns whether it was stored.
        """
        found = TOKEN.fullmatch(text)
        if found is None:
            raise InvalidRequestError("KIPAM_BOOTSTRAP_TOKEN is not a kipam token.")
        if await self.find(found.group(1)) is not None:
            return False
        row = await self._insert(
            text,
            name="bootstrap",
            scope=Scope.ADMIN,
            pools=(),
            created_by="KIPAM_BOOTSTRAP_TOKEN",
            expires_in=None,
        )
        if row is None:
            _log.warning(
                "KIPAM_BOOTSTRAP_TOKEN not stored: a live token named 'bootstrap' with another "
                "key exists (revoke it to take the new one)"
            )
            return False
        _log.info("token bootstrap (admin) stored from KIPAM_BOOTSTRAP_TOKEN")
        return True

    async def _insert(  # noqa: PLR0913 - the token's columns
        self,
        text: str,
        *,
        name: str,
        scope: Scope,
        pools: Sequence[str],
        created_by: str,
        expires_in: dt.timedelta | None,
    ) -> asyncpg.Record | None:
        found = TOKEN.fullmatch(text)
        if found is None:  # pragma: no cover - generate() and bootstrap() check
            raise InvalidRequestError("not a kipam token")
        key_id, secret = found.groups()
        salt = secrets.token_bytes(16)
        return await self.db.fetchrow(
            _INSERT,
            name,
            key_id,
            salt,
            _digest(salt, secret),
            scope.value,
            list(pools),
            created_by,
            expires_in,
        )

    async def list(self, *, include_revoked: bool = False) -> list[Token]:
        """Every token, by name (revoked ones only when asked)."""
        rows = await self.db.fetch(_LIST, include_revoked)
        return [Token.from_row(r) for r in rows]

    async def revoke(self, name: str) -> tuple[Token, str]:
        """Revoke the live token named ``name``; returns it and its key id.

        Raises:
            ResourceNotFoundError: no live token has that name.
        """
        row = await self.db.fetchrow(_REVOKE, name)
        if row is None:
            raise ResourceNotFoundError("token", name)
        _log.info("token %s revoked", name)
        return Token.from_row(row), row["key_id"]

    async def any_live(self) -> bool:
        """Whether any token is neither revoked nor expired."""
        found = await self.db.fetchrow(
            "SELECT 1 FROM tokens WHERE revoked_at IS NULL "
            "AND (expires_at IS NULL OR expires_at > now()) LIMIT 1"
        )
        return found is not None

    async def find(self, key_id: str) -> asyncpg.Record | None:
        """The row of the token with this key id (revoked or not)."""
        return await self.db.fetchrow(
            "SELECT id, key_id, salt, hash, name, scope, pools, expires_at, revoked_at, "
            "last_used_at, now() AS now FROM tokens WHERE key_id = $1",
            key_id,
        )

    async def used(self, key_id: str) -> None:
        """Record that the token was used now (at most once a minute)."""
        await self.db.fetchrow(
            "UPDATE tokens SET last_used_at = now() WHERE key_id = $1 "
            "AND (last_used_at IS NULL OR last_used_at < now() - $2::interval)",
            key_id,
            _LAST_USED_EVERY,
        )


@dataclass(slots=True)
class _Known:
    """A token row this replica read, trusted until ``until`` (monotonic seconds)."""

    salt: bytes
    hash: bytes
    principal: Principal
    expires_at: float | None  # wall-clock seconds
    revoked: bool
    until: float


class _Bucket:
    """A token bucket: ``rate`` requests a second, ``burst`` at once."""

    __slots__ = ("at", "level")

    def __init__(self, level: float, at: float) -> None:
        self.level = level
        self.at = at


class Authenticator:
    """Bearer tokens to principals, with a short cache and per-token rate limits.

    Args:
        tokens: The token table.
        required: Whether calls must carry a token; when not, every call is
            :data:`ANONYMOUS` (the token, if any, is not looked at).
        cache_s: How long a token row read from the database is trusted (revocation and
            expiry written by another process take effect within this time; a revocation
            through this process at once).
        rate: Requests per second per token (0: no limit).
        burst: Requests a token may make at once.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(  # noqa: PLR0913 - the settings, keyword-only
        self,
        tokens: Tokens,
        *,
        required: bool,
        cache_s: float = 5.0,
        rate: float = 0.0,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self.required = required
        self._cache_s = cache_s
        self._rate = rate
        self._burst = float(max(1, burst))
        self._clock = clock
        self._known: dict[str, _Known] = {}
        self._reading: dict[str, asyncio.Future[_Known | None]] = {}
        self._buckets: dict[str, _Bucket] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal an ``Authorization`` header (or gRPC metadata) value stands for.

        Raises:
            UnauthenticatedError: no token, a malformed, unknown, revoked or expired one.
            RateLimitedError: the token is over its rate.
            UnavailableError: the database could not be asked.
        """
        if not self.required:
            return ANONYMOUS
        if not authorization:
            raise UnauthenticatedError(
                "This call needs an API token: send `Authorization: Bearer <token>` "
                "(`kipam token create` makes one)."
            )
        scheme, _, credentials = authorization.strip().partition(" ")
        found = TOKEN.fullmatch(credentials.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            raise UnauthenticatedError(
                "The Authorization value is not `Bearer kipam_<key id>_<secret>`."
            )
        key_id, secret = found.groups()
        known = await self._lookup(key_id)
        if known is None or not hmac.compare_digest(_digest(known.salt, secret), known.hash):
            raise UnauthenticatedError("The API token is not valid.")
        principal = known.principal
        if known.revoked:
            raise UnauthenticatedError(f"The API token {principal.name!r} has been revoked.")
        if known.expires_at is not None and known.expires_at <= time.time():
            raise UnauthenticatedError(f"The API token {principal.name!r} has expired.")
        self._spend(principal)
        return principal

    def forget(self, key_id: str) -> None:
        """Drop a token from the cache (this process revoked it)."""
        self._known.pop(key_id, None)
        self._buckets.pop(key_id, None)

    async def _lookup(self, key_id: str) -> _Known | None:
        """The token's row, from the cache or read once for every call waiting on it."""
        known = self._known.get(key_id)
        if known is not None and known.until > self._clock():
            return known
        # When the cached row runs out under load, every call in flight would read it again;
        # one reads, the others wait for its answer (shielded: a caller that goes away does
        # not cancel the read the others wait on).
        reading = self._reading.get(key_id)
        if reading is None:
            reading = self._reading[key_id] = asyncio.ensure_future(self._read(key_id))
            reading.add_done_callback(lambda done: self._read_done(key_id, done))
        return await asyncio.shield(reading)

    def _read_done(self, key_id: str, done: asyncio.Future[_Known | None]) -> None:
        self._reading.pop(key_id, None)
        if not done.cancelled():
            done.exception()  # retrieved: its waiters, if any are left, raise it themselves

    async def _read(self, key_id: str) -> _Known | None:
        now = self._clock()
        row = await self.tokens.find(key_id)
        if row is None:
            self._known.pop(key_id, None)
            return None
        expires = row["expires_at"]
        known = _Known(
            salt=bytes(row["salt"]),
            hash=bytes(row["hash"]),
            principal=Principal(
                name=row["name"],
                scope=Scope(row["scope"]),
                pools=tuple(row["pools"]),
                key_id=key_id,
            ),
            expires_at=expires.timestamp() if expires is not None else None,
            revoked=row["revoked_at"] is not None,
            until=now + self._cache_s,
        )
        if self._cache_s > 0:
            self._known[key_id] = known
        used = row["last_used_at"]
        if not known.revoked and (used is None or row["now"] - used >= _LAST_USED_EVERY):
            # Best effort: a request is not refused because its last-used time was not saved.
            with contextlib.suppress(Exception):
                await self.tokens.used(key_id)
        return known

    def _spend(self, principal: Principal) -> None:
        """Take one request from the token's bucket.

        Raises:
            RateLimitedError: the bucket is empty.
        """
        if self._rate <= 0 or principal.key_id is None:
            return
        now = self._clock()
        bucket = self._buckets.get(principal.key_id)
        if bucket is None:
            bucket = self._buckets[principal.key_id] = _Bucket(self._burst, now)
        bucket.level = min(self._burst, bucket.level + (now - bucket.at) * self._rate)
        bucket.at = now
        if bucket.level < 1.0:
            wait = (1.0 - bucket.level) / self._rate
            raise RateLimitedError(
                f"Token {principal.name!r} is over its rate of {self._rate:g} requests per "
                f"second; retry in {wait:.2f} s.",
                retry_after_s=wait,
            )
        bucket.level -= 1.0
