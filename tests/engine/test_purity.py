"""The engine is pure: importing it loads no I/O, clock, randomness, logging or service code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import engine

ENGINE_DIR = Path(engine.__file__).parent

# What the engine may import: pytricia and these standard-library modules, nothing else.
ALLOWED = {
    "__future__",
    "collections",
    "dataclasses",
    "enum",
    "heapq",
    "ipaddress",
    "re",
    "types",
    "typing",
    "pytricia",
    "engine",
}
# Loaded by nothing in the engine, directly or through its dependencies.
FORBIDDEN = [
    "service",
    "asyncpg",
    "redis",
    "grpc",
    "litestar",
    "opentelemetry",
    "asyncio",
    "logging",
    "random",
    "socket",
    "time",
    "datetime",
    "threading",
    "subprocess",
]


def test_engine_imports_only_allowed_modules() -> None:
    """Every import statement in engine/ names pytricia, the engine or an allowed stdlib module."""
    found: dict[str, str] = {}
    for path in sorted(ENGINE_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                found[name.split(".")[0]] = path.name
    assert set(found) <= ALLOWED, {m: f for m, f in found.items() if m not in ALLOWED}


def test_importing_engine_loads_no_service_or_io_module() -> None:
    """Importing engine in a fresh interpreter loads none of the forbidden modules."""
    code = (
        "import json, sys; before = set(sys.modules); import engine, engine.cluster; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        f"print(json.dumps(sorted(new.intersection({FORBIDDEN!r}))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == []
