"""The embedded PostgreSQL: a real server per test in a temporary data directory, no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

from service.embedded import (
    DATABASE,
    DataDirectoryInUseError,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    running_dsn,
)
from service.errors import Kind, UnavailableError, kind_of

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 30.0  # the bound on every wait in this module

# A kipam stand-in: starts the server, commits a row, says so, then waits to be SIGKILLed.
HOLDER = """
import asyncio, json, os, sys, time
from pathlib import Path
import asyncpg
from service.embedded import EmbeddedPostgres

data_dir, ready = Path(sys.argv[1]), Path(sys.argv[2])
dsn = EmbeddedPostgres(data_dir).start()

async def write():
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE survivors (name text)")
        await conn.execute("INSERT INTO survivors VALUES ('before the crash')")
    finally:
        await conn.close()

asyncio.run(write())
ready.with_suffix(".tmp").write_text(json.dumps({"pid": os.getpid()}))
ready.with_suffix(".tmp").rename(ready)
time.sleep(120)
"""

# Starts the server and exits normally without calling stop().
EXITER = """
import sys
from pathlib import Path
from service.embedded import EmbeddedPostgres

EmbeddedPostgres(Path(sys.argv[1])).start()
"""

# Run by an unprivileged user: the server must run as that user and serve queries.
UNPRIVILEGED = """
import asyncio, os, sys
from pathlib import Path
import asyncpg
from service.embedded import EmbeddedPostgres

async def select_one(dsn):
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT 1")
    finally:
        await conn.close()

data_dir = Path(sys.argv[1])
with EmbeddedPostgres(data_dir) as server:
    pid = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{pid}").st_uid == os.getuid()
    assert asyncio.run(select_one(server.dsn)) == 1
print("served")
"""

# Tries to start on a directory someone else holds; prints the error.
CONTENDER = """
import sys
from pathlib import Path
from service.embedded import DataDirectoryInUseError, EmbeddedPostgres

try:
    EmbeddedPostgres(Path(sys.argv[1])).start()
except DataDirectoryInUseError as exc:
    print(f"{exc.holder_pid}|{exc}")
    sys.exit(3)
sys.exit(0)
"""


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def postmaster_pid(data_dir: Path) -> int | None:
    """The PID in ``postmaster.pid``, or ``None`` when the file is absent."""
    try:
        return int((data_dir / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
    except FileNotFoundError:
        return None


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def python(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script in a fresh interpreter, from the repository root, to completion."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


async def fetch_names(dsn: str) -> list[str]:
    """The names in table ``survivors``."""
    conn = await asyncpg.connect(dsn)
    try:
        return [row["name"] for row in await conn.fetch("SELECT name FROM survivors")]
    finally:
        await conn.close()


def kill_leftover(data_dir: Path) -> None:
    """SIGKILL the server named in ``data_dir``'s postmaster.pid, if one is still running."""
    pid = postmaster_pid(data_dir)
    if pid is not None and pid > 0 and is_running(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(name="base")
def fx_base() -> Iterator[Path]:
    """A private temporary directory directly under the system temp directory.

    Not ``tmp_path``: every pytest session resets ``/tmp/pytest-of-<user>`` to mode 0700, so
    when we run as root another session starting meanwhile would cut the server's user off from
    a data directory beneath it.
    """
    base = Path(tempfile.mkdtemp(prefix="kipam-test-"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="data_dir")
def fx_data_dir(base: Path) -> Iterator[Path]:
    """A kipam data directory; any server still running in it at teardown is killed."""
    data_dir = base / "kipam"
    yield data_dir
    kill_leftover(data_dir)


@pytest.fixture(name="server")
def fx_server(data_dir: Path) -> Iterator[EmbeddedPostgres]:
    """A started embedded PostgreSQL, stopped at teardown."""
    with EmbeddedPostgres(data_dir) as server:
        yield server


async def test_serves_database_kipam_with_btree_gist(server: EmbeddedPostgres) -> None:
    """The DSN reaches database kipam over a unix socket, and btree_gist can be installed."""
    assert "host=/" in server.dsn
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute("CREATE EXTENSION btree_gist")
        await conn.execute(
            "CREATE TABLE held (pool int, block int4range,"
            " EXCLUDE USING gist (pool WITH =, block WITH &&))"
        )
        await conn.execute("INSERT INTO held VALUES (1, '[0,10)'), (2, '[0,10)')")
        with pytest.raises(asyncpg.ExclusionViolationError):
            await conn.execute("INSERT INTO held VALUES (1, '[5,15)')")
        assert await conn.fetchval("SELECT current_database()") == DATABASE
        assert await conn.fetchval("SHOW listen_addresses") == ""
    finally:
        await conn.close()


def test_server_never_runs_as_root(server: EmbeddedPostgres) -> None:
    """The postmaster runs as us, or as a non-root system user when we are root."""
    pid = postmaster_pid(server.data_dir)
    assert pid is not None
    owner = Path(f"/proc/{pid}").stat().st_uid
    assert owner != 0
    if os.geteuid() != 0:
        assert owner == os.geteuid()


async def test_restart_keeps_data(data_dir: Path) -> None:
    """Rows committed before stop() are there after the next start, started off the loop."""
    first = EmbeddedPostgres(data_dir)
    dsn = await asyncio.to_thread(first.start)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE survivors (name text)")
        await conn.execute("INSERT INTO survivors VALUES ('kept')")
    finally:
        await conn.close()
    await asyncio.to_thread(first.stop)

    with EmbeddedPostgres(data_dir) as second:
        assert await fetch_names(second.dsn) == ["kept"]


def test_stop_is_idempotent_and_stops_the_server(data_dir: Path) -> None:
    """stop() ends the postmaster and removes postmaster.pid; calling it again does nothing."""
    server = EmbeddedPostgres(data_dir)
    server.stop()  # never started: a no-op
    server.start()
    assert server.start() == server.dsn  # a second start returns the same DSN
    pid = postmaster_pid(data_dir)
    assert pid is not None
    server.stop()
    server.stop()
    assert not is_running(pid)
    assert postmaster_pid(data_dir) is None
    with pytest.raises(EmbeddedPostgresError, match="not running"):
        _ = server.dsn
    server.start()  # the same instance starts again
    server.stop()


def test_errors_are_unavailable() -> None:
    """Embedded-database errors are service errors of kind UNAVAILABLE (HTTP 503)."""
    error = DataDirectoryInUseError(Path("/data"), 42)
    assert isinstance(error, EmbeddedPostgresError)
    assert isinstance(error, UnavailableError)
    assert kind_of(error) is Kind.UNAVAILABLE
    assert "/data" in str(error)
    assert "pid 42" in str(error)


@pytest.mark.usefixtures("server")
def test_second_instance_in_the_same_process_is_refused(data_dir: Path) -> None:
    """A second EmbeddedPostgres on a held data directory names the directory and our PID."""
    with pytest.raises(DataDirectoryInUseError) as caught:
        EmbeddedPostgres(data_dir).start()
    assert caught.value.holder_pid == os.getpid()
    assert str(data_dir) in str(caught.value)
    assert f"pid {os.getpid()}" in str(caught.value)
    assert is_running(postmaster_pid(data_dir) or 0)  # the holder's server is untouched


def test_second_process_is_refused(server: EmbeddedPostgres, data_dir: Path) -> None:
    """Another process starting on a held data directory gets the directory and holder's PID."""
    result = python(CONTENDER, str(data_dir))
    assert result.returncode == 3, result.stderr
    holder, _, message = result.stdout.strip().partition("|")
    assert int(holder) == os.getpid()
    assert str(data_dir) in message
    assert server.dsn  # still ours


def crash_holder(data_dir: Path) -> int:
    """Run a kipam stand-in that commits a row, check it is refused to us, then SIGKILL it.

    Returns:
        The PID of the postmaster the stand-in started, which outlives it.
    """
    ready = data_dir.parent / "ready.json"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir), str(ready)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            wait_for(lambda: ready.exists() or child.poll() is not None, "the holder to start")
            assert ready.exists(), child.communicate(timeout=WAIT_S)[1]
            with pytest.raises(DataDirectoryInUseError) as caught:
                EmbeddedPostgres(data_dir).start()
            assert caught.value.holder_pid == json.loads(ready.read_text())["pid"]
        finally:
            child.kill()
            child.communicate(timeout=WAIT_S)
    orphan = postmaster_pid(data_dir)
    assert orphan is not None
    return orphan


@pytest.mark.slow
@pytest.mark.parametrize("postmaster_survives", [True, False], ids=["orphan", "dead-postmaster"])
async def test_recovers_after_kipam_is_killed(data_dir: Path, postmaster_survives: bool) -> None:
    """After SIGKILL of kipam (and maybe of its postmaster) the next start serves the data."""
    orphan = await asyncio.to_thread(crash_holder, data_dir)
    assert is_running(orphan)  # pg_ctl detached it: it outlives kipam
    if not postmaster_survives:
        os.kill(orphan, signal.SIGKILL)
        await asyncio.to_thread(wait_for, lambda: not is_running(orphan), "the postmaster to die")

    with EmbeddedPostgres(data_dir) as server:
        assert await fetch_names(server.dsn) == ["before the crash"]
        assert postmaster_pid(data_dir) != orphan
        assert not is_running(orphan)  # stopped, not adopted


@pytest.mark.slow
async def test_start_waits_for_backends_of_a_killed_postmaster(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A start retries while a SIGKILLed postmaster's backend still holds its shared memory."""
    caplog.set_level(logging.INFO, logger="service.embedded")
    first = EmbeddedPostgres(data_dir)
    conn = await asyncpg.connect(await asyncio.to_thread(first.start))
    backend: int = await conn.fetchval("SELECT pg_backend_pid()")
    postmaster = postmaster_pid(data_dir)
    assert postmaster is not None
    os.kill(backend, signal.SIGSTOP)  # a backend that lingers after its postmaster
    try:
        os.kill(postmaster, signal.SIGKILL)
        await asyncio.to_thread(wait_for, lambda: not is_running(postmaster), "the postmaster")
        first.stop()  # nothing left to stop: it only releases the lock
        resume = threading.Timer(1.0, os.kill, (backend, signal.SIGCONT))
        resume.start()
        second = EmbeddedPostgres(data_dir)
        await asyncio.to_thread(second.start)
        resume.join(timeout=WAIT_S)
        await asyncio.to_thread(second.stop)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(backend, signal.SIGCONT)
        conn.terminate()
    assert "old backends still hold shared memory" in caplog.text


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    with subprocess.Popen(["true"]) as gone:  # noqa: S607 - any short-lived program will do
        gone.wait(timeout=WAIT_S)
    return gone.pid


async def test_stale_pid_file_with_a_dead_pid_is_recovered(data_dir: Path) -> None:
    """A postmaster.pid whose PID is dead does not stop the next start."""
    with EmbeddedPostgres(data_dir) as server:
        pid_file = data_dir / "pgdata" / "postmaster.pid"
        contents = pid_file.read_text()
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute("CREATE TABLE survivors (name text)")
            await conn.execute("INSERT INTO survivors VALUES ('kept')")
        finally:
            await conn.close()
    gone = dead_pid()
    pid_file.write_text(contents.replace(contents.split("\n", 1)[0], str(gone), 1))

    with EmbeddedPostgres(data_dir) as server:
        assert await fetch_names(server.dsn) == ["kept"]
        assert postmaster_pid(data_dir) != gone


def test_stale_pid_file_naming_a_live_stranger_is_recovered(data_dir: Path) -> None:
    """A postmaster.pid whose PID was reused by some other process is removed, not obeyed."""
    with EmbeddedPostgres(data_dir):
        pid_file = data_dir / "pgdata" / "postmaster.pid"
        contents = pid_file.read_text()
    stranger = os.getpid()  # alive, and certainly not a postmaster
    pid_file.write_text(contents.replace(contents.split("\n", 1)[0], str(stranger), 1))

    with EmbeddedPostgres(data_dir):
        assert postmaster_pid(data_dir) not in {None, stranger}


def test_normal_interpreter_exit_stops_the_server(data_dir: Path) -> None:
    """A process that starts the server and exits without stop() leaves no server behind."""
    result = python(EXITER, str(data_dir))
    assert result.returncode == 0, result.stderr
    assert postmaster_pid(data_dir) is None  # removed by the server's own clean shutdown
    with EmbeddedPostgres(data_dir):  # and the lock went with the process
        pass


def exists(path: Path) -> bool:
    """Whether anything is at ``path`` (a blocking check, kept out of the async tests)."""
    return path.exists()


def is_private_dir(path: Path) -> bool:
    """Whether ``path`` is a directory closed to group and others."""
    return path.is_dir() and path.stat().st_mode & 0o077 == 0


async def test_long_data_dir_gets_a_private_socket_dir(base: Path) -> None:
    """A data directory too long for a socket path gets a private socket directory till stop()."""
    data_dir = base / ("d" * 100)
    try:
        with EmbeddedPostgres(data_dir) as server:
            host = server.dsn.partition("host=")[2].partition("&")[0]
            assert not host.startswith(str(data_dir))
            assert is_private_dir(Path(host))
            conn = await asyncpg.connect(server.dsn)
            try:
                assert await conn.fetchval("SELECT 1") == 1
            finally:
                await conn.close()
        assert not exists(Path(host))  # removed by stop()
    finally:
        kill_leftover(data_dir)


def test_foreign_directory_is_refused_and_left_alone(data_dir: Path) -> None:
    """A non-empty pgdata that is not a PostgreSQL cluster is refused, untouched."""
    precious = data_dir / "pgdata" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("mine")
    with pytest.raises(EmbeddedPostgresError, match="no PG_VERSION"):
        EmbeddedPostgres(data_dir).start()
    assert precious.read_text() == "mine"
    with EmbeddedPostgres(data_dir / "other"):  # the lock was released on failure
        pass


def test_interrupted_initdb_is_redone(data_dir: Path) -> None:
    """Leftovers of an initdb killed half-way are replaced by a complete cluster."""
    staging = data_dir / "pgdata.initdb"
    staging.mkdir(parents=True)
    (staging / "PG_VERSION").write_text("18\n")
    with EmbeddedPostgres(data_dir):
        assert (data_dir / "pgdata" / "PG_VERSION").is_file()
    assert not staging.exists()


def test_import_emits_no_warning() -> None:
    """Importing the module warns about nothing, even without XDG_RUNTIME_DIR."""
    env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import service.embedded"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the whole module already runs as a normal user")
def test_runs_as_a_normal_user(base: Path) -> None:
    """Started by an unprivileged user, the server runs as that user and serves queries."""
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("there is no user nobody")
    os.chown(base, nobody.pw_uid, nobody.pw_gid)
    data_dir = base / "kipam"

    def as_nobody(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, *args],
            cwd=ROOT,
            env={**os.environ, "HOME": str(base)},
            user=nobody.pw_uid,
            group=nobody.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            check=False,
        )

    try:
        probe = as_nobody("import service.embedded")
    except PermissionError as exc:
        pytest.skip(f"user nobody cannot run {sys.executable}: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import kipam: {probe.stderr.strip()[-200:]}")
    try:
        result = as_nobody(UNPRIVILEGED, str(data_dir))
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "served"
    finally:
        kill_leftover(data_dir)


def test_commands_attach_to_the_running_server(server: EmbeddedPostgres, data_dir: Path) -> None:
    """`kipam token` while the embedded server runs: through its socket, not a second server."""
    assert running_dsn(data_dir) == server.dsn
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIPAM_")}
    env["KIPAM_DATA_DIR"] = str(data_dir)
    made = subprocess.run(
        [sys.executable, "-m", "service.cli", "token", "create", "ops", "--scope", "admin"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("kipam_")
    listed = subprocess.run(
        [sys.executable, "-m", "service.cli", "token", "list", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert [t["name"] for t in json.loads(listed.stdout)["items"]] == ["ops"]
    assert server.dsn  # still ours, still running


def test_no_running_server_means_no_dsn(data_dir: Path) -> None:
    """Nothing to attach to: the commands start the embedded server themselves."""
    assert running_dsn(data_dir) is None
    with EmbeddedPostgres(data_dir):
        pass
    assert running_dsn(data_dir) is None  # stopped again
