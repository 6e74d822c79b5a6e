"""Helpers shared by the incremental-view tests: the README's dashboard and per-user totals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sqlalchemy_matview import Incremental, MaterializedView


@dataclass
class Dashboard:
    metadata: sa.MetaData
    events: sa.Table
    mv_daily: MaterializedView
    mv_users: MaterializedView


def utc_day(events: sa.Table) -> sa.ColumnElement[Any]:
    return sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)


def build_dashboard(
    *, partitioned: bool = False, threshold: float = 0.25, realtime: bool = False
) -> Dashboard:
    """events -> mv_daily (per UTC day: count, distinct users, purchases) and mv_users
    (per user: count, sum)."""
    md = sa.MetaData()
    extra: dict[str, Any] = {}
    columns = [
        sa.Column("id", sa.Integer, primary_key=not partitioned, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount", sa.Numeric(10, 2), nullable=False, server_default="0"),
    ]
    if partitioned:
        extra["postgresql_partition_by"] = "RANGE (created_at)"
    events = sa.Table("events", md, *columns, **extra)
    day = utc_day(events)
    mv_daily = MaterializedView(
        "mv_daily",
        md,
        sa.select(
            day.label("day"),
            sa.func.count().label("events"),
            sa.func.count(events.c.user_id.distinct()).label("unique_users"),
            sa.func.coalesce(
                sa.func.sum(events.c.amount).filter(events.c.kind == "purchase"), 0
            ).label("revenue"),
        ).group_by(day),
        incremental=Incremental(
            key="day", sources={events: day}, full_refresh_above=threshold, realtime=realtime
        ),
    )
    mv_users = MaterializedView(
        "mv_users",
        md,
        sa.select(
            events.c.user_id,
            sa.func.count().label("events"),
            sa.func.sum(events.c.amount).label("total"),
        ).group_by(events.c.user_id),
        incremental=Incremental(
            key="user_id",
            sources={events: events.c.user_id},
            full_refresh_above=threshold,
            realtime=realtime,
        ),
    )
    return Dashboard(md, events, mv_daily, mv_users)


@pytest.fixture
def dashboard(engine: Engine) -> Dashboard:
    d = build_dashboard()
    d.metadata.create_all(engine)
    return d


def difference(conn: Connection, view: MaterializedView) -> int:
    """Rows in the stored table but not in the definition computed now, and the reverse."""
    definition = view.definition.subquery("d")  # type: ignore[union-attr]
    stored = sa.select(*view.table.c)
    # Groups whose key is NULL are not stored.
    key = view.incremental.key if view.incremental else ()
    fresh = sa.select(*definition.c).where(*(definition.c[k].is_not(None) for k in key))
    one = sa.select(sa.func.count()).select_from(stored.except_all(fresh).subquery())
    two = sa.select(sa.func.count()).select_from(fresh.except_all(stored).subquery())
    return int(conn.execute(one).scalar_one()) + int(conn.execute(two).scalar_one())


def insert_events(conn: Connection, events: sa.Table, rows: list[dict[str, Any]]) -> None:
    conn.execute(events.insert(), rows)


def seed_minutes(engine: Engine, d: Dashboard, minutes: int = 60000) -> None:
    """``events`` with a row a minute from 2026-01-01, ANALYZEd, then the views created and a
    row written on 2026-03-02 (one dirty day)."""
    with engine.begin() as conn:
        d.events.create(conn)
        conn.execute(
            sa.text(
                "INSERT INTO events (created_at, user_id, kind, amount)"
                " SELECT timestamptz '2026-01-01 00:00+00' + g * interval '1 minute',"
                " g % 500, 'view', 1 FROM generate_series(1, :n) g"
            ),
            {"n": minutes},
        )
    d.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE events"))
        conn.execute(
            d.events.insert(),
            [{"created_at": "2026-03-02 12:00+00", "user_id": 1, "kind": "view"}],
        )
