"""The dashboard's models: ``events`` and the ``mv_dashboard`` materialized view over it."""

from __future__ import annotations

import sqlalchemy as sa

from sqlalchemy_matview import MaterializedView

metadata = sa.MetaData()

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("amount", sa.Numeric(10, 2)),
)

day = sa.cast(sa.func.date_trunc("day", events.c.created_at), sa.Date)
mv_dashboard = MaterializedView(
    "mv_dashboard",
    metadata,
    sa.select(
        day.label("day"),
        sa.func.count().label("events"),
        sa.func.count(events.c.user_id.distinct()).label("unique_users"),
        sa.func.coalesce(sa.func.sum(events.c.amount).filter(events.c.kind == "purchase"), 0).label(
            "revenue"
        ),
    ).group_by(day),
    unique_key="day",
    track_changes=True,
)
