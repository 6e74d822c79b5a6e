"""refresh_views / refresh_all: ordering, cascade, concurrently, locks, timeouts, failures."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from sqlalchemy_matview import (
    ConcurrentRefreshError,
    MaterializedView,
    UnknownViewError,
    lock_key,
    refresh_all,
    refresh_views,
)
from sqlalchemy_matview.orchestration import tracking
from sqlalchemy_matview.orchestration.runner import RefreshOptionError

from .conftest import Shop, build_shop, rows


def test_refresh_views_refreshes_and_reports(engine, shop: Shop):
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 150}])
    results = refresh_views(engine, shop.mv_totals)
    assert [(r.view, r.status, r.concurrently) for r in results] == [
        ("public.mv_totals", "refreshed", True)
    ]
    assert results[0].duration > 0 and results[0].error is None
    assert rows(engine, shop.mv_totals) == [(1, 150)]
    assert rows(engine, shop.mv_top) == []  # not cascaded


def test_cascade_refreshes_dependents_in_order(engine, shop: Shop):
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 150}])
    results = refresh_views(engine, "mv_totals", cascade=True)
    assert [r.view for r in results] == ["public.mv_totals", "public.mv_top"]
    assert rows(engine, shop.mv_top) == [(1, 150)]


def test_cascade_crosses_plain_views_undeclared(engine):
    """mv_a -> plain view -> mv_b, with mv_b not declared anywhere: found in pg_depend."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id int PRIMARY KEY)"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_a AS SELECT id FROM src"))
        conn.execute(sa.text("CREATE VIEW v_mid AS SELECT id * 2 AS id FROM mv_a"))
        conn.execute(sa.text('CREATE MATERIALIZED VIEW "Mv B" AS SELECT id FROM v_mid'))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_other AS SELECT 1 AS one"))
        conn.execute(sa.text("INSERT INTO src VALUES (1), (2)"))
    results = refresh_views(engine, ("public", "mv_a"), cascade=True)
    assert [(r.view, r.status, r.concurrently) for r in results] == [
        ("public.mv_a", "refreshed", False),
        ("public.Mv B", "refreshed", False),
    ]
    with engine.connect() as conn:
        assert conn.scalar(sa.text('SELECT sum(id) FROM "Mv B"')) == 6


def test_order_follows_dependencies_not_arguments(engine, shop: Shop):
    results = refresh_views(engine, shop.mv_top, shop.mv_totals)
    assert [r.view for r in results] == ["public.mv_totals", "public.mv_top"]


def test_refresh_all_in_dependency_order(engine, shop: Shop):
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 2, "amount": 500}])
    results = refresh_all(engine, shop.metadata)
    assert [(r.view, r.status) for r in results] == [
        ("public.mv_totals", "refreshed"),
        ("public.mv_top", "refreshed"),
    ]
    assert rows(engine, shop.mv_top) == [(2, 500)]


def test_concurrently_auto_falls_back_for_unpopulated_and_unindexed(engine):
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    mv_empty = MaterializedView("mv_empty", md, sa.select(t.c.id), unique_key="id", with_data=False)
    mv_noidx = MaterializedView("mv_noidx", md, sa.select(t.c.id))
    md.create_all(engine)
    first = refresh_views(engine, mv_empty, mv_noidx)
    assert [(r.status, r.concurrently) for r in first] == [("refreshed", False)] * 2
    second = refresh_views(engine, mv_empty, mv_noidx)
    assert [(r.status, r.concurrently) for r in second] == [
        ("refreshed", True),
        ("refreshed", False),
    ]
    never = refresh_views(engine, mv_empty, concurrently=False)
    assert never[0].concurrently is False


def test_concurrently_true_misuse(engine):
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    mv_noidx = MaterializedView("mv_noidx", md, sa.select(t.c.id))
    mv_empty = MaterializedView("mv_empty", md, sa.select(t.c.id), unique_key="id", with_data=False)
    md.create_all(engine)
    with pytest.raises(ConcurrentRefreshError, match=r"mv_noidx.*unique_key"):
        refresh_views(engine, mv_noidx, concurrently=True)
    [result] = refresh_views(engine, mv_empty, concurrently=True)
    assert result.status == "failed"
    assert isinstance(result.error, ConcurrentRefreshError)
    assert "not populated" in str(result.error)


def test_unknown_names_and_bad_options_raise_before_sql(engine):
    with pytest.raises(UnknownViewError, match="nope"):
        refresh_views(engine, "nope")
    with pytest.raises(RefreshOptionError, match="lock="):
        refresh_views(engine, "nope", lock="maybe")  # type: ignore[arg-type]
    with pytest.raises(RefreshOptionError, match="concurrently="):
        refresh_views(engine, "nope", concurrently="yes")  # type: ignore[arg-type]
    with pytest.raises(RefreshOptionError, match="negative"):
        refresh_views(engine, "nope", lock_timeout=-1)
    with pytest.raises(TypeError, match="AsyncEngine"):
        refresh_views(object(), "nope")  # type: ignore[arg-type]


def test_failure_is_reported_and_dependents_skipped(engine, shop: Shop, caplog):
    with engine.begin() as conn:
        # Make mv_totals fail: its refresh now divides by zero.
        conn.execute(shop.orders.insert(), [{"customer": 0, "amount": 1}])
        conn.execute(sa.text("CREATE TABLE other (id int)"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_ok AS SELECT count(*) AS n FROM other"))
        conn.execute(
            sa.text(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'boom'; END $$"
            )
        )
    # A REFRESH that fails: drop its unique-key index so CONCURRENTLY is impossible, then
    # demand it through a name (no declaration to check) -> reported, not raised.
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX mv_totals_unique_key"))
        conn.execute(
            sa.text(
                "CREATE UNIQUE INDEX mv_totals_partial ON mv_totals (customer) WHERE customer > 0"
            )
        )
    caplog.set_level(logging.INFO, logger="sqlalchemy_matview")
    results = refresh_views(engine, "mv_totals", "mv_top", "mv_ok", concurrently=True)
    by = {r.view: r for r in results}
    assert by["public.mv_totals"].status == "failed"
    assert by["public.mv_top"].status == "skipped_dependency_failed"
    assert by["public.mv_ok"].status == "failed"  # no unique index at all
    # Now a genuine server-side failure of one view, the other still refreshed.
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE d (x int)"))
        conn.execute(sa.text("INSERT INTO d VALUES (1)"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_div AS SELECT 1 / x AS y FROM d"))
        conn.execute(sa.text("UPDATE d SET x = 0"))
    results = refresh_views(engine, "mv_div", "mv_ok")
    assert [r.status for r in results] == ["failed", "refreshed"]
    assert isinstance(results[0].error, sa.exc.DBAPIError)
    assert "division by zero" in str(results[0].error)
    assert any("mv_div failed" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize("track", [True, False], ids=["recorded", "untracked"])
def test_lock_namespace_salts_the_key(engine, track: bool):
    shop = build_shop(track=track)
    shop.metadata.create_all(engine)
    salted = lock_key(shop.mv_totals, namespace="tenant-a")
    holder = engine.connect()
    try:
        holder.execute(sa.select(sa.func.pg_advisory_lock(lock_key(shop.mv_totals))))
        # The default key is held: a namespaced refresh does not care.
        [done] = refresh_views(engine, shop.mv_totals, lock_namespace="tenant-a")
        assert done.status == "refreshed"
        holder.execute(sa.select(sa.func.pg_advisory_unlock_all()))
        holder.execute(sa.select(sa.func.pg_advisory_lock(salted)))
        [skipped] = refresh_views(engine, shop.mv_totals, lock_namespace="tenant-a")
        assert skipped.status == "skipped_locked"
        [unsalted] = refresh_views(engine, shop.mv_totals)
        assert unsalted.status == "refreshed"
    finally:
        holder.close()
    with pytest.raises(RefreshOptionError, match="lock_namespace"):
        refresh_views(engine, shop.mv_totals, lock_namespace="")


@pytest.mark.parametrize("track", [True, False], ids=["recorded", "untracked"])
def test_lock_skip_wait_none(engine, track: bool):
    # With tracking the database function takes the lock; without, the runner does.
    shop = build_shop(track=track)
    shop.metadata.create_all(engine)
    with engine.connect() as conn:
        assert tracking.state_tables_exist(conn) is track
    key = lock_key(shop.mv_totals)
    holder = engine.connect()
    try:
        holder.execute(sa.select(sa.func.pg_advisory_lock(key)))
        [skipped] = refresh_views(engine, shop.mv_totals, lock="skip")
        assert skipped.status == "skipped_locked" and skipped.error is None
        [timed_out] = refresh_views(engine, shop.mv_totals, lock="wait", lock_timeout=0.2)
        assert timed_out.status == "skipped_locked"
        assert timed_out.error is not None and "lock timeout" in str(timed_out.error)
        [unlocked] = refresh_views(engine, shop.mv_totals, lock="none")
        assert unlocked.status == "refreshed"
        # "wait" succeeds once the holder lets go.
        done: list[str] = []
        waiter = threading.Thread(
            target=lambda: done.extend(
                r.status for r in refresh_views(engine, shop.mv_totals, lock="wait")
            )
        )
        waiter.start()
        _wait_until_waiting_for(engine, key)
        assert done == []  # still waiting
        holder.execute(sa.select(sa.func.pg_advisory_unlock(key)))
        waiter.join(60)
        assert done == ["refreshed"]
    finally:
        holder.close()


def _wait_until_waiting_for(engine, key: int, timeout: float = 30.0) -> None:
    """Until some backend waits (ungranted) for the advisory lock ``key``."""
    # pg_locks shows the key as two unsigned 32-bit halves (see lock_key_parts).
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    deadline = time.monotonic() + timeout
    with engine.connect() as conn:
        while True:
            waiting = conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                    " AND objsubid = 1 AND NOT granted AND classid = :hi AND objid = :lo"
                ),
                {"hi": unsigned >> 32, "lo": unsigned & 0xFFFFFFFF},
            )
            conn.rollback()
            if waiting:
                return
            assert time.monotonic() < deadline, "nothing ever waited for the lock"
            time.sleep(0.02)


def test_lock_key_visible_in_pg_locks(engine, shop: Shop):
    from sqlalchemy_matview.orchestration.locking import lock_key_parts

    classid, objid = lock_key_parts(shop.mv_totals)
    with engine.begin() as conn:
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(lock_key(shop.mv_totals))))
        found = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1"
                " AND classid = :c AND objid = :o AND pid = pg_backend_pid()"
            ),
            {"c": classid, "o": objid},
        ).scalar()
    assert found == 1


def test_statement_timeout_applies_to_refresh_only(engine):
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE MATERIALIZED VIEW mv_slow AS SELECT 1 AS x FROM pg_sleep(0) WITH NO DATA"
            )
        )
        conn.execute(sa.text("DROP MATERIALIZED VIEW mv_slow"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_slow AS SELECT pg_sleep(1) IS NULL AS x"))
    [result] = refresh_views(engine, "mv_slow", statement_timeout=0.1)
    assert result.status == "failed" and "statement timeout" in str(result.error)
    with engine.connect() as conn:
        conn.execute(sa.text("SET lock_timeout = '7s'"))
        conn.commit()
        [ok] = refresh_views(conn, "mv_slow", lock_timeout=0.5, statement_timeout="5s")
        assert ok.status == "refreshed"
        # The caller's own settings come back after the savepoint.
        assert conn.scalar(sa.text("SHOW lock_timeout")) == "7s"
        assert conn.scalar(sa.text("SHOW statement_timeout")) == "0"
        conn.commit()


def test_connection_bind_uses_callers_transaction(engine, shop: Shop):
    with engine.connect() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 3, "amount": 300}])
        results = refresh_views(conn, shop.mv_totals, cascade=True)
        assert [r.status for r in results] == ["refreshed", "refreshed"]
        assert conn.execute(sa.select(shop.mv_top.table)).all() == [(3, 300)]
        conn.rollback()
    assert rows(engine, shop.mv_top) == []  # rolled back with the caller's transaction


def test_session_bind_flushes_pending_objects(engine, shop: Shop):
    from sqlalchemy.orm import registry

    class Order:
        def __init__(self, **kw: int) -> None:
            self.__dict__.update(kw)

    registry().map_imperatively(Order, shop.orders)

    with Session(engine) as session:
        session.add(Order(id=10, customer=7, amount=700))
        results = refresh_views(session, shop.mv_totals)
        assert results[0].status == "refreshed"
        session.commit()
    assert rows(engine, shop.mv_totals) == [(7, 700)]


def test_refresh_all_reports_missing_view(engine):
    shop = build_shop(track=False)
    shop.orders.create(engine)
    shop.mv_totals.create(engine)
    results = refresh_all(engine, shop.metadata)
    assert [(r.view, r.status) for r in results] == [
        ("public.mv_totals", "refreshed"),
        ("public.mv_top", "failed"),
    ]
    assert isinstance(results[1].error, UnknownViewError)


def test_views_in_other_schema_and_odd_names(engine):
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE SCHEMA "Re ports"'))
    md = sa.MetaData()
    t = sa.Table("t'x", md, sa.Column("id", sa.Integer, primary_key=True), schema="Re ports")
    mv = MaterializedView('mv "q"', md, sa.select(t.c.id), schema="Re ports", unique_key="id")
    md.create_all(engine)
    [result] = refresh_views(engine, mv)
    assert result.view == 'Re ports.mv "q"' and result.status == "refreshed"
    assert result.concurrently
