"""create_all / drop_all, create() / drop(), reflection, against a real server."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import (
    DefinitionError,
    MaterializedView,
    UnknownViewError,
    catalog,
    reflect_materialized_views,
    refresh,
)


def relkinds(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT n.nspname || '.' || c.relname, c.relkind::text FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
            )
        )
        return {name: kind for name, kind in rows}


@pytest.fixture
def md() -> sa.MetaData:
    return sa.MetaData()


@pytest.fixture
def events(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("event_type", sa.String(20), nullable=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False, server_default="0"),
    )


@pytest.fixture
def dashboard(md: sa.MetaData, events: sa.Table) -> MaterializedView:
    day = sa.cast(sa.func.date_trunc("day", events.c.created_at), sa.Date)
    revenue = sa.func.coalesce(
        sa.func.sum(events.c.amount).filter(events.c.event_type == "purchase"), 0
    )
    return MaterializedView(
        "mv_dashboard",
        md,
        sa.select(
            day.label("day"),
            sa.cast(sa.func.count(), sa.Integer).label("events"),
            sa.cast(sa.func.count(events.c.user_id.distinct()), sa.Integer).label("unique_users"),
            sa.cast(revenue, sa.Numeric(14, 2)).label("revenue"),
        ).group_by(day),
        unique_key="day",
        comment="one row per day",
    )


def seed(engine: Engine, events: sa.Table) -> None:
    with engine.begin() as conn:
        conn.execute(
            events.insert(),
            [
                {
                    "id": i,
                    "created_at": dt.datetime(2026, 1, 1 + i % 3, 12),
                    "user_id": i % 5,
                    "event_type": "purchase" if i % 2 else "view",
                    "amount": i,
                }
                for i in range(30)
            ],
        )


def test_create_all_orders_views_after_sources_and_is_idempotent(
    engine: Engine, md: sa.MetaData, events: sa.Table, dashboard: MaterializedView
) -> None:
    weekly = MaterializedView(
        "mv_weekly",
        md,
        sa.select(sa.func.sum(dashboard.c.events).label("events")),
        with_data=False,
    )
    sa.Index("ix_dashboard_events", dashboard.c.events)
    md.create_all(engine)
    md.create_all(engine)  # checkfirst: nothing to do, no error
    kinds = relkinds(engine)
    assert kinds["public.events"] == "r"
    assert kinds["public.mv_dashboard"] == "m"
    assert kinds["public.mv_weekly"] == "m"
    assert kinds["public.mv_dashboard_unique_key"] == "i"
    assert kinds["public.ix_dashboard_events"] == "i"
    with engine.connect() as conn:
        info = {v.name: v for v in catalog.materialized_views(conn)}
    assert info["mv_dashboard"].populated and not info["mv_weekly"].populated
    assert info["mv_dashboard"].comment == "one row per day"
    assert info["mv_dashboard"].concurrent_index == "mv_dashboard_unique_key"
    assert weekly.with_data is False
    md.drop_all(engine)
    assert relkinds(engine) == {}


def test_dashboard_refresh_sees_new_rows(
    engine: Engine, md: sa.MetaData, events: sa.Table, dashboard: MaterializedView
) -> None:
    md.create_all(engine)
    seed(engine, events)
    with engine.begin() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(dashboard.table)) == 0
        conn.execute(refresh(dashboard))
        rows = conn.execute(sa.select(dashboard.table).order_by(dashboard.c.day)).all()
    assert [r.events for r in rows] == [10, 10, 10]
    assert sum(r.revenue for r in rows) == sum(i for i in range(30) if i % 2)
    assert isinstance(rows[0].day, dt.date)


def test_create_and_drop_methods(
    engine: Engine, md: sa.MetaData, events: sa.Table, dashboard: MaterializedView
) -> None:
    events.create(engine)
    dashboard.create(engine)
    dashboard.create(engine)  # checkfirst by default
    on_top = sa.Table("plain_view_marker", sa.MetaData())
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE VIEW on_top AS SELECT day FROM mv_dashboard"))
    with pytest.raises(sa.exc.InternalError):
        dashboard.drop(engine)  # a dependent view exists and cascade is off
    dashboard.drop(engine, cascade=True)
    assert "public.on_top" not in relkinds(engine)
    assert "public.mv_dashboard" not in relkinds(engine)
    dashboard.drop(engine)  # checkfirst: already gone, fine
    del on_top


def test_schema_qualified_views(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA rep"))
        conn.execute(sa.text('CREATE SCHEMA "Other Schema"'))
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer), schema="Other Schema")
    mv = MaterializedView("Daily Totals", md, sa.select(src.c.id), schema="rep", unique_key="id")
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"id": 1}, {"id": 2}])
        conn.execute(refresh(mv))
        assert conn.scalars(sa.select(mv.c.id).order_by(mv.c.id)).all() == [1, 2]
    assert relkinds(engine)["rep.Daily Totals"] == "m"
    md.drop_all(engine)


def test_text_definition_with_depends_on(engine: Engine, md: sa.MetaData, events: sa.Table) -> None:
    mv = MaterializedView(
        "mv_text",
        md,
        "SELECT user_id, count(*)::int AS n, ':x' AS literal FROM events GROUP BY user_id",
        columns=[
            sa.Column("user_id", sa.Integer),
            sa.Column("n", sa.Integer),
            sa.Column("literal", sa.Text),
        ],
        unique_key="user_id",
        depends_on=[events],
    )
    md.create_all(engine)
    seed(engine, events)
    with engine.begin() as conn:
        conn.execute(refresh(mv))
        rows = conn.execute(sa.select(mv.table).order_by(mv.c.user_id)).all()
    assert [(r.user_id, r.n, r.literal) for r in rows] == [(u, 6, ":x") for u in range(5)]


def test_unmanaged_views_are_never_created_or_dropped(
    engine: Engine, md: sa.MetaData, events: sa.Table
) -> None:
    legacy = MaterializedView("legacy", md, sa.select(events.c.id), managed=False)
    md.create_all(engine)
    assert "public.legacy" not in relkinds(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE MATERIALIZED VIEW legacy AS SELECT 1 AS id WITH NO DATA"))
    with engine.begin() as conn:
        conn.execute(refresh(legacy, concurrently=False))
        assert conn.scalar(sa.select(sa.func.count()).select_from(legacy.table)) == 1
    with pytest.raises(DefinitionError, match="managed=False"):
        legacy.create(engine)
    with pytest.raises(DefinitionError, match="managed=False"):
        legacy.drop(engine)
    md.drop_all(engine)
    assert "public.events" not in relkinds(engine)
    assert "public.legacy" in relkinds(engine)


def test_reflect(
    engine: Engine, md: sa.MetaData, events: sa.Table, dashboard: MaterializedView
) -> None:
    sa.Index(
        "ix_partial", dashboard.c.events, unique=True, postgresql_where=dashboard.c.events > 100
    )
    md.create_all(engine)
    seed(engine, events)
    reflected_md = sa.MetaData()
    with engine.connect() as conn:
        view = MaterializedView.reflect("mv_dashboard", reflected_md, conn)
    assert view.managed is False
    assert view.unique_key == ("day",)
    assert [c.name for c in view.c] == ["day", "events", "unique_users", "revenue"]
    assert isinstance(view.c.day.type, sa.Date) and isinstance(view.c.events.type, sa.Integer)
    assert view.comment == "one row per day"
    assert {i.name for i in view.indexes} == {"mv_dashboard_unique_key", "ix_partial"}
    assert "date_trunc" in str(view.definition)
    with engine.begin() as conn:
        conn.execute(refresh(view))  # concurrently: the reflected unique index qualifies
        assert conn.scalar(sa.select(sa.func.sum(view.c.events))) == 30
    with engine.connect() as conn, pytest.raises(UnknownViewError, match="mv_dashboard"):
        MaterializedView.reflect("nope", sa.MetaData(), conn)
    assert [v.name for v in reflect_materialized_views(engine, sa.MetaData())] == ["mv_dashboard"]
    assert reflect_materialized_views(engine, md) == [dashboard]


@pytest.fixture
def dependency_chain(engine: Engine) -> Iterator[None]:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE base (id int)"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW a AS SELECT id FROM base"))
        conn.execute(sa.text("CREATE VIEW pv AS SELECT id FROM a"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW c AS SELECT id FROM pv"))
    yield


def test_catalog_dependencies_see_through_plain_views(
    engine: Engine, dependency_chain: None
) -> None:
    with engine.connect() as conn:
        edges = {
            (d.dependent[1], d.referenced[1], d.dependent_kind) for d in catalog.dependencies(conn)
        }
    assert edges == {("a", "base", "m"), ("pv", "a", "v"), ("c", "pv", "m")}


def test_catalog_without_definitions_does_not_wait_behind_a_plain_refresh(
    engine: Engine, md: sa.MetaData, events: sa.Table, dashboard: MaterializedView
) -> None:
    md.create_all(engine)
    with engine.connect() as refresher, engine.connect() as monitor:
        refresher.execute(refresh(dashboard, concurrently=False))  # ACCESS EXCLUSIVE until commit
        monitor.execute(sa.text("SET lock_timeout = '500ms'"))
        (info,) = catalog.materialized_views(monitor, definitions=False)
        assert info.name == "mv_dashboard" and info.definition is None
        assert info.concurrent_index == "mv_dashboard_unique_key" and info.size_bytes > 0
        monitor.rollback()
        monitor.execute(sa.text("SET lock_timeout = '500ms'"))
        with pytest.raises(sa.exc.OperationalError, match="lock timeout"):
            catalog.materialized_views(monitor)  # pg_get_viewdef must lock the view
        refresher.rollback()


def test_current_schema_with_an_empty_search_path(
    engine: Engine, md: sa.MetaData, events: sa.Table, dashboard: MaterializedView
) -> None:
    """Unqualified names then resolve only in pg_catalog: the views are reported missing,
    not looked up in a schema called "None"."""
    from sqlalchemy_matview import freshness

    md.create_all(engine)
    with engine.connect() as conn:
        assert catalog.current_schema(conn) == "public"
        conn.execute(sa.text("SET search_path = ''"))
        assert catalog.current_schema(conn) == "pg_catalog"
        (report,) = freshness(conn, md)
        assert report.view == "pg_catalog.mv_dashboard"
