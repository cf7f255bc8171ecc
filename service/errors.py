"""Service errors and the one table that maps every error kind to gRPC and HTTP.

The engine's errors (:mod:`engine.errors`) carry an :class:`~engine.errors.ErrorKind`; the
service adds its own kinds of failure and maps both, here and only here::

    ServiceError                     (abstract)
    +-- NotFoundError                kind NOT_FOUND     no such pool / allocation / space
    |   +-- PoolNotFoundError
    |   +-- AllocationNotFoundError
    |   +-- ReferenceNotFoundError   a row the change refers to has gone (a race with a delete)
    +-- AlreadyExistsError           kind CONFLICT      a name or prefix is taken
    +-- PreconditionFailedError      kind PRECONDITION  e.g. deleting a pool that holds prefixes
    +-- InvalidRequestError          kind INVALID       bad input caught by the service
    +-- UnavailableError             kind UNAVAILABLE   the database or lock is not answering
    |   +-- LockTimeoutError         a pool lock was not granted within its bounded wait
    |   +-- DatabaseUnavailableError
    |   +-- ServerUnavailableError   (client side) the kipam server did not answer in time
    |   +-- ListenError              (server side) an address to serve on cannot be bound
    +-- UnauthenticatedError         kind UNAUTHENTICATED  no valid credentials
    +-- PermissionDeniedError        kind FORBIDDEN     credentials without the right
    +-- RateLimitedError             kind RATE_LIMITED  a token over its request rate
    +-- InternalError                kind INTERNAL      (client side) the server failed

Driver errors (asyncpg, redis) never leave the store and lock modules: they are translated
there, ``raise ... from exc``, into one of these.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Final

from engine.errors import EngineError, ErrorKind

__all__ = [
    "STATUS",
    "AllocationNotFoundError",
    "AlreadyExistsError",
    "DatabaseUnavailableError",
    "InternalError",
    "InvalidRequestError",
    "Kind",
    "ListenError",
    "LockTimeoutError",
    "NotFoundError",
    "PermissionDeniedError",
    "PoolNotFoundError",
    "PreconditionFailedError",
    "RateLimitedError",
    "ReferenceNotFoundError",
    "ResourceNotFoundError",
    "ServerUnavailableError",
    "ServiceError",
    "Status",
    "UnauthenticatedError",
    "UnavailableError",
    "kind_of",
    "status_of",
]


class Kind(enum.Enum):
    """Every kind of failure a request can end in, as the transports see it."""

    INVALID = "invalid"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    EXHAUSTED = "exhausted"
    PRECONDITION = "precondition"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Status:
    """How one kind of failure is reported: gRPC status code name and HTTP status."""

    grpc: str
    http: int


# DESIGN.md, "Errors": the one table both transports read.
STATUS: Final[dict[Kind, Status]] = {
    Kind.INVALID: Status("INVALID_ARGUMENT", 422),
    Kind.NOT_FOUND: Status("NOT_FOUND", 404),
    Kind.CONFLICT: Status("ALREADY_EXISTS", 409),
    Kind.EXHAUSTED: Status("RESOURCE_EXHAUSTED", 409),
    Kind.PRECONDITION: Status("FAILED_PRECONDITION", 409),
    Kind.UNAVAILABLE: Status("UNAVAILABLE", 503),
    Kind.UNAUTHENTICATED: Status("UNAUTHENTICATED", 401),
    Kind.FORBIDDEN: Status("PERMISSION_DENIED", 403),
    Kind.RATE_LIMITED: Status("RESOURCE_EXHAUSTED", 429),
    Kind.INTERNAL: Status("INTERNAL", 500),
}

_ENGINE_KINDS: Final = {
    ErrorKind.INVALID: Kind.INVALID,
    ErrorKind.NOT_FOUND: Kind.NOT_FOUND,
    ErrorKind.CONFLICT: Kind.CONFLICT,
    ErrorKind.EXHAUSTED: Kind.EXHAUSTED,
    ErrorKind.PRECONDITION: Kind.PRECONDITION,
}


class ServiceError(Exception):
    """Base of the service's own errors. Abstract: raise a subclass."""

    kind: ClassVar[Kind]

    def __init__(self, message: str) -> None:
        if type(self) in _ABSTRACT:
            raise TypeError(f"{type(self).__name__} is abstract; raise a subclass")
        super().__init__(message)
        self.message = message


class NotFoundError(ServiceError):
    """Something named in the request does not exist."""

    kind = Kind.NOT_FOUND


class PoolNotFoundError(NotFoundError):
    """No pool of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"There is no pool named {name!r}.")
        self.name = name


class AllocationNotFoundError(NotFoundError):
    """No allocation with that id."""

    def __init__(self, allocation_id: int) -> None:
        super().__init__(f"There is no allocation with id {allocation_id}.")
        self.allocation_id = allocation_id


class ResourceNotFoundError(NotFoundError):
    """No cluster, template (or other named resource) of that name."""

    def __init__(self, resource_type: str, name: str) -> None:
        super().__init__(f"There is no {resource_type} named {name!r}.")
        self.resource_type = resource_type
        self.name = name


class ReferenceNotFoundError(NotFoundError):
    """A row the change refers to has gone meanwhile (the database's foreign key said so)."""


class AlreadyExistsError(ServiceError):
    """A name is taken, or a prefix overlaps one that is held (``conflicts`` names them)."""

    kind = Kind.CONFLICT

    def __init__(self, message: str, *, conflicts: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.conflicts = conflicts


class PreconditionFailedError(ServiceError):
    """The current state forbids the change (a pool that still holds prefixes, ...)."""

    kind = Kind.PRECONDITION


class InvalidRequestError(ServiceError):
    """Input the service refuses; ``field`` names the offending field when there is one."""

    kind = Kind.INVALID

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnavailableError(ServiceError):
    """A dependency is not answering; the request may be retried."""

    kind = Kind.UNAVAILABLE


class LockTimeoutError(UnavailableError):
    """A pool's lock was not granted within the bounded wait."""


class DatabaseUnavailableError(UnavailableError):
    """PostgreSQL did not answer, or the connection broke."""


class ServerUnavailableError(UnavailableError):
    """(Client side) the kipam server could not be reached or did not answer in time."""


class ListenError(UnavailableError):
    """An address to serve on cannot be bound (taken, or not an address of this host)."""


class UnauthenticatedError(ServiceError):
    """The request carries no valid credentials."""

    kind = Kind.UNAUTHENTICATED


class PermissionDeniedError(ServiceError):
    """The credentials do not allow this operation on this resource."""

    kind = Kind.FORBIDDEN


class RateLimitedError(ServiceError):
    """A token made more requests than its rate allows; retry after ``retry_after_s``."""

    kind = Kind.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InternalError(ServiceError):
    """(Client side) the server failed on a bug of its own; it has logged it."""

    kind = Kind.INTERNAL


_ABSTRACT = (ServiceError, NotFoundError, UnavailableError)


def kind_of(error: BaseException) -> Kind:
    """The kind of any error: engine and service errors by their kind, anything else INTERNAL."""
    if isinstance(error, ServiceError):
        return error.kind
    if isinstance(error, EngineError):
        return _ENGINE_KINDS[error.kind]
    return Kind.INTERNAL


def status_of(error: BaseException) -> Status:
    """The gRPC code and HTTP status an error is reported with."""
    return STATUS[kind_of(error)]
