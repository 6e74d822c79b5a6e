"""Incremental views: created filled, writes logged by bucket, refreshes recompute them."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import (
    DefinitionError,
    Incremental,
    MaterializedView,
    lock_key,
    refresh_all,
    refresh_history,
    refresh_stale,
    refresh_views,
)
from sqlalchemy_matview.incremental import names_for
from sqlalchemy_matview.orchestration.incremental import incremental_state

from .conftest import build_dashboard, difference, seed_minutes

UTC = dt.timezone.utc


def at(day: int, hour: int = 12) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, tzinfo=UTC)


def test_create_fill_log_refresh(engine):
    d = build_dashboard()
    with engine.begin() as conn:
        d.metadata.tables["events"].create(conn)
        conn.execute(
            d.events.insert(),
            [
                {
                    "created_at": at(1 + i % 3),
                    "user_id": i % 5,
                    "kind": "purchase" if i % 2 else "view",
                    "amount": i,
                }
                for i in range(30)
            ],
        )
    d.metadata.create_all(engine)
    with engine.begin() as conn:
        assert difference(conn, d.mv_daily) == 0
        assert difference(conn, d.mv_users) == 0
        assert incremental_state(conn, d.mv_daily).dirty_buckets == 0
        conn.execute(d.events.insert(), [{"created_at": at(2), "user_id": 9, "kind": "view"}])
        conn.execute(d.events.update().where(d.events.c.id == 1).values(created_at=at(5)))
    with engine.connect() as conn:
        assert incremental_state(conn, d.mv_daily).dirty_buckets == 3  # 2, 5 and 1's old day
        assert difference(conn, d.mv_daily) > 0
    results = refresh_views(engine, d.mv_daily, d.mv_users)
    assert [r.status for r in results] == ["refreshed", "refreshed"]
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
        assert difference(conn, d.mv_users) == 0
        assert incremental_state(conn, d.mv_daily).dirty_buckets == 0


def seed(engine, d, n: int = 60) -> None:
    with engine.begin() as conn:
        d.events.create(conn)
        conn.execute(
            d.events.insert(),
            [
                {
                    "created_at": at(1 + i % 6, i % 24),
                    "user_id": i % 7,
                    "kind": "purchase" if i % 3 == 0 else "view",
                    "amount": i % 11,
                }
                for i in range(n)
            ],
        )
    d.metadata.create_all(engine)


def bookkeeping_objects(conn) -> set[str]:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'sqlalchemy_matview' AND c.relname LIKE 'inc\\_%'"
            " UNION ALL SELECT p.proname::text FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'sqlalchemy_matview' AND p.proname LIKE 'inc\\_%'"
            " UNION ALL SELECT t.tgname::text FROM pg_trigger t"
            " WHERE t.tgname LIKE 'sqlalchemy_matview_inc%'"
            " UNION ALL SELECT s.stxname::text FROM pg_statistic_ext s"
            " WHERE s.stxname LIKE 'inc\\_%'"
        )
    )
    return {r[0] for r in rows}


def test_the_table_is_a_table_with_a_primary_key(engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.connect() as conn:
        kind = conn.execute(
            sa.text("SELECT relkind FROM pg_class WHERE oid = 'mv_daily'::regclass")
        )
        assert kind.scalar() == "r"
        pk = conn.execute(
            sa.text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'mv_daily'::regclass AND contype = 'p'"
            )
        ).scalar()
        assert pk == "PRIMARY KEY (day)"
        # Exact types of the query (count() is bigint, not the Integer SQLAlchemy infers).
        types = dict(
            conn.execute(
                sa.text(
                    "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute"
                    " WHERE attrelid = 'mv_daily'::regclass AND attnum > 0"
                )
            ).all()
        )
        assert types["events"] == "bigint"
        assert types["day"] == "date"


def test_drop_all_removes_everything(engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.connect() as conn:
        objects = bookkeeping_objects(conn)
    # Per view: log, truncate marks, leaves and reshaped(), trigger function, refresh
    # function (and the logs' primary keys), statistics on the day (user_id has its own);
    # 5 triggers on events.
    own = [o for o in objects if o.startswith("inc_") and not o.endswith("_pkey")]
    assert len(own) == 2 * 6 + 1
    assert len([o for o in objects if o.startswith("sqlalchemy_matview_inc")]) == 2 * 5
    d.metadata.drop_all(engine)
    with engine.connect() as conn:
        assert bookkeeping_objects(conn) == set()
        assert conn.execute(sa.text("SELECT to_regclass('mv_daily')")).scalar() is None


def bare_events() -> tuple[sa.MetaData, sa.Table]:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    return md, events


def per_day(name: str, md: sa.MetaData, events: sa.Table, day: Any) -> MaterializedView:
    return MaterializedView(
        name,
        md,
        sa.select(day.label("day"), sa.func.count().label("n")).group_by(day),
        incremental=Incremental(key="day", sources={events: day}),
    )


def test_a_stable_bucket_function_is_refused_by_the_server(engine):
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION public.local_day(timestamptz) RETURNS date"
                " LANGUAGE sql STABLE AS 'SELECT $1::date'"
            )
        )
    md, events = bare_events()
    day = sa.func.public.local_day(events.c.created_at, type_=sa.Date)
    per_day("mv_local", md, events, day)
    with pytest.raises(DefinitionError, match=r"'mv_local'.*is not IMMUTABLE.*timezone"):
        md.create_all(engine)
    with engine.connect() as conn:
        # Nothing was created: not even the source (create_all's transaction rolled back).
        assert conn.execute(sa.text("SELECT to_regclass('mv_local')")).scalar() is None
        assert bookkeeping_objects(conn) == set()


def test_an_unqualified_user_function_is_refused(engine):
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION public.utc_day(timestamptz) RETURNS date"
                " LANGUAGE sql IMMUTABLE AS $$SELECT (timezone('UTC', $1))::date$$"
            )
        )
    md, events = bare_events()
    unqualified = sa.func.utc_day(events.c.created_at, type_=sa.Date)
    per_day("mv_utc", md, events, unqualified)
    with pytest.raises(DefinitionError, match=r"'mv_utc'.*qualify your functions"):
        md.create_all(engine)
    # Qualified, it works.
    md, events = bare_events()
    qualified = sa.func.public.utc_day(events.c.created_at, type_=sa.Date)
    mv = per_day("mv_utc", md, events, qualified)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"created_at": at(3)}, {"created_at": None}])
    assert refresh_views(engine, mv)[0].buckets == 1
    with engine.connect() as conn:
        assert difference(conn, mv) == 0


def with_column(name: str, md: sa.MetaData, events: sa.Table, extra: Any) -> MaterializedView:
    day = sa.cast(sa.func.timezone("UTC", events.c.created_at), sa.Date)
    return MaterializedView(
        name,
        md,
        sa.select(day.label("day"), sa.cast(extra, sa.Text).label("extra")).group_by(day),
        incremental=Incremental(key="day", sources={events: day}),
    )


@pytest.mark.parametrize(
    "call, refused",
    [
        # Reads a table whose writes nothing logs.
        (lambda e: sa.func.max(sa.func.public.last_name(e.c.id)), r"last_name\(integer\).*STABLE"),
        # A SQL function is VOLATILE unless declared otherwise.
        (lambda e: sa.func.sum(sa.func.public.doubled(e.c.id)), r"doubled\(integer\).*VOLATILE"),
        (
            lambda e: sa.func.sum(e.c.id.op("###")(1)),
            r"doubled\(integer,integer\) \(the function of operator ###.*VOLATILE",
        ),
        # Built in, VOLATILE, and on no static list.
        (lambda e: sa.func.count(sa.func.pg_catalog.pg_sleep(0)), r"pg_sleep.*VOLATILE"),
    ],
)
def test_a_mutable_function_in_the_definition_is_refused_by_the_server(engine, call, refused):
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE names (id int PRIMARY KEY, name text);"
                " CREATE FUNCTION public.last_name(int) RETURNS text LANGUAGE sql STABLE"
                " AS 'SELECT name FROM names WHERE id = $1';"
                " CREATE FUNCTION public.doubled(int) RETURNS int LANGUAGE sql AS 'SELECT 2 * $1';"
                " CREATE FUNCTION public.doubled(int, int) RETURNS int LANGUAGE sql"
                " AS 'SELECT 2 * $1 + $2';"
                " CREATE OPERATOR public.### (LEFTARG = int, RIGHTARG = int,"
                " FUNCTION = public.doubled)"
            )
        )
    md, events = bare_events()
    with_column("mv_calls", md, events, call(events))
    with pytest.raises(DefinitionError, match=r"'mv_calls'.*calls .*" + refused):
        md.create_all(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT to_regclass('mv_calls')")).scalar() is None
        assert bookkeeping_objects(conn) == set()


def test_immutable_and_stable_builtin_functions_are_accepted(engine):
    """The rule is not stricter than real definitions: a user function declared IMMUTABLE,
    and STABLE built-ins (which depend on session settings only, as in a plain view)."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE FUNCTION public.doubled(int) RETURNS int LANGUAGE sql IMMUTABLE"
                " AS 'SELECT 2 * $1'"
            )
        )
    md, events = bare_events()
    extra = sa.func.concat(
        sa.func.sum(sa.func.public.doubled(events.c.id)),
        sa.func.jsonb_agg(events.c.id).cast(sa.Text),
        sa.func.to_char(sa.func.max(events.c.created_at), "HH24"),
    )
    mv = with_column("mv_calls", md, events, extra)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"id": 1, "created_at": at(3)}])
    assert refresh_views(engine, mv)[0].buckets == 1
    with engine.connect() as conn:
        assert difference(conn, mv) == 0


def test_truncate_recomputes_everything(engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE events"))
        conn.execute(d.events.insert(), [{"created_at": at(9), "user_id": 1, "kind": "view"}])
    with engine.connect() as conn:
        assert incremental_state(conn, d.mv_daily).truncated
    (result,) = refresh_views(engine, d.mv_daily)
    assert result.full_refresh is True
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(d.mv_daily.table)).scalar() == 1
        assert not incremental_state(conn, d.mv_daily).dirty


def test_a_full_recompute_writes_only_the_rows_that_changed(engine):
    """Everything recomputed (a TRUNCATE and the same rows back, one day changed): the
    unchanged rows keep their version, the changed one is updated in place, a day gone
    is deleted; the table leaves room on its pages for those updates."""
    d = build_dashboard()
    seed(engine, d)
    versions = sa.text("SELECT day, xmin::text, ctid::text FROM mv_daily ORDER BY day")
    with engine.connect() as conn:
        before = {r.day: (r.xmin, r.ctid) for r in conn.execute(versions)}
        options = conn.scalar(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'mv_daily'"))
    assert options == ["fillfactor=50"]
    gone, changed = sorted(before)[0], sorted(before)[1]
    day = sa.cast(sa.func.timezone("UTC", d.events.c.created_at), sa.Date)
    with engine.begin() as conn:
        rows = conn.execute(sa.select(d.events).where(day != gone)).mappings().all()
        conn.execute(sa.text("TRUNCATE events"))
        conn.execute(d.events.insert(), [dict(r) for r in rows])
        moved = dt.datetime.combine(changed, dt.time(12), UTC)
        conn.execute(d.events.insert(), [{"created_at": moved, "user_id": 1, "kind": "view"}])
    (result,) = refresh_views(engine, d.mv_daily)
    assert result.full_refresh is True
    with engine.connect() as conn:
        after = {r.day: (r.xmin, r.ctid) for r in conn.execute(versions)}
        assert difference(conn, d.mv_daily) == 0
    assert gone not in after
    assert after[changed][0] != before[changed][0]
    assert {k: v for k, v in after.items() if k != changed} == {
        k: v for k, v in before.items() if k not in (gone, changed)
    }


def test_many_dirty_rows_fall_back_to_a_full_recompute(engine):
    d = build_dashboard(threshold=0.4)
    seed(engine, d, n=600)
    with engine.begin() as conn:
        # The bucket's statistics (created with the view) give the planner the day sizes.
        conn.execute(sa.text("ANALYZE events"))
        # One day of six dirty: ~1/6 of the rows, under 0.4.
        conn.execute(d.events.insert(), [{"created_at": at(1), "user_id": 1, "kind": "view"}])
    (result,) = refresh_views(engine, d.mv_daily)
    assert (result.status, result.buckets, result.full_refresh) == ("refreshed", 1, False)
    with engine.begin() as conn:
        # Four days of six: ~2/3 of the rows, over 0.4.
        conn.execute(
            d.events.insert(),
            [{"created_at": at(day), "user_id": 1, "kind": "view"} for day in (1, 2, 3, 4)],
        )
    (result,) = refresh_views(engine, d.mv_daily)
    assert result.full_refresh is True
    assert result.buckets == 6
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


def test_the_estimate_of_many_dirty_keys_is_sampled_and_scaled(engine):
    """Past SAMPLE dirty keys the planner is asked about every k-th of them, the rows
    scaled by k: the same decision as asking about all of them."""
    d = build_dashboard()
    one_each = (
        "INSERT INTO events (created_at, user_id, kind, amount)"
        " SELECT '2026-03-01 12:00+00', u, 'view', 1 FROM generate_series(1, :n) AS u"
    )
    with engine.begin() as conn:
        d.events.create(conn)
        conn.execute(sa.text(one_each), {"n": 10_000})
    d.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE events"))
        # 1,500 users of 10,000 dirty: ~13 % of the rows, under 0.25.
        conn.execute(sa.text(one_each), {"n": 1_500})
    (result,) = refresh_views(engine, d.mv_users)
    assert (result.buckets, result.full_refresh) == (1_500, False)
    with engine.begin() as conn:
        # 5,000 more: ~30 % of the rows (a sample of 1,000 keys alone would say 6 %).
        conn.execute(sa.text(one_each), {"n": 5_000})
    (result,) = refresh_views(engine, d.mv_users)
    assert (result.buckets, result.full_refresh) == (10_000, True)
    with engine.connect() as conn:
        assert difference(conn, d.mv_users) == 0


def test_emptied_buckets_are_deleted_and_moves_dirty_both(engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.begin() as conn:
        conn.execute(
            d.events.delete().where(
                sa.cast(sa.func.timezone("UTC", d.events.c.created_at), sa.Date)
                == dt.date(2026, 3, 2)
            )
        )
        conn.execute(d.events.update().where(d.events.c.user_id == 3).values(created_at=at(20)))
    refresh_views(engine, d.mv_daily, d.mv_users)
    with engine.connect() as conn:
        days = {r.day for r in conn.execute(sa.select(d.mv_daily.c.day))}
        assert dt.date(2026, 3, 2) not in days
        assert dt.date(2026, 3, 20) in days
        assert difference(conn, d.mv_daily) == 0
        assert difference(conn, d.mv_users) == 0


def test_refresh_stale_and_refresh_all(engine):
    d = build_dashboard()
    seed(engine, d)
    results = {r.view: r for r in refresh_stale(engine, d.metadata)}
    assert {v: r.status for v, r in results.items()} == {
        "public.mv_daily": "skipped_fresh",
        "public.mv_users": "skipped_fresh",
    }
    with engine.begin() as conn:
        conn.execute(d.events.insert(), [{"created_at": at(2), "user_id": 1, "kind": "view"}])
    results = {r.view: r for r in refresh_stale(engine, d.metadata)}
    assert results["public.mv_daily"].status == "refreshed"
    assert results["public.mv_daily"].buckets == 1
    assert results["public.mv_users"].buckets == 1
    results = {r.view: r for r in refresh_all(engine, d.metadata)}
    assert {r.status for r in results.values()} == {"refreshed"}
    assert {r.buckets for r in results.values()} == {0}
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
        # By name too (the CLI's way): the refresh function says it is incremental.
    assert refresh_views(engine, "mv_daily")[0].status == "refreshed"


def test_the_lock_is_the_views_advisory_lock(engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.connect() as holder:
        holder.execute(
            sa.select(sa.func.pg_advisory_lock(sa.literal(lock_key(d.mv_daily), sa.BigInteger)))
        )
        assert refresh_views(engine, d.mv_daily)[0].status == "skipped_locked"
        holder.rollback()
        holder.execute(
            sa.select(sa.func.pg_advisory_unlock(sa.literal(lock_key(d.mv_daily), sa.BigInteger)))
        )
    assert refresh_views(engine, d.mv_daily)[0].status == "refreshed"


def test_history_records_incremental_refreshes(engine):
    d = build_dashboard()
    seed(engine, d)
    refresh_views(engine, d.mv_daily)
    records = refresh_history(engine, d.mv_daily)
    assert records and records[0].status == "refreshed"


def test_async_refresh(async_engine, engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.begin() as conn:
        conn.execute(d.events.insert(), [{"created_at": at(2), "user_id": 1, "kind": "view"}])

    async def main():
        from sqlalchemy_matview.asyncio import refresh_stale as async_refresh_stale

        return await async_refresh_stale(async_engine, d.metadata)

    results = {r.view: r for r in asyncio.run(main())}
    assert results["public.mv_daily"].buckets == 1
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


def test_partitioned_source_direct_writes_and_later_partitions(engine):
    d = build_dashboard(partitioned=True)
    with engine.begin() as conn:
        d.events.create(conn)
        conn.execute(
            sa.text(
                "CREATE TABLE events_march PARTITION OF events"
                " FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')"
            )
        )
        conn.execute(d.events.insert(), [{"created_at": at(1), "user_id": 1, "kind": "view"}])
    d.metadata.create_all(engine)
    with engine.begin() as conn:
        # A partition created after the view: the cloned row trigger logs its writes.
        conn.execute(
            sa.text(
                "CREATE TABLE events_april PARTITION OF events"
                " FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')"
            )
        )
        conn.execute(d.events.insert(), [{"created_at": at(2), "user_id": 2, "kind": "view"}])
        conn.execute(
            sa.text(
                "INSERT INTO events_march (created_at, user_id, kind) VALUES"
                " ('2026-03-03 10:00+00', 3, 'purchase')"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO events_april (created_at, user_id, kind) VALUES"
                " ('2026-04-03 10:00+00', 4, 'view')"
            )
        )
        # A row moving between partitions dirties both days.
        conn.execute(
            sa.text("UPDATE events SET created_at = '2026-04-09 10:00+00' WHERE user_id = 1")
        )
    with engine.connect() as conn:
        assert incremental_state(conn, d.mv_daily).dirty_buckets == 5
    refresh_views(engine, d.mv_daily, d.mv_users)
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
        assert difference(conn, d.mv_users) == 0
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE events_march"))
    (result,) = refresh_views(engine, d.mv_daily)
    assert result.full_refresh
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


def test_logical_replication_apply_is_logged(engine):
    """Rows applied with session_replication_role = replica fire the replica twin."""
    d = build_dashboard()
    seed(engine, d)
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        conn.execute(d.events.insert(), [{"created_at": at(25), "user_id": 1, "kind": "view"}])
        conn.execute(d.events.delete().where(d.events.c.user_id == 2))
    refresh_views(engine, d.mv_daily)
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


def test_the_sql_refresh_function_and_the_pg_cron_procedure(engine):
    """What pg_cron jobs run (refresh_job -> refresh) recomputes an incremental view too."""
    from sqlalchemy_matview.orchestration.tracking import refresh_call, refresh_job_call

    d = build_dashboard()
    seed(engine, d)
    with engine.begin() as conn:
        conn.execute(d.events.insert(), [{"created_at": at(2), "user_id": 1, "kind": "view"}])
    with engine.begin() as conn:
        call = refresh_call("public", "mv_daily", concurrently=True, only_if_stale=True)
        assert conn.execute(call).scalar_one() == "refreshed"
        assert conn.execute(call).scalar_one() == "skipped_fresh"
        assert difference(conn, d.mv_daily) == 0
    with engine.begin() as conn:
        conn.execute(d.events.insert(), [{"created_at": at(4), "user_id": 1, "kind": "view"}])
    job = refresh_job_call("public", "mv_daily", concurrently=True)
    command = str(job.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text(f"CALL {command}"))
        assert difference(conn, d.mv_daily) == 0
        assert refresh_history(conn, d.mv_daily)[0].status == "refreshed"


def test_the_recompute_reads_the_dirty_days_through_the_bucket_index(engine):
    """The plan the refresh function really runs (auto_explain of nested statements, its
    log sent to the client): the dirty days are found through an index on the bucket."""
    d = build_dashboard()
    sa.Index("ix_events_utc_day", sa.cast(sa.func.timezone("UTC", d.events.c.created_at), sa.Date))
    seed_minutes(engine, d)
    plans: list[str] = []
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        driver.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        try:
            conn.execute(sa.text("LOAD 'auto_explain'"))
        except sa.exc.OperationalError as exc:
            pytest.skip(f"auto_explain is not shipped with this PostgreSQL build: {exc.orig}")
        for statement in (
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_nested_statements = on",
            "SET client_min_messages = log",
        ):
            conn.execute(sa.text(statement))
        (result,) = refresh_views(conn, d.mv_daily)
        conn.commit()
    assert (result.buckets, result.full_refresh) == (1, False)
    # (refresh_views' own planning statement is logged too: not the recompute)
    recompute = [
        p for p in plans if "fresh" in p and "mv_daily" in p and "pg_is_in_recovery" not in p
    ]
    assert recompute, plans
    assert "ix_events_utc_day" in recompute[0], recompute[0]
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


def test_writers_notify_the_workers_once_per_refresh(engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.connect() as listener:
        listener.execution_options(isolation_level="AUTOCOMMIT").execute(
            sa.text("LISTEN sqlalchemy_matview")
        )
        driver = listener.connection.driver_connection

        def payloads() -> list[str]:
            return [n.payload for n in driver.notifies(timeout=0.2, stop_after=None)]

        for _ in range(3):
            with engine.begin() as conn:
                conn.execute(d.events.insert(), [{"created_at": at(2), "user_id": 1, "kind": "x"}])
        # The first writer made the views dirty: one notification each; the others found
        # its log row.
        assert sorted(payloads()) == ["public.mv_daily", "public.mv_users"]
        refresh_views(engine, d.mv_daily, d.mv_users)
        with engine.begin() as conn:
            conn.execute(d.events.insert(), [{"created_at": at(2), "user_id": 1, "kind": "x"}])
        assert sorted(payloads()) == ["public.mv_daily", "public.mv_users"]


def test_a_worker_refreshes_incremental_views(engine):
    from sqlalchemy_matview import RefreshWorker

    d = build_dashboard()
    seed(engine, d)
    done = []
    worker = RefreshWorker(engine, d.metadata, debounce=0.05, max_delay=0.5, on_result=done.append)
    worker.start()
    try:
        with engine.begin() as conn:
            conn.execute(d.events.insert(), [{"created_at": at(7), "user_id": 1, "kind": "x"}])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            r.view == "public.mv_daily" and r.status == "refreshed" for r in done
        ):
            time.sleep(0.05)
    finally:
        worker.stop()
    assert any(r.view == "public.mv_daily" and r.buckets == 1 for r in done), done
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


def test_refreshing_under_repeatable_read_is_refused(engine):
    d = build_dashboard()
    seed(engine, d)
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        (result,) = refresh_views(conn, d.mv_daily)
        assert result.status == "failed"
        assert "READ COMMITTED" in str(result.error)


def test_two_sources_joined_in_another_schema(engine):
    """Per-country totals in schema 'reports' over events joined to users: a user moving
    country dirties both countries; an event dirties its user's country."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA reports"))
    md = sa.MetaData()
    users = sa.Table(
        "users",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("country", sa.String(2), nullable=False),
        schema="reports",
    )
    orders = sa.Table(
        "orders",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
        schema="reports",
    )
    mv = MaterializedView(
        "mv_user_totals",
        md,
        sa.select(
            users.c.id.label("user_id"),
            users.c.country,
            sa.func.count(orders.c.id).label("orders"),
            sa.func.coalesce(sa.func.sum(orders.c.amount), 0).label("total"),
        )
        .select_from(users.outerjoin(orders, orders.c.user_id == users.c.id))
        .group_by(users.c.id, users.c.country),
        schema="reports",
        incremental=Incremental(
            key="user_id", sources={users: users.c.id, orders: orders.c.user_id}
        ),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            users.insert(), [{"id": i, "country": "FR" if i % 2 else "DE"} for i in range(1, 6)]
        )
        conn.execute(
            orders.insert(), [{"id": i, "user_id": 1 + i % 5, "amount": i} for i in range(20)]
        )
    (result,) = refresh_views(engine, mv)
    assert result.buckets == 5
    with engine.begin() as conn:
        conn.execute(users.update().where(users.c.id == 2).values(country="IT"))
        conn.execute(orders.delete().where(orders.c.user_id == 3))
        conn.execute(orders.update().where(orders.c.user_id == 4).values(user_id=5))
        conn.execute(users.insert(), [{"id": 9, "country": "ES"}])
    (result,) = refresh_views(engine, mv)
    assert result.buckets == 5  # users 2, 3, 4, 5 and 9
    with engine.connect() as conn:
        assert difference(conn, mv) == 0
        assert conn.execute(sa.text("SELECT to_regclass('reports.mv_user_totals')")).scalar()
    md.drop_all(engine)


def test_a_tracked_view_reading_an_incremental_one(engine):
    """A tracked materialized view over an incremental view: its refresh marks the reader
    stale (tracking's triggers on the table), and refresh_stale orders them."""
    d = build_dashboard()
    top = MaterializedView(
        "mv_top_users",
        d.metadata,
        sa.select(d.mv_users.c.user_id, d.mv_users.c.events).where(d.mv_users.c.events > 2),
        unique_key="user_id",
        track_changes=True,
    )
    seed(engine, d)
    refresh_stale(engine, d.metadata)
    with engine.begin() as conn:
        conn.execute(
            d.events.insert(),
            [{"created_at": at(3), "user_id": 42, "kind": "view"} for _ in range(3)],
        )
    results = {r.view: r.status for r in refresh_stale(engine, d.metadata)}
    assert results["public.mv_users"] == "refreshed"
    assert results["public.mv_top_users"] == "refreshed"
    with engine.connect() as conn:
        ids = set(conn.execute(sa.select(top.c.user_id)).scalars())
    assert 42 in ids


def test_broken_logging_is_reported_and_repaired_by_create_all(engine):
    from sqlalchemy_matview import check_tracking

    d = build_dashboard(partitioned=True)
    with engine.begin() as conn:
        d.events.create(conn)
        conn.execute(
            sa.text(
                "CREATE TABLE events_march PARTITION OF events"
                " FOR VALUES FROM ('2026-03-01') TO ('2026-04-01')"
            )
        )
    d.metadata.create_all(engine)
    assert check_tracking(engine, d.metadata) == []
    with engine.begin() as conn:
        # A partition added later has the cloned row trigger but no TRUNCATE trigger.
        conn.execute(
            sa.text(
                "CREATE TABLE events_april PARTITION OF events"
                " FOR VALUES FROM ('2026-04-01') TO ('2026-05-01')"
            )
        )
        conn.execute(sa.text("ALTER TABLE events DISABLE TRIGGER ALL"))
        conn.execute(d.events.insert(), [{"created_at": at(3), "user_id": 1, "kind": "view"}])
        conn.execute(sa.text("ALTER TABLE events ENABLE TRIGGER ALL"))
        trunc = names_for("public", "mv_daily").trigger("0_trunc")
        conn.execute(sa.text(f"ALTER TABLE events_march DISABLE TRIGGER {trunc}"))
    problems = {(p.view, p.problem.split(" is ")[0]) for p in check_tracking(engine, d.metadata)}
    assert (
        "public.mv_daily",
        f"trigger {trunc.replace('ba5c37bf108b', 'ba5c37bf108b')} on public.events_march",
    ) in problems
    assert any("public.events_april" in p for _, p in problems)
    # create_all repairs, and marks the views for a full recompute (writes were missed).
    d.metadata.create_all(engine)
    assert check_tracking(engine, d.metadata) == []
    (result,) = refresh_views(engine, d.mv_daily)
    assert result.full_refresh
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
