"""Realtime incremental views: the name shows stored clean buckets plus dirty ones computed
live, so reads are exact between refreshes; refreshes still store the dirty buckets."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Session

from sqlalchemy_matview import DefinitionError, Incremental, MaterializedView, refresh_views

from .conftest import build_dashboard, difference, seed_minutes, utc_day


def at(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, tzinfo=dt.timezone.utc)


def realtime_dashboard(key: str = "day") -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
    )
    day = utc_day(events)
    mv = MaterializedView(
        "mv_live",
        md,
        sa.select(
            day.label("day"),
            events.c.user_id,
            sa.func.count().label("n"),
        ).group_by(day, events.c.user_id),
        incremental=Incremental(
            key=("day", "user_id"), sources={events: (day, events.c.user_id)}, realtime=True
        ),
        comment="live per day and user",
    )
    return md, events, mv


def stored_difference(conn: sa.Connection, mv: MaterializedView) -> int:
    stored = sa.table("mv_live__stored", *(sa.column(c.name) for c in mv.table.c))
    definition = mv.definition.subquery("d")  # type: ignore[union-attr]
    a = sa.select(*stored.c).except_all(sa.select(*definition.c))
    b = sa.select(*definition.c).except_all(sa.select(*stored.c))
    return sum(
        conn.execute(sa.select(sa.func.count()).select_from(x.subquery())).scalar_one()
        for x in (a, b)
    )


def test_reads_are_exact_between_refreshes(engine):
    md, events, mv = realtime_dashboard()
    md.create_all(engine)
    with engine.connect() as conn:
        kinds = dict(
            conn.execute(
                sa.text(
                    "SELECT relname::text, relkind::text FROM pg_class"
                    " WHERE relname IN ('mv_live', 'mv_live__stored')"
                )
            ).all()
        )
        assert kinds == {"mv_live": "v", "mv_live__stored": "r"}
        assert (
            conn.execute(sa.text("SELECT obj_description('mv_live'::regclass)")).scalar()
            == "live per day and user"
        )
    with engine.begin() as conn:
        conn.execute(
            events.insert(),
            [{"created_at": at(d), "user_id": u} for d in (1, 2, 3) for u in (1, 2)],
        )
        # A writer sees its own uncommitted rows in the view.
        assert difference(conn, mv) == 0
    with engine.connect() as conn:
        assert difference(conn, mv) == 0
        assert stored_difference(conn, mv) > 0
    (result,) = refresh_views(engine, mv)
    assert result.buckets == 6
    with engine.begin() as conn:
        assert stored_difference(conn, mv) == 0
        conn.execute(events.update().where(events.c.user_id == 1).values(created_at=at(9)))
        conn.execute(events.delete().where(events.c.user_id == 2, events.c.id < 3))
        assert difference(conn, mv) == 0
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE events"))
        conn.execute(events.insert(), [{"created_at": at(4), "user_id": 3}])
        assert difference(conn, mv) == 0
    (result,) = refresh_views(engine, mv)
    assert result.full_refresh
    with engine.connect() as conn:
        assert difference(conn, mv) == 0
        assert stored_difference(conn, mv) == 0
    md.drop_all(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('mv_live__stored')")).scalar() is None
        assert conn.execute(sa.text("SELECT to_regclass('mv_live')")).scalar() is None


def test_the_orm_maps_a_realtime_view(engine):
    md, events, mv = realtime_dashboard()

    class Base(DeclarativeBase):
        metadata = md

    class Live(Base):
        __table__ = mv.table

    md.create_all(engine)
    with Session(engine) as session:
        session.execute(events.insert(), [{"created_at": at(5), "user_id": 7}])
        (row,) = session.scalars(sa.select(Live)).all()
        assert (row.day, row.user_id, row.n) == (dt.date(2026, 3, 5), 7, 1)


def test_a_realtime_views_indexes_are_on_its_stored_table(engine):
    """The name is a plain view, which takes no index: one declared on it is created on
    the table holding its rows, which the view reads for the clean buckets."""
    md, events, mv = realtime_dashboard()
    sa.Index("ix_live_n", mv.c.n)
    md.create_all(engine)
    with engine.connect() as conn:
        where = conn.execute(
            sa.text("SELECT tablename::text FROM pg_indexes WHERE indexname = 'ix_live_n'")
        ).scalar_one()
    assert where == "mv_live__stored"
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"created_at": at(5), "user_id": 7}])
    refresh_views(engine, mv)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(mv.c.n).where(mv.c.n == 1)) == 1
    md.drop_all(engine)


def test_realtime_must_be_a_bool():
    md = sa.MetaData()
    events = sa.Table("events", md, sa.Column("id", sa.Integer, primary_key=True))
    with pytest.raises(DefinitionError, match="realtime='yes' must be True or False"):
        MaterializedView(
            "mv_ids",
            md,
            sa.select(events.c.id, sa.func.count().label("n")).group_by(events.c.id),
            incremental=Incremental(key="id", sources={events: events.c.id}, realtime="yes"),  # type: ignore[arg-type]
        )


def test_a_read_computes_the_dirty_days_through_the_bucket_index(engine):
    d = build_dashboard(realtime=True)
    sa.Index("ix_events_utc_day", utc_day(d.events))
    seed_minutes(engine, d)
    with engine.connect() as conn:
        plan = "\n".join(conn.execute(sa.text("EXPLAIN SELECT * FROM mv_daily")).scalars())
        assert "ix_events_utc_day" in plan, plan
        assert difference(conn, d.mv_daily) == 0
