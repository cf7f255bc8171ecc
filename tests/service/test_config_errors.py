"""Settings from the environment, and the one error table both transports read."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from engine import PoolExhaustedError, parse_prefix
from service.config import Settings, parse_listen_address
from service.errors import (
    STATUS,
    AllocationNotFoundError,
    InvalidRequestError,
    Kind,
    LockTimeoutError,
    NotFoundError,
    ServiceError,
    kind_of,
    status_of,
)
from service.store import translate


def test_defaults_are_the_embedded_loopback_service() -> None:
    """With nothing set: embedded database, advisory locks, loopback, migrate on start."""
    settings = Settings.from_env({"KIPAM_DATA_DIR": "/srv/kipam"})
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.http_addr == "127.0.0.1:8080"
    assert settings.grpc_addr == "127.0.0.1:50051"
    assert settings.data_dir == Path("/srv/kipam")
    assert settings.migrate_on_start is True


def test_a_real_database_does_not_migrate_on_start_unless_asked() -> None:
    """With KIPAM_DATABASE_URL, serve leaves migrations to `kipam migrate` by default."""
    env = {"KIPAM_DATABASE_URL": "postgresql://db/kipam"}
    assert Settings.from_env(env).migrate_on_start is False
    assert Settings.from_env({**env, "KIPAM_MIGRATE_ON_START": "yes"}).migrate_on_start is True


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"KIPAM_HTTP_ADDR": "8080"}, "KIPAM_HTTP_ADDR"),
        ({"KIPAM_GRPC_ADDR": "::1:50051"}, "KIPAM_GRPC_ADDR"),
        ({"KIPAM_LOCK_WAIT_S": "soon"}, "KIPAM_LOCK_WAIT_S"),
        ({"KIPAM_LOCK_TTL_S": "0"}, "KIPAM_LOCK_TTL_S"),
        ({"KIPAM_MIGRATE_ON_START": "maybe"}, "KIPAM_MIGRATE_ON_START"),
        ({"KIPAM_DB_POOL_MIN": "9", "KIPAM_DB_POOL_MAX": "3"}, "KIPAM_DB_POOL_MIN"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], field: str) -> None:
    """A setting that cannot be parsed is refused with its variable named."""
    with pytest.raises(InvalidRequestError) as info:
        Settings.from_env(env)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:50051", ("::1", 50051)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    """host:port and [v6]:port split into host and port."""
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize(
    ("error", "grpc", "http"),
    [
        (InvalidRequestError("x"), "INVALID_ARGUMENT", 422),
        (AllocationNotFoundError(1), "NOT_FOUND", 404),
        (LockTimeoutError("x"), "UNAVAILABLE", 503),
        (
            PoolExhaustedError("x", pool=parse_prefix("::/0"), length=64, largest_free=None),
            "RESOURCE_EXHAUSTED",
            409,
        ),
        (ValueError("boom"), "INTERNAL", 500),
    ],
)
def test_one_table_maps_errors_to_both_transports(
    error: BaseException, grpc: str, http: int
) -> None:
    """Engine and service errors map to the gRPC code and HTTP status of DESIGN.md."""
    status = status_of(error)
    assert (status.grpc, status.http) == (grpc, http)


def test_every_kind_has_a_status_and_bases_are_abstract() -> None:
    """The table covers every kind, and the abstract bases cannot be raised."""
    assert set(STATUS) == set(Kind)
    assert kind_of(KeyError()) is Kind.INTERNAL
    for abstract in (ServiceError, NotFoundError):
        with pytest.raises(TypeError, match="abstract"):
            abstract("x")


@pytest.mark.parametrize(
    ("driver_error", "kind"),
    [
        (asyncpg.exceptions.QueryCanceledError("statement timeout"), Kind.UNAVAILABLE),
        (asyncpg.exceptions.ForeignKeyViolationError("gone"), Kind.NOT_FOUND),
        (asyncpg.exceptions.LockNotAvailableError("busy"), Kind.UNAVAILABLE),
        (asyncpg.exceptions.DataError("bad"), Kind.INVALID),
        (ConnectionResetError(), Kind.UNAVAILABLE),
    ],
)
def test_driver_errors_translate_to_a_concrete_service_error(
    driver_error: BaseException, kind: Kind
) -> None:
    """Every driver error becomes a raisable service error of the right kind."""
    assert kind_of(translate(driver_error)) is kind
