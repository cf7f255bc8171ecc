"""Settings: read once from the environment into an immutable object and passed down.

Every variable has the ``KIPAM_`` prefix. Nothing reads the environment after start-up; the
engine never sees settings at all (DESIGN.md, "Configuration").
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from service.errors import InvalidRequestError

# An API token's text (service.auth makes and checks them).
TOKEN: Final = re.compile(r"kipam_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Settings", "parse_listen_address"]


def _default_data_dir() -> Path:
    import platformdirs  # noqa: PLC0415 - only needed when no data dir is configured

    return Path(platformdirs.user_data_path("kipam"))


@dataclass(frozen=True)
class Settings:
    """Everything kipam reads from its environment.

    Attributes:
        database_url: PostgreSQL DSN; None means the embedded PostgreSQL in ``data_dir``.
        redis_url: Redis URL for per-pool locks (redis://, rediss://, or redis+sentinel://
            sentinels/master, see service.locks.redis_client); None means advisory locks.
        http_addr: REST listen address, ``host:port`` (IPv6 hosts in brackets).
        grpc_addr: gRPC listen address.
        data_dir: Where the embedded PostgreSQL keeps its files.
        migrate_on_start: Apply pending migrations when ``kipam serve`` starts. Default: on
            for the embedded database (nothing else would), off for a real one (a Helm hook
            or ``kipam migrate`` does it; serve refuses to start on an old schema).
        lock_ttl_s: How long a Redis pool lock lives if its holder dies.
        lock_wait_s: How long a request waits for a pool lock before UNAVAILABLE.
        db_pool_min: Connections kept open to PostgreSQL.
        db_pool_max: Most connections opened to PostgreSQL.
        statement_timeout_s: Upper bound on any one SQL statement.
        batch_max: Most queued requests served in one transaction (group commit).
        write_lanes: Transactions this process runs at once; pools are split between lanes.
        shutdown_grace_s: On SIGTERM, how long in-flight calls may take to finish before
            they are cancelled (keep below the pod's terminationGracePeriodSeconds).
        watch_poll_s: How often a change-feed subscriber looks for changes written by other
            replicas (this replica's own commits wake it at once).
        max_message_bytes: Largest gRPC request accepted (RESOURCE_EXHAUSTED beyond).
        log_level: ``debug``, ``info`` (one line per request), ``warning`` or ``error``.
        log_format: ``json``, ``console``, or ``auto`` (console on a terminal, else JSON).
        auth: ``required`` or ``off``; None (unset) means required whenever either listen
            address is beyond loopback, off on loopback (``kipam serve`` says so at start).
        auth_cache_s: How long a replica trusts a token it has checked before reading it
            again (a revocation or expiry in the database takes effect within this time).
        rate_limit: Requests per second each token may make to one replica (0: no limit).
        rate_burst: How many requests a token may make at once before the rate applies.
        tls_cert: PEM certificate chain for REST and gRPC; with ``tls_key``, TLS is on.
        tls_key: PEM private key of ``tls_cert``.
        tls_client_ca: PEM CA bundle; when set, gRPC callers must present a certificate it
            signed (mTLS).
        tls_reload_s: How often the certificate files are checked for a new certificate.
        bootstrap_token: An admin token (``kipam token generate``) that ``kipam serve``
            stores, as token ``bootstrap``, unless its key is known already (a revoked one
            stays revoked): the first token of a deployment made from a secret.
    """

    database_url: str | None = None
    redis_url: str | None = None
    http_addr: str = "127.0.0.1:8080"
    grpc_addr: str = "127.0.0.1:50051"
    data_dir: Path = field(default_factory=_default_data_dir)
    migrate_on_start: bool = True
    lock_ttl_s: float = 10.0
    lock_wait_s: float = 5.0
    db_pool_min: int = 2
    db_pool_max: int = 20
    statement_timeout_s: float = 10.0
    batch_max: int = 256
    write_lanes: int = 2
    shutdown_grace_s: float = 20.0
    watch_poll_s: float = 0.5
    max_message_bytes: int = 4 * 1024 * 1024
    log_level: str = "info"
    log_format: str = "auto"
    auth: str | None = None
    auth_cache_s: float = 5.0
    rate_limit: float = 100.0
    rate_burst: int = 200
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_reload_s: float = 10.0
    bootstrap_token: str | None = field(default=None, repr=False)

    @property
    def loopback_only(self) -> bool:
        """Whether both listen addresses are loopback addresses (127.0.0.0/8, ::1, localhost)."""
        return all(
            _is_loopback(parse_listen_address(address)[0])
            for address in (self.http_addr, self.grpc_addr)
        )

    @property
    def auth_required(self) -> bool:
        """Whether every API call must carry a token (``KIPAM_AUTH``, else by address)."""
        return self.auth == "required" if self.auth is not None else not self.loopback_only

    @property
    def tls(self) -> bool:
        """Whether REST and gRPC are served over TLS."""
        return self.tls_cert is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``KIPAM_*`` variables; unset ones take their defaults.

        Raises:
            InvalidRequestError: a variable that cannot be parsed; the message names it.
        """
        env = _Env(os.environ if environ is None else environ)
        get, number, boolean = env.get, env.number, env.boolean
        database_url = get("DATABASE_URL")
        data_dir = get("DATA_DIR")
        settings = cls(
            database_url=database_url,
            redis_url=get("REDIS_URL"),
            http_addr=get("HTTP_ADDR") or cls.http_addr,
            grpc_addr=get("GRPC_ADDR") or cls.grpc_addr,
            data_dir=Path(data_dir).expanduser() if data_dir else _default_data_dir(),
            migrate_on_start=boolean("MIGRATE_ON_START", default=database_url is None),
            lock_ttl_s=number("LOCK_TTL_S", cls.lock_ttl_s, minimum=0.1),
            lock_wait_s=number("LOCK_WAIT_S", cls.lock_wait_s, minimum=0.0),
            db_pool_min=int(number("DB_POOL_MIN", cls.db_pool_min, minimum=1)),
            db_pool_max=int(number("DB_POOL_MAX", cls.db_pool_max, minimum=1)),
            statement_timeout_s=number("STATEMENT_TIMEOUT_S", cls.statement_timeout_s, minimum=0.1),
            batch_max=int(number("BATCH_MAX", cls.batch_max, minimum=1)),
            write_lanes=int(number("WRITE_LANES", cls.write_lanes, minimum=1)),
            shutdown_grace_s=number("SHUTDOWN_GRACE_S", cls.shutdown_grace_s, minimum=0.0),
            watch_poll_s=number("WATCH_POLL_S", cls.watch_poll_s, minimum=0.01),
            max_message_bytes=int(number("MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=1024)),
            log_level=env.choice("LOG_LEVEL", cls.log_level, ("debug", "info", "warning", "error")),
            log_format=env.choice("LOG_FORMAT", cls.log_format, ("auto", "json", "console")),
            auth=env.choice("AUTH", "off", ("required", "off")) if get("AUTH") else None,
            auth_cache_s=number("AUTH_CACHE_S", cls.auth_cache_s, minimum=0.0),
            rate_limit=number("RATE_LIMIT", cls.rate_limit, minimum=0.0),
            rate_burst=int(number("RATE_BURST", cls.rate_burst, minimum=1)),
            tls_cert=env.path("TLS_CERT"),
            tls_key=env.path("TLS_KEY"),
            tls_client_ca=env.path("TLS_CLIENT_CA"),
            tls_reload_s=number("TLS_RELOAD_S", cls.tls_reload_s, minimum=0.1),
            bootstrap_token=get("BOOTSTRAP_TOKEN"),
        )
        parse_listen_address(settings.http_addr, "KIPAM_HTTP_ADDR")
        parse_listen_address(settings.grpc_addr, "KIPAM_GRPC_ADDR")
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise InvalidRequestError(
                "Set both KIPAM_TLS_CERT and KIPAM_TLS_KEY, or neither.", field="KIPAM_TLS_CERT"
            )
        if settings.tls_client_ca is not None and settings.tls_cert is None:
            raise InvalidRequestError(
                "KIPAM_TLS_CLIENT_CA (mTLS) needs KIPAM_TLS_CERT and KIPAM_TLS_KEY.",
                field="KIPAM_TLS_CLIENT_CA",
            )
        if settings.bootstrap_token is not None and not TOKEN.fullmatch(settings.bootstrap_token):
            raise InvalidRequestError(
                "KIPAM_BOOTSTRAP_TOKEN is not a kipam token (kipam_<key id>_<secret>); make one "
                "with `kipam token generate`.",
                field="KIPAM_BOOTSTRAP_TOKEN",
            )
        if settings.db_pool_min > settings.db_pool_max:
            raise InvalidRequestError(
                "KIPAM_DB_POOL_MIN must not exceed KIPAM_DB_POOL_MAX.", field="KIPAM_DB_POOL_MIN"
            )
        return settings


class _Env:
    """Typed reads of ``KIPAM_*`` variables, each error naming its variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def get(self, name: str) -> str | None:
        value = self._environ.get(f"KIPAM_{name}", "").strip()
        return value or None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        """One of ``choices`` (case-insensitive), or the default when unset."""
        value = (self.get(name) or default).lower()
        if value not in choices:
            raise InvalidRequestError(
                f"KIPAM_{name}={value!r} is not one of {', '.join(choices)}.",
                field=f"KIPAM_{name}",
            )
        return value

    def path(self, name: str) -> Path | None:
        """A file path, or None when unset."""
        text = self.get(name)
        return Path(text).expanduser() if text else None

    def number(self, name: str, default: float, *, minimum: float) -> float:
        text = self.get(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            raise InvalidRequestError(
                f"KIPAM_{name}={text!r} is not a number.", field=f"KIPAM_{name}"
            ) from None
        if value < minimum:
            raise InvalidRequestError(
                f"KIPAM_{name} must be at least {minimum}, not {value}.", field=f"KIPAM_{name}"
            )
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        text = self.get(name)
        if text is None:
            return default
        if text.lower() in {"1", "true", "yes", "on"}:
            return True
        if text.lower() in {"0", "false", "no", "off"}:
            return False
        raise InvalidRequestError(
            f"KIPAM_{name}={text!r} is not a boolean (true/false).", field=f"KIPAM_{name}"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen_address(text: str, name: str = "address") -> tuple[str, int]:
    """Split ``host:port`` or ``[v6-host]:port`` into (host, port).

    Raises:
        InvalidRequestError: not of that shape, or a port outside 0-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidRequestError(
            f"{name}={text!r} must be host:port, e.g. 127.0.0.1:8080 or [::1]:8080.", field=name
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise InvalidRequestError(
            f"{name}={text!r}: write an IPv6 host in brackets, e.g. [::1]:8080.", field=name
        )
    return host, int(port_text)
