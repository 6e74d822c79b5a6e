"""Autogenerate and incremental views: create, rebuild, convert, drop, downgrade, --sql.

Every migration is rendered to code and that code is run (online, or printed with
``--sql`` and run through psql), then autogenerate runs again and must find nothing.
After each step the view's table equals its definition computed from scratch, and a new
write followed by ``refresh_views`` is still picked up (the triggers are in place).
"""

from __future__ import annotations

import datetime as dt
import warnings
from typing import Any

import pytest
import sqlalchemy as sa
from matview_alembic_helpers import autogenerate, offline_sql, run_code
from matview_project import psql

from sqlalchemy_matview import Incremental, MaterializedView, refresh_views
from sqlalchemy_matview.catalog import installed_incremental
from sqlalchemy_matview.incremental import names_for
from sqlalchemy_matview.orchestration.incremental import FILLFACTOR, REFRESH_ARGS

NOW = dt.datetime(2026, 3, 1, 12, tzinfo=dt.timezone.utc)


def models(
    *,
    plain: bool = False,
    label: str = "n",
    key: str = "day",
    threshold: float = 0.25,
    realtime: bool = False,
) -> tuple[sa.MetaData, MaterializedView | None, sa.Table]:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer, nullable=False),
    )
    day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)
    bucket = day if key == "day" else events.c.user_id
    query = sa.select(bucket.label(key), sa.func.count().label(label)).group_by(bucket)
    if plain:
        view = MaterializedView("mv_daily", md, query, unique_key=key)
    else:
        view = MaterializedView(
            "mv_daily",
            md,
            query,
            incremental=Incremental(
                key=key, sources={events: bucket}, full_refresh_above=threshold, realtime=realtime
            ),
        )
    return md, view, events


def migrate(engine: sa.Engine, md: sa.MetaData) -> Any:
    """Autogenerate against ``md``, run the rendered upgrade, check a second run is empty."""
    with engine.begin() as conn:
        generated = autogenerate(conn, md)
        run_code(conn, generated.upgrade)
    with engine.begin() as conn:
        again = autogenerate(conn, md)
    assert again.empty, again.upgrade
    return generated


def write(engine: sa.Engine, events: sa.Table, *rows: tuple[int, dt.datetime]) -> None:
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"user_id": u, "created_at": t} for u, t in rows])


def assert_exact(engine: sa.Engine, view: MaterializedView) -> None:
    stored = sa.select(view.table)
    with engine.connect() as conn:
        missing = conn.execute(view.definition.except_(stored)).all()
        extra = conn.execute(stored.except_(view.definition)).all()
        count = conn.scalar(sa.select(sa.func.count()).select_from(view.table))
    assert (missing, extra) == ([], []), (missing, extra)
    assert count > 0


def relkind(engine: sa.Engine, name: str = "mv_daily") -> str | None:
    with engine.connect() as conn:
        return conn.scalar(
            sa.text("SELECT relkind::text FROM pg_class WHERE oid = to_regclass(:n)"), {"n": name}
        )


def reloptions(engine: sa.Engine, name: str = "mv_daily") -> list[str] | None:
    with engine.connect() as conn:
        return conn.scalar(
            sa.text("SELECT reloptions::text[] FROM pg_class WHERE oid = to_regclass(:n)"),
            {"n": name},
        )


def still_maintained(engine: sa.Engine, view: MaterializedView, events: sa.Table) -> None:
    refresh_views(engine, view)  # whatever the test wrote before
    assert_exact(engine, view)
    write(engine, events, (9, NOW + dt.timedelta(days=2)))
    [result] = refresh_views(engine, view)
    assert result.status == "refreshed" and result.buckets == 1
    assert_exact(engine, view)


def test_create_refill_rebuild_and_drop(engine: sa.Engine) -> None:
    md, view, events = models()
    assert view is not None
    first = migrate(engine, md)
    assert "op.install_change_tracking()" in first.upgrade
    assert "op.create_incremental_view(" in first.upgrade
    assert first.upgrade.index("op.create_table('events'") < first.upgrade.index(
        "op.create_incremental_view("
    )
    assert relkind(engine) == "r"
    write(engine, events, (1, NOW), (2, NOW), (1, NOW - dt.timedelta(days=3)))
    still_maintained(engine, view, events)

    # A changed definition (a column renamed), key, or threshold: rebuilt and refilled.
    for changed in (models(label="events"), models(threshold=0.5), models(key="user_id")):
        md2, view2, events2 = changed
        assert view2 is not None
        generated = migrate(engine, md2)
        assert "op.drop_incremental_view(" in generated.upgrade
        assert "op.create_incremental_view(" in generated.upgrade
        assert_exact(engine, view2)
        still_maintained(engine, view2, events2)

    # Dropped with its triggers, log and functions; the downgrade brings it back, filled.
    bare = sa.MetaData()
    events.to_metadata(bare)
    generated = migrate(engine, bare)
    assert "op.drop_incremental_view(" in generated.upgrade
    assert relkind(engine) is None
    with engine.connect() as conn:
        assert installed_incremental(conn, "sqlalchemy_matview") == []
        triggers = conn.scalar(
            sa.text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass")
        )
    assert triggers == 0
    with engine.begin() as conn:
        run_code(conn, generated.downgrade)
    # Re-created as it was, storage parameters included.
    assert reloptions(engine) == [f"fillfactor={FILLFACTOR}"]
    md3, view3, events3 = models(key="user_id")
    assert view3 is not None
    assert_exact(engine, view3)
    still_maintained(engine, view3, events3)
    with engine.begin() as conn:
        assert autogenerate(conn, md3).empty


def test_convert_plain_to_incremental_and_back(engine: sa.Engine) -> None:
    md, _, events = models(plain=True)
    migrate(engine, md)
    write(engine, events, (1, NOW), (2, NOW - dt.timedelta(days=1)))
    assert relkind(engine) == "m"

    md2, view, events2 = models()
    assert view is not None
    generated = migrate(engine, md2)
    assert "op.drop_materialized_view(" in generated.upgrade
    assert generated.upgrade.index("op.drop_materialized_view(") < generated.upgrade.index(
        "op.create_incremental_view("
    )
    assert relkind(engine) == "r"
    assert_exact(engine, view)
    still_maintained(engine, view, events2)

    md3, _, _ = models(plain=True)
    generated = migrate(engine, md3)
    assert "op.drop_incremental_view(" in generated.upgrade
    assert relkind(engine) == "m"
    with engine.begin() as conn:
        run_code(conn, generated.downgrade)  # back to incremental, refilled
    assert relkind(engine) == "r"
    assert_exact(engine, view)
    still_maintained(engine, view, events2)


@pytest.mark.parametrize("plain_first", [False, True])
def test_offline_sql_runs_in_psql(databases: tuple[sa.URL, Any], plain_first: bool) -> None:
    url, fresh = databases
    engine = sa.create_engine(url)
    offline = fresh()
    offline_engine = sa.create_engine(offline)
    try:
        steps = [models(plain=True), models()] if plain_first else [models(), models(label="x")]
        for md, _, events in steps:
            with engine.begin() as conn:
                generated = autogenerate(conn, md)
                run_code(conn, generated.upgrade)
            script = offline_sql(generated.upgrade)
            psql(script, offline)
            write(offline_engine, events, (1, NOW))
        view = steps[-1][1]
        assert view is not None
        assert relkind(offline_engine) == "r"
        [result] = refresh_views(offline_engine, view)
        assert result.status == "refreshed"
        assert_exact(offline_engine, view)
        with offline_engine.begin() as conn:
            assert autogenerate(conn, md).empty
        psql(offline_sql(generated.downgrade), offline)
    finally:
        engine.dispose()
        offline_engine.dispose()


@pytest.mark.parametrize("realtime", [False, True])
def test_schemas_needing_quotes(engine: sa.Engine, realtime: bool) -> None:
    """A view in a schema of its own and a tracking schema whose names need quoting (for a
    realtime view, its stored table's name too: ``"Daily View__stored"``)."""
    from sqlalchemy_matview import set_tracking_schema

    with engine.begin() as conn:
        conn.execute(sa.text('CREATE SCHEMA "Reports"'))

    def declared(label: str) -> tuple[sa.MetaData, MaterializedView]:
        md = sa.MetaData()
        set_tracking_schema(md, "mv admin")
        events = sa.Table(
            "events",
            md,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        )
        day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)
        view = MaterializedView(
            "Daily View",
            md,
            sa.select(day.label("day"), sa.func.count().label(label)).group_by(day),
            schema="Reports",
            incremental=Incremental(key="day", sources={events: day}, realtime=realtime),
        )
        return md, view

    md, view = declared("n")
    with engine.begin() as conn:
        generated = autogenerate(conn, md, include_schemas=True)
        run_code(conn, generated.upgrade)
    assert "op.install_change_tracking(schema='mv admin')" in generated.upgrade
    with engine.begin() as conn:
        assert autogenerate(conn, md, include_schemas=True).empty
        conn.execute(sa.text("INSERT INTO events VALUES (1, now()), (2, now())"))
    [result] = refresh_views(engine, view)
    assert result.status == "refreshed"
    assert_exact(engine, view)
    assert relkind(engine, '"Reports"."Daily View"') == ("v" if realtime else "r")

    md2, view2 = declared("events")
    with engine.begin() as conn:
        generated = autogenerate(conn, md2, include_schemas=True)
        run_code(conn, generated.upgrade)
        assert autogenerate(conn, md2, include_schemas=True).empty
    assert_exact(engine, view2)
    with engine.begin() as conn:
        run_code(conn, generated.downgrade)
    assert_exact(engine, view)


@pytest.mark.parametrize("realtime", [False, True])
def test_autogenerate_never_fills_the_view(engine: sa.Engine, realtime: bool) -> None:
    """Autogenerate creates the view in a rolled-back savepoint to compare it, but never
    runs its fill (a full computation of the definition: hours on a big table); the
    migration still carries the fill."""
    md, view, events = models(realtime=realtime)
    assert view is not None
    with engine.begin() as conn:
        events.create(conn)
    write(engine, events, (1, NOW))
    ran: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        ran.append(statement)

    for step in ("create", "rebuild"):
        ran.clear()
        with engine.begin() as conn:
            sa.event.listen(conn, "after_cursor_execute", record)
            generated = autogenerate(conn, md)
            sa.event.remove(conn, "after_cursor_execute", record)
            run_code(conn, generated.upgrade)
        fills = [s for s in ran if s.lstrip().upper().startswith("INSERT INTO PUBLIC.MV_DAILY")]
        assert fills == [], (step, fills)
        assert "INSERT INTO public.mv_daily" in generated.upgrade
        md, view, events = models(label="events", realtime=realtime)
    assert view is not None
    assert_exact(engine, view)


def test_realtime_views_are_created_switched_and_dropped(engine: sa.Engine) -> None:
    """realtime=True: the name is a view over the stored rows and the live dirty buckets."""
    md, view, events = models(realtime=True)
    assert view is not None
    generated = migrate(engine, md)
    assert "mv_daily__stored" in generated.upgrade
    assert relkind(engine) == "v"
    write(engine, events, (1, NOW), (2, NOW))
    assert_exact(engine, view)  # live, before any refresh
    still_maintained(engine, view, events)

    # Stored <-> realtime: rebuilt, and the second autogenerate finds nothing.
    md2, view2, events2 = models()
    assert view2 is not None
    migrate(engine, md2)
    assert relkind(engine) == "r"
    still_maintained(engine, view2, events2)
    md3, view3, events3 = models(realtime=True)
    assert view3 is not None
    migrate(engine, md3)
    assert relkind(engine) == "v"
    still_maintained(engine, view3, events3)

    bare = sa.MetaData()
    events.to_metadata(bare)
    migrate(engine, bare)
    assert relkind(engine) is None and relkind(engine, "mv_daily__stored") is None


def test_a_refresh_function_of_an_earlier_release_keeps_working_until_rebuilt(
    engine: sa.Engine,
) -> None:
    """Releases before this one planned their whole refresh function for every call (``SET
    plan_cache_mode``) and replaced everything by DELETE + INSERT: such a view still
    refreshes, and autogenerate rebuilds it with the current function (and fill factor)."""
    md, view, events = models()
    assert view is not None
    migrate(engine, md)
    function = names_for("public", "mv_daily").refresh
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"ALTER FUNCTION sqlalchemy_matview.{function}({REFRESH_ARGS}) "
                "SET plan_cache_mode = force_custom_plan"
            )
        )
        conn.execute(sa.text("ALTER TABLE mv_daily RESET (fillfactor)"))
    write(engine, events, (1, NOW), (2, NOW - dt.timedelta(days=1)))
    still_maintained(engine, view, events)
    with engine.begin() as conn:
        generated = autogenerate(conn, md)
    assert "op.drop_incremental_view(" in generated.upgrade
    assert "op.create_incremental_view(" in generated.upgrade
    migrate(engine, md)
    with engine.connect() as conn:
        options = conn.scalar(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'mv_daily'"))
        settings = conn.scalar(
            sa.text("SELECT proconfig FROM pg_proc WHERE proname = :f"), {"f": function}
        )
    assert options == ["fillfactor=50"]
    assert not any(s.startswith("plan_cache_mode") for s in settings or [])
    assert_exact(engine, view)
    still_maintained(engine, view, events)


def test_realtime_offline_sql_runs_in_psql(databases: tuple[sa.URL, Any]) -> None:
    """realtime=True through ``--sql``: the printed script, run by psql, makes a working view."""
    url, fresh = databases
    engine = sa.create_engine(url)
    offline = fresh()
    offline_engine = sa.create_engine(offline)
    try:
        md, view, events = models(realtime=True)
        assert view is not None
        with engine.begin() as conn:
            generated = autogenerate(conn, md)
        psql(offline_sql(generated.upgrade), offline)
        assert relkind(offline_engine) == "v"
        assert relkind(offline_engine, "mv_daily__stored") == "r"
        with offline_engine.begin() as conn:
            assert autogenerate(conn, md).empty
        # Live: a write shows before any refresh, its bucket read from the definition.
        write(offline_engine, events, (1, NOW), (2, NOW), (3, NOW - dt.timedelta(days=1)))
        assert_exact(offline_engine, view)
        with offline_engine.connect() as conn:
            stored = conn.scalar(sa.text("SELECT count(*) FROM mv_daily__stored"))
        assert stored == 0
        [result] = refresh_views(offline_engine, view)
        assert result.status == "refreshed" and result.buckets == 2
        with offline_engine.connect() as conn:
            stored = conn.scalar(sa.text("SELECT count(*) FROM mv_daily__stored"))
        assert stored == 2
        still_maintained(offline_engine, view, events)

        # Realtime -> stored and back, each through --sql; the way back is the downgrade,
        # which re-creates the realtime view from what the catalog printed.
        md2, view2, _ = models()
        assert view2 is not None
        with engine.begin() as conn:
            run_code(conn, generated.upgrade)
            switched = autogenerate(conn, md2)
        psql(offline_sql(switched.upgrade), offline)
        assert relkind(offline_engine) == "r"
        assert relkind(offline_engine, "mv_daily__stored") is None
        still_maintained(offline_engine, view2, events)
        psql(offline_sql(switched.downgrade), offline)
        assert relkind(offline_engine) == "v"
        with offline_engine.begin() as conn:
            assert autogenerate(conn, md).empty
        write(offline_engine, events, (4, NOW + dt.timedelta(days=5)))
        assert_exact(offline_engine, view)  # live again
        still_maintained(offline_engine, view, events)

        psql(offline_sql(generated.downgrade), offline)
        assert relkind(offline_engine) is None
        assert relkind(offline_engine, "mv_daily__stored") is None
    finally:
        engine.dispose()
        offline_engine.dispose()


def test_a_user_table_named_like_a_stored_table_is_compared(engine: sa.Engine) -> None:
    """Only a realtime view has a ``<name>__stored`` table; next to a stored view, a table of
    that name is the user's, and Alembic compares it as any other."""
    md, view, events = models()
    assert view is not None
    sa.Table("mv_daily__stored", md, sa.Column("id", sa.Integer, primary_key=True))
    generated = migrate(engine, md)  # and a second autogenerate finds nothing
    assert "op.create_table('mv_daily__stored'" in generated.upgrade
    bare = sa.MetaData()
    events.to_metadata(bare)
    with engine.begin() as conn:
        generated = autogenerate(conn, bare)
    assert "op.drop_table('mv_daily__stored')" in generated.upgrade

    # A realtime view's own stored table stays hidden.
    md2, view2, _ = models(realtime=True)
    assert view2 is not None
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE mv_daily__stored"))
    generated = migrate(engine, md2)
    assert "op.create_table(" not in generated.upgrade
    assert relkind(engine, "mv_daily__stored") == "r"


def test_include_schemas_never_reflects_the_bookkeeping(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With include_schemas=True, the bookkeeping schema (the logs' xid8 columns, which
    SQLAlchemy does not know) is never reflected: no SAWarning, whatever the order in which
    Alembic visits the schemas."""
    md, view, _ = models(realtime=True)
    assert view is not None
    with engine.begin() as conn:
        run_code(conn, autogenerate(conn, md).upgrade)
    asked: list[str | None] = []
    get_table_names = sa.engine.reflection.Inspector.get_table_names

    def spy(self: Any, schema: str | None = None, **kw: Any) -> Any:
        asked.append(schema)
        return get_table_names(self, schema, **kw)

    monkeypatch.setattr(sa.engine.reflection.Inspector, "get_table_names", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with engine.begin() as conn:
            assert autogenerate(conn, md, include_schemas=True).empty
    assert None in asked
    assert "sqlalchemy_matview" not in asked


def indexes_of(engine: sa.Engine, table: str = "mv_daily") -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT indexname::text, indexdef FROM pg_indexes"
                " WHERE tablename = :t AND indexname NOT LIKE '%unique_key' ORDER BY 1"
            ),
            {"t": table},
        )
        return {str(r[0]): str(r[1]) for r in rows}


@pytest.mark.parametrize("realtime", [False, True])
def test_indexes_on_an_incremental_views_table(
    databases: tuple[sa.URL, Any], realtime: bool
) -> None:
    """Indexes declared on an incremental view are created on its table (a realtime view's:
    ``<name>__stored``) by create_all and by migrations, and changed one by one (no
    rebuild), online and through --sql."""
    table = "mv_daily__stored" if realtime else "mv_daily"
    url, fresh = databases
    engine = sa.create_engine(url)
    offline = fresh()
    offline_engine = sa.create_engine(offline)

    def indexed(*wanted: str) -> tuple[sa.MetaData, MaterializedView, sa.Table]:
        md, view, events = models(realtime=realtime)
        assert view is not None
        if "n" in wanted:
            sa.Index("ix_mv_daily_n", view.c.n)
        if "n desc" in wanted:
            sa.Index("ix_mv_daily_n", view.c.n.desc())
        if "pair" in wanted:
            sa.Index("ix_mv_daily_pair", view.c.n, view.c.day, postgresql_where=view.c.n > 1)
        return md, view, events

    try:
        # create_all puts them on the table.
        md, view, events = indexed("n")
        md.create_all(offline_engine)
        assert list(indexes_of(offline_engine, table)) == ["ix_mv_daily_n"]
        md.drop_all(offline_engine)

        steps = [("n",), ("n", "pair"), ("n desc", "pair"), ()]
        previous = None
        for wanted in steps:
            md, view, events = indexed(*wanted)
            generated = migrate(engine, md)
            if previous is not None:
                assert "incremental_view(" not in generated.upgrade, generated.upgrade
                assert "op.create_index(" in generated.upgrade or "op.drop_index(" in (
                    generated.upgrade
                )
            psql(offline_sql(generated.upgrade), offline)
            with offline_engine.begin() as conn:
                assert autogenerate(conn, md).empty
            assert indexes_of(engine, table) == indexes_of(offline_engine, table)
            assert sorted(indexes_of(engine, table)) == sorted(
                {"n": "ix_mv_daily_n", "n desc": "ix_mv_daily_n", "pair": "ix_mv_daily_pair"}[w]
                for w in wanted
            )
            write(engine, events, (1, NOW))
            still_maintained(engine, view, events)
            previous = generated
        # The last step dropped both: its downgrade brings them back exactly.
        before = indexes_of(offline_engine, table)
        psql(offline_sql(generated.downgrade), offline)
        with offline_engine.connect() as conn:
            md, view, events = indexed("n desc", "pair")
            assert autogenerate(conn, md).empty
        assert before != indexes_of(offline_engine, table)
    finally:
        engine.dispose()
        offline_engine.dispose()
