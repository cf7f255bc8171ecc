"""Aligned text tables for people: ``?format=text`` or ``Accept: text/plain``.

A NetBox user reads lists in a browser table; a kipam user in a terminal gets the same with
``curl .../v1/lookup/2001:db8::1?format=text``: one header line, one row per item, columns
padded to their widest cell, empty cells as ``-``.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from service.rest.schemas import AllocationOut, ChangeOut, PoolOut, UsageOut

__all__ = ["allocations", "changes", "pools", "table", "usage"]


def _cell(value: object) -> str:
    if value is None or value in ("", {}):
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns padded to their widest cell, two spaces apart, one line per row."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = (
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
    return "\n".join(lines) + "\n"


def pools(items: Sequence[PoolOut]) -> str:
    """A table of pools."""
    return table(
        ("NAME", "CIDR", "ROLE", "PARENT", "SPACE", "LABELS"),
        ((p.name, p.cidr, p.role, p.parent, p.space, p.labels) for p in items),
    )


def allocations(items: Sequence[AllocationOut]) -> str:
    """A table of allocations, with the time range each one was held."""
    return table(
        ("ID", "POOL", "PREFIX", "OWNER", "STATE", "FROM", "UNTIL", "LABELS"),
        (
            (a.id, a.pool, a.prefix, a.owner, a.state, a.created_at, a.released_at, a.labels)
            for a in items
        ),
    )


def changes(items: Sequence[ChangeOut]) -> str:
    """A table of history entries."""
    return table(
        ("REVISION", "AT", "KIND", "POOL", "PREFIX", "OWNER", "ACTOR", "REQUEST"),
        (
            (c.revision, c.at, c.kind, c.pool, c.prefix, c.owner, c.actor, c.request_id)
            for c in items
        ),
    )


def usage(u: UsageOut) -> str:
    """A pool's usage as labelled lines, percentages first."""
    rows: list[tuple[str, object]] = [
        ("pool", f"{u.pool} ({u.cidr})"),
        ("utilization", f"{u.utilization_percent:.2f} %"),
        ("free", f"{u.free_percent:.2f} % ({u.free} addresses)"),
        ("largest free block", u.largest_free),
        ("fragmentation", f"{u.fragmentation:.2f}"),
        ("allocations", f"{u.allocations} ({u.quarantined} in quarantine)"),
    ]
    if u.length is not None:
        rows.append((f"free /{u.length}s", u.free_blocks))
    return table(("FIELD", "VALUE"), rows)
