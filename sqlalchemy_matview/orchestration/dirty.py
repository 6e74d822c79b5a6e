"""How far behind incremental views are: dirty buckets, for status, freshness and metrics.

An incremental view's log holds one row per bucket *and writing transaction*: a busy "today"
bucket can have a hundred thousand rows. Counting its distinct buckets must not read them
all, so :func:`dirty_buckets` walks the log's primary key (key columns first) from one bucket
to the next, one index probe per bucket, and stops at a cap.

The log keeps no time, so how old the oldest unrefreshed change is can only be bounded: every
change older than the start of the last refresh was consumed by it (a refresh consumes what
its snapshot sees), so a dirty view's staleness is at most the time since that start
(:func:`staleness_bound`).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..bookkeeping import tracking_schema
from ..catalog import QualifiedName
from ..incremental import names_for

__all__ = ["DIRTY_CAP", "DirtyBuckets", "dirty_buckets", "staleness_bound"]

#: Buckets counted at most per view (a status never walks a whole log).
DIRTY_CAP = 1000

_LOG_KEY = sa.text(
    """
    SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum)
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(:log)
       AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
       AND a.attname OPERATOR(pg_catalog.<>) 'sqlalchemy_matview_xid'
    """
)


@dataclass(frozen=True)
class DirtyBuckets:
    """What an incremental view's log holds."""

    #: Distinct buckets logged and not yet recomputed (at most :data:`DIRTY_CAP`).
    count: int
    #: True when there are more than ``count``.
    capped: bool
    #: A source was truncated since the last refresh, or a partition attached, detached or
    #: dropped: the next one recomputes everything.
    truncated: bool

    @property
    def dirty(self) -> bool:
        return self.truncated or self.count > 0


def _count_query(
    conn: Connection, log: str, whole: str, reshaped: str, key: list[str]
) -> sa.TextClause:
    q = conn.dialect.identifier_preparer.quote
    cols = ", ".join(q(k) for k in key)
    ordered = ", ".join(f"l.{q(k)}" for k in key)
    after = (
        f"ROW({ordered}) OPERATOR(pg_catalog.>) ROW(" + ", ".join(f"b.{q(k)}" for k in key) + ")"
    )
    # A loose index scan: the next bucket after the previous one, through the primary key.
    return sa.text(
        f"""
        WITH RECURSIVE b AS (
            (SELECT {cols} FROM {log} ORDER BY {cols} LIMIT 1)
          UNION ALL
            SELECT n.* FROM b, LATERAL (
                SELECT {ordered} FROM {log} AS l WHERE {after} ORDER BY {ordered} LIMIT 1
            ) AS n
        )
        SELECT (SELECT pg_catalog.count(*) FROM (SELECT 1 FROM b LIMIT :cap) AS c) AS n,
               EXISTS (SELECT 1 FROM {whole})
               OR (SELECT r.reshaped FROM {reshaped}() AS r) AS truncated
        """
    )


def dirty_buckets(
    conn: Connection,
    views: Iterable[QualifiedName],
    schema: str | None = None,
    cap: int = DIRTY_CAP,
) -> dict[QualifiedName, DirtyBuckets]:
    """The dirty buckets of each incremental view of ``views`` (``(schema, name)``; others
    are left out), read-only: two small queries per view, never a scan of its log.

    Example::

        with engine.connect() as conn:
            for (schema, name), d in dirty_buckets(conn, [("public", "mv_daily")]).items():
                print(name, d.count, "+" if d.capped else "", d.truncated)
    """
    bk = schema or tracking_schema()
    preparer = conn.dialect.identifier_preparer
    out: dict[QualifiedName, DirtyBuckets] = {}
    for view in views:
        names = names_for(*view)
        log = f"{preparer.quote_schema(bk)}.{preparer.quote(names.log)}"
        whole = f"{preparer.quote_schema(bk)}.{preparer.quote(names.whole)}"
        reshaped = f"{preparer.quote_schema(bk)}.{preparer.quote(names.reshaped)}"
        key = conn.execute(_LOG_KEY, {"log": log}).scalar()
        if not key:
            continue
        query = _count_query(conn, log, whole, reshaped, list(key))
        row = conn.execute(query, {"cap": cap + 1}).one()
        count = int(row.n)
        out[view] = DirtyBuckets(min(count, cap), count > cap, bool(row.truncated))
    return out


def staleness_bound(
    dirty: DirtyBuckets,
    last_refreshed_at: datetime.datetime | None,
    last_duration: datetime.timedelta | float | None,
    now: datetime.datetime,
) -> datetime.timedelta | None:
    """At most how old an incremental view's oldest unrefreshed change is: zero when its
    log is empty, else the time since its last refresh started (``None``: never refreshed
    through this library, unknown)."""
    zero = datetime.timedelta(0)
    if not dirty.dirty:
        return zero
    if last_refreshed_at is None:
        return None
    if isinstance(last_duration, (int, float)):
        last_duration = datetime.timedelta(seconds=last_duration)
    started = last_refreshed_at - (last_duration or zero)
    return max(now - started, zero)
