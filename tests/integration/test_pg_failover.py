"""PostgreSQL failover: the primary dies, its synchronous standby is promoted, kipam goes on.

Two real PostgreSQL servers run on loopback: a primary and a standby made with
``pg_basebackup -R`` that streams from it. Replication is synchronous
(``synchronous_standby_names = '*'``), so a commit is acknowledged only once the standby has
it: nothing acknowledged is lost when the primary goes. kipam's :class:`Database` gets one DSN
naming both servers with ``target_session_attrs=read-write``, as operators configure it
(docs/operating.md, "PostgreSQL high availability").

The test allocates (once, then a concurrent burst), kills the primary (``pg_ctl stop -m
immediate``: a crash, no shutdown checkpoint), checks that the read-write DSN refuses the
read-only standby with kipam's UNAVAILABLE error, promotes the standby, and polls the same
:class:`Database` until an allocation succeeds on the new primary. Every allocation
acknowledged before the crash is still there and the new one overlaps none of them.

The servers need PostgreSQL's server binaries (``pg_config --bindir``, else
``/usr/lib/postgresql/*/bin``); the test is skipped where there are none or they cannot run.
PostgreSQL refuses to run as root: as root, the servers run as the ``postgres`` (else
``nobody``) system user, in a temporary directory given to that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg
import pytest

from service.app import use_cases
from service.errors import DatabaseUnavailableError, Kind, UnavailableError
from service.migrate import migrate
from service.store import Database

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from engine import Prefix
    from service.config import Settings
    from service.models import Allocation
    from service.usecases import Kipam

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="session"),
]

_log = logging.getLogger(__name__)

_TOOLS: Final = ("initdb", "pg_ctl", "pg_basebackup", "postgres")
_MIN_MAJOR: Final = 15  # kipam's minimum (docs/operating.md)
_USERS: Final = ("postgres", "nobody")  # who runs the servers when we are root
_TOOL_TIMEOUT_S: Final = 30.0  # initdb, pg_basebackup, pg_ctl (which waits -t 20 s itself)
_WAIT_S: Final = 15.0  # for the standby to stream synchronously; for kipam to recover
_POLL_S: Final = 0.05
_DATABASE: Final = "kipam"
_BURST: Final = 8  # concurrent allocations acknowledged just before the primary dies


class _PgToolError(Exception):
    """A PostgreSQL tool failed; the message carries its output."""


@dataclass(frozen=True, slots=True)
class _Account:
    """Who the servers run as: ``uid`` None means this process's own user."""

    uid: int | None
    gid: int | None
    home: str


def _bin_dir() -> Path | None:
    """The server binaries: ``pg_config --bindir``, else the newest ``/usr/lib/postgresql``."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(found.stdout.strip()))
    installed = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(installed, key=lambda p: _major(p.parent.name), reverse=True)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in _TOOLS):
            return directory
    return None


def _major(version: str) -> int:
    """The major version at the start of ``version`` ("15", "15.10 (Debian ...)"); 0 if none."""
    match = re.match(r"\d+", version)
    return int(match.group()) if match else 0


def _account() -> _Account:
    """Ourselves, or as root an unprivileged system user (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return _Account(None, None, os.environ.get("HOME", "/"))
    for name in _USERS:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _Account(entry.pw_uid, entry.pw_gid, entry.pw_dir)
    pytest.skip(f"running as root and none of the users {', '.join(_USERS)} exists to run PG")


class _Pair:
    """A primary and its synchronous standby on loopback ports, under one directory."""

    def __init__(
        self, bin_dir: Path, account: _Account, base: Path, ports: tuple[int, int]
    ) -> None:
        self.bin_dir = bin_dir
        self.account = account
        self.base = base
        self.primary_port, self.standby_port = ports
        self.primary = base / "primary"
        self.standby = base / "standby"

    def run(self, tool: str, *args: str) -> str:
        """Run a PostgreSQL tool as the servers' user; its output.

        Raises:
            _PgToolError: it failed, could not run, or outlived its time.
        """
        # PG* variables (PGPORT, PGDATA, PGHOST...) would change what the tools do.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env |= {"LC_ALL": "C", "HOME": self.account.home}
        try:
            done = subprocess.run(
                [str(self.bin_dir / tool), *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,  # pg_ctl sends the server's own output to its -l file
                text=True,
                check=False,
                timeout=_TOOL_TIMEOUT_S,
                env=env,
                cwd="/",  # the servers' user may not enter ours
                umask=0o077,
                user=self.account.uid,
                group=self.account.gid,
                extra_groups=[] if self.account.uid is not None else None,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise _PgToolError(f"{tool}: {exc}") from exc
        if done.returncode != 0:
            raise _PgToolError(f"{tool} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done.stdout

    def start_primary(self) -> None:
        """Make and start the primary: WAL for a replica, every commit waits for a standby."""
        self.run("initdb", "-D", str(self.primary), "-U", "postgres", "--auth=trust")
        self._configure(
            self.primary,
            port=self.primary_port,
            wal_level="replica",
            max_wal_senders="4",
            # Any one standby must have each commit's WAL on disk before it is acknowledged.
            synchronous_standby_names="'*'",
            synchronous_commit="on",
        )
        (self.primary / "pg_hba.conf").write_text(
            "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
        )
        self._start(self.primary)

    def start_standby(self) -> None:
        """Copy the primary with ``pg_basebackup -R`` and start it as a hot standby."""
        self.run(
            "pg_basebackup",
            *("-D", str(self.standby), "-R", "-X", "stream", "-c", "fast"),
            *("-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres"),
        )
        # Settings later in the file win over the primary's copied above. Once promoted, the
        # standby has no standby of its own: kept at '*', every commit would wait forever
        # (Patroni and CloudNativePG rewrite this setting on a switchover for the same reason).
        self._configure(self.standby, port=self.standby_port, synchronous_standby_names="''")
        self._start(self.standby)

    def kill_primary(self) -> None:
        """Crash the primary: its processes quit at once, without a shutdown checkpoint."""
        self.run("pg_ctl", "stop", "-D", str(self.primary), "-m", "immediate", "-w", "-t", "20")

    def promote_standby(self) -> None:
        """Promote the standby, waiting until it accepts writes."""
        self.run("pg_ctl", "promote", "-D", str(self.standby), "-w", "-t", "20")

    def stop(self) -> None:
        """Stop whichever servers still run (immediately: their data is thrown away)."""
        for data in (self.primary, self.standby):
            pid_file = data / "postmaster.pid"
            if not pid_file.exists():
                continue
            try:
                self.run("pg_ctl", "stop", "-D", str(data), "-m", "immediate", "-w", "-t", "10")
            except _PgToolError:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)

    def dsn(self, port: int, database: str = _DATABASE) -> str:
        """A DSN of one server."""
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    def multi_host_dsn(self, *, standby_only: bool = False) -> str:
        """Both servers in one DSN, as operators give it: asyncpg keeps the writable one."""
        hosts, ports = "127.0.0.1,127.0.0.1", f"{self.primary_port},{self.standby_port}"
        if standby_only:
            hosts, ports = "127.0.0.1", str(self.standby_port)
        return (
            f"postgresql://postgres@/{_DATABASE}?host={hosts}&port={ports}"
            "&target_session_attrs=read-write"
        )

    def logs(self) -> str:
        """The end of both servers' logs, for failure messages."""
        tails = []
        for name in ("primary", "standby"):
            with contextlib.suppress(OSError):
                text = (self.base / f"{name}.log").read_text(errors="replace")
                tails.append(f"--- {name}.log\n{text[-2000:]}")
        return "\n".join(tails)

    def _configure(self, data: Path, **settings: object) -> None:
        lines = [
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = ''",  # loopback TCP only
            "max_connections = 30",
            *(f"{key} = {value}" for key, value in settings.items()),
        ]
        with (data / "postgresql.conf").open("a") as conf:
            conf.write("\n# kipam failover test\n" + "\n".join(lines) + "\n")

    def _start(self, data: Path) -> None:
        log = self.base / f"{data.name}.log"
        self.run("pg_ctl", "start", "-D", str(data), "-l", str(log), "-w", "-t", "20")


@pytest.fixture(name="pair")
def _pair(free_port: Callable[[], int]) -> Iterator[_Pair]:
    """A running primary and streaming standby; both stopped and deleted afterwards."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip(f"no PostgreSQL server binaries ({', '.join(_TOOLS)}) found")
    account = _account()
    # Not under pytest's tmp dir: as root, it is 0700 and the servers' user could not enter.
    base = Path(tempfile.mkdtemp(prefix="kipam-failover-"))
    pair = _Pair(bin_dir, account, base, (free_port(), free_port()))
    try:
        if account.uid is not None and account.gid is not None:
            os.chown(base, account.uid, account.gid)
        try:
            version = pair.run("postgres", "--version")
            major = _major(version.partition("(PostgreSQL)")[2].strip())
            if major < _MIN_MAJOR:
                pytest.skip(f"PostgreSQL {major} in {bin_dir}; kipam needs {_MIN_MAJOR}+")
            pair.start_primary()
        except _PgToolError as exc:
            pytest.skip(f"cannot start a PostgreSQL server from {bin_dir}: {exc}\n{pair.logs()}")
        pair.start_standby()  # the primary runs: from here on, a failure is a failure
        yield pair
    finally:
        pair.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _wait_for_sync_standby(pair: _Pair) -> None:
    """Poll until the primary streams to the standby synchronously."""
    conn = await asyncpg.connect(pair.dsn(pair.primary_port, "postgres"))
    try:
        deadline = time.monotonic() + _WAIT_S
        while True:
            state = await conn.fetchval(
                "SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'"
            )
            if state == "sync":
                return
            assert time.monotonic() < deadline, f"no synchronous standby: {pair.logs()}"
            await asyncio.sleep(_POLL_S)
    finally:
        await conn.close()


async def _create_database(pair: _Pair) -> None:
    """Create and migrate kipam's database on the primary (the standby replays it)."""
    admin = await asyncpg.connect(pair.dsn(pair.primary_port, "postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {_DATABASE}")
    finally:
        await admin.close()
    conn = await asyncpg.connect(pair.dsn(pair.primary_port))
    try:
        await migrate(conn)
    finally:
        await conn.close()


async def _in_recovery(pair: _Pair, port: int) -> bool:
    """Whether the server on ``port`` answers as a read-only standby."""
    conn = await asyncpg.connect(pair.dsn(port))
    try:
        return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))
    finally:
        await conn.close()


async def _allocate_until_it_succeeds(
    kipam: Kipam, pair: _Pair
) -> tuple[Allocation, list[UnavailableError]]:
    """Allocate, retrying on UNAVAILABLE until the deadline; the allocation and the errors."""
    errors: list[UnavailableError] = []
    deadline = time.monotonic() + _WAIT_S
    while True:
        try:
            allocation, created = await kipam.allocate("ha", owner="node/b", length=64)
        except UnavailableError as exc:
            errors.append(exc)
            assert time.monotonic() < deadline, (
                f"kipam did not recover within {_WAIT_S} s after the promotion; "
                f"last errors: {[e.message for e in errors[-3:]]}\n{pair.logs()}"
            )
            await asyncio.sleep(_POLL_S)
        else:
            assert created
            return allocation, errors


def _overlapping(prefix: Prefix, others: Sequence[Allocation]) -> list[str]:
    """The prefixes of ``others`` that overlap ``prefix``."""
    return [str(other.prefix) for other in others if other.prefix.overlaps(prefix)]


async def test_a_promoted_standby_takes_over_with_every_acknowledged_allocation(
    pair: _Pair, settings: Settings
) -> None:
    """Primary killed, standby promoted: the same Database reconnects and nothing is lost."""
    await _wait_for_sync_standby(pair)
    await _create_database(pair)
    multi = pair.multi_host_dsn()
    db = await Database.open(multi, settings)
    try:
        async with use_cases(settings, db) as res:
            kipam = res.kipam
            await kipam.create_pool("ha", cidr="fd3c:9e12:7a41::/48")
            first, _ = await kipam.allocate("ha", owner="node/a", length=64)
            async with db.connection() as conn:
                assert await conn.fetchval("SELECT inet_server_port()") == pair.primary_port
            # A burst of concurrent writers, acknowledged just before the crash.
            burst = await asyncio.gather(
                *(kipam.allocate("ha", owner=f"node/a{i}", length=64) for i in range(_BURST))
            )
            acknowledged = [first, *(allocation for allocation, _ in burst)]

            await asyncio.to_thread(pair.kill_primary)

            # Only the read-only standby answers now; the read-write DSN does not settle for
            # it, and the caller gets kipam's UNAVAILABLE error, not a driver exception.
            assert await _in_recovery(pair, pair.standby_port)
            with pytest.raises(DatabaseUnavailableError) as refused:
                await Database.open(multi, settings)
            assert refused.value.kind is Kind.UNAVAILABLE
            # asyncpg reports the last host's connection error when there is one (here the
            # dead primary's refusal); alone, the standby is refused for being read-only.
            with pytest.raises(DatabaseUnavailableError, match="TargetServerAttributeNotMatched"):
                await Database.open(pair.multi_host_dsn(standby_only=True), settings)
            with pytest.raises(UnavailableError) as failed:
                await kipam.allocate("ha", owner="node/b", length=64)
            assert failed.value.kind is Kind.UNAVAILABLE

            await asyncio.to_thread(pair.promote_standby)
            promoted = time.monotonic()
            second, errors = await _allocate_until_it_succeeds(kipam, pair)
            _log.info(
                "kipam allocated %.3f s after the promotion, after %d UNAVAILABLE answers %s; "
                "before it: %r, %r",
                time.monotonic() - promoted,
                len(errors),
                [e.message for e in errors],
                refused.value.message,
                failed.value.message,
            )

            async with db.connection() as conn:  # the same pool, now on the promoted standby
                assert await conn.fetchval("SELECT inet_server_port()") == pair.standby_port
                assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            held = (await kipam.list_allocations(pool="ha")).items
            assert {(a.id, a.prefix, a.owner) for a in held} == {
                (a.id, a.prefix, a.owner) for a in [*acknowledged, second]
            }, "an allocation acknowledged before the failover was lost"
            assert second.id not in {a.id for a in acknowledged}
            assert not _overlapping(second.prefix, acknowledged), second.prefix
    finally:
        await db.close()
