"""The change feed: the history, then every new change as it commits, on any replica.

Theory of operation. ``changes`` is written by transactions that commit in any order, so
the feed never reads it by revision alone (a reader past revision 12 could later see 10
commit). It reads in ``(xid, revision)`` order, and only rows whose transaction id is below
``pg_snapshot_xmin`` of the reading statement: every transaction below that horizon has
ended, so nothing new can ever appear below the cursor. Within a pool this order is the
order of commits (migration 0002 says why). A subscriber's cursor is the ``(xid, revision)``
of the last row it considered; resuming from a revision looks that row up. "From now"
starts at the horizon and skips the transactions that the starting snapshot already sees.

Wake-ups: a replica's own commits wake its subscribers at once (:meth:`ChangeFeed.wake`);
commits of other replicas are seen at the next poll (``poll_s``). Either way each subscriber
runs one indexed range query per wake-up, never a scan of the history.

Caveat (documented for operators): a long-running transaction anywhere in the PostgreSQL
cluster holds the horizon back, and the feed waits for it to end rather than risk a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final

from service.errors import InvalidRequestError
from service.models import check_pool_name
from service.store import CHANGE_COLUMNS, change_from_row

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from service.models import Change
    from service.store import Database

__all__ = ["ChangeFeed"]

_READ: Final = f"""
SELECT h.horizon, c.xid, {CHANGE_COLUMNS}
  FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS horizon) h
  LEFT JOIN LATERAL (
      SELECT * FROM changes c
       WHERE (c.xid, c.revision) > ($1::xid8, $2::bigint) AND c.xid < h.horizon
         AND ($3::text IS NULL OR c.pool_name = $3)
         AND ($5::text IS NULL OR NOT pg_visible_in_snapshot(c.xid, $5::text::pg_snapshot))
       ORDER BY c.xid, c.revision
       LIMIT $4
  ) c ON true
"""  # noqa: S608 - fixed columns, no input


class ChangeFeed:
    """Streams ``changes`` to subscribers; one per process, shared by every transport.

    Args:
        db: The database.
        poll_s: How often a subscriber looks for changes made by other replicas.
        page: How many rows one query reads at most.
    """

    def __init__(self, db: Database, *, poll_s: float = 0.5, page: int = 500) -> None:
        self._db = db
        self._poll_s = poll_s
        self._page = page
        self._changed = asyncio.Event()
        self._closed = False
        self.subscribers = 0

    def wake(self) -> None:
        """Tell the subscribers that this replica committed changes."""
        self._changed.set()
        self._changed = asyncio.Event()

    def close(self) -> None:
        """End every subscription (at shutdown: clients resume on another replica)."""
        self._closed = True
        self.wake()

    async def watch(
        self, since_revision: int | None = None, pool: str | None = None
    ) -> AsyncGenerator[Change, None]:
        """Every change after ``since_revision`` (0: the whole history; None: from now on).

        Runs until the caller stops iterating or the feed is closed.

        Raises:
            InvalidRequestError: ``since_revision`` is negative or names no change, or
                ``pool`` is not a pool name.
        """
        if pool is not None:
            check_pool_name(pool, "pool")
        xid, revision, before = await self._start(since_revision)
        self.subscribers += 1
        try:
            while not self._closed:
                changed = self._changed  # taken before reading: no wake-up can be missed
                rows = await self._db.fetch(_READ, xid, revision, pool, self._page, before)
                for row in rows:
                    if row["revision"] is None:
                        break
                    xid, revision = row["xid"], row["revision"]
                    yield change_from_row(row)
                if len(rows) == self._page:
                    continue  # more is waiting
                # Everything below the horizon has been considered, matching or not.
                if rows[0]["horizon"] > xid:
                    xid, revision = rows[0]["horizon"], 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_s):
                        await changed.wait()
        finally:
            self.subscribers -= 1

    async def _start(self, since_revision: int | None) -> tuple[int, int, str | None]:
        """The first cursor, and for "from now" the snapshot whose changes are skipped."""
        if since_revision is None:
            # Transactions at or above the horizon may have committed already: the ones the
            # snapshot sees are "before now" and skipped; the rest are new.
            now = await self._db.fetchrow(
                "SELECT pg_snapshot_xmin(s) AS horizon, s::text AS snapshot"
                " FROM pg_current_snapshot() s"
            )
            if now is None:  # pragma: no cover - one row, always
                raise AssertionError(now)
            return now["horizon"], 0, now["snapshot"]
        if since_revision < 0:
            raise InvalidRequestError(
                "since_revision must be 0 (the whole history) or a revision.",
                field="since_revision",
            )
        if since_revision == 0:
            return 0, 0, None
        row = await self._db.fetchrow("SELECT xid FROM changes WHERE revision = $1", since_revision)
        if row is None:
            raise InvalidRequestError(
                f"No change has revision {since_revision}: resume from a revision the feed "
                "delivered, or from 0 for the whole history.",
                field="since_revision",
            )
        return row["xid"], since_revision, None
