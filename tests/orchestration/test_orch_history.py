"""The refresh history: refreshes, failures and lock skips recorded, bounded, read back."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
import sqlalchemy as sa

import sqlalchemy_matview.asyncio as mv_async
from sqlalchemy_matview import (
    lock_key,
    refresh_history,
    refresh_stale,
    refresh_views,
)
from sqlalchemy_matview.orchestration import tracking
from sqlalchemy_matview.orchestration.history import HistoryError

from .conftest import Shop, failing_view


def test_refreshes_are_recorded_newest_first(engine: sa.Engine, shop: Shop) -> None:
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 300}])
        conn.execute(sa.text("ANALYZE orders"))
    refresh_stale(engine, shop.metadata)
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE mv_totals"))
    refresh_views(engine, shop.mv_totals, concurrently=False)

    newest, older = refresh_history(engine, shop.mv_totals, limit=2)
    assert (newest.view, newest.status, newest.concurrently) == (
        "public.mv_totals",
        "refreshed",
        False,
    )
    assert (older.status, older.concurrently) == ("refreshed", True)
    assert newest.started_at > older.started_at
    assert newest.duration is not None and newest.duration >= 0
    assert newest.row_estimate == 1  # ANALYZE counted the one row
    assert older.error is None
    # Every view, and names as text (qualified or in the current schema).
    assert {r.view for r in refresh_history(engine)} == {"public.mv_totals", "public.mv_top"}
    assert len(refresh_history(engine, "mv_totals")) == 2
    assert refresh_history(engine, "public.mv_top")[0].status == "refreshed"


def test_what_pg_cron_runs_is_recorded_too(engine: sa.Engine, shop: Shop) -> None:
    # A pg_cron job runs the database function, not Python: the function records.
    call = tracking.refresh_call("public", "mv_top", concurrently=False)
    with engine.begin() as conn:
        assert conn.execute(call).scalar_one() == "refreshed"
    assert [r.status for r in refresh_history(engine, "public.mv_top")] == ["refreshed"]


def test_failures_and_lock_skips_are_recorded(engine: sa.Engine, shop: Shop) -> None:
    ratio = failing_view(engine, shop.metadata, "mv_ratio")
    (failed,) = refresh_views(engine, ratio)
    assert failed.status == "failed"
    (record,) = refresh_history(engine, ratio)
    assert record.status == "failed"
    assert record.error is not None and "division by zero" in record.error

    with engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_lock(lock_key(shop.mv_totals))))
        (skipped,) = refresh_views(engine, shop.mv_totals)
        holder.execute(sa.select(sa.func.pg_advisory_unlock_all()))
    assert skipped.status == "skipped_locked"
    assert refresh_history(engine, shop.mv_totals)[0].status == "skipped_locked"


def test_a_failure_inside_the_callers_transaction_is_recorded_and_the_transaction_lives(
    engine: sa.Engine, shop: Shop
) -> None:
    ratio = failing_view(engine, shop.metadata, "mv_ratio2")
    with engine.begin() as conn:
        (failed,) = refresh_views(conn, ratio)
        assert failed.status == "failed"
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    assert [r.status for r in refresh_history(engine, ratio)] == ["failed"]


def test_retention_keeps_the_newest_rows_per_view(engine: sa.Engine, shop: Shop) -> None:
    with engine.connect() as conn:
        database = conn.execute(sa.text("SELECT current_database()")).scalar_one()
        conn.execute(
            sa.text(f'ALTER DATABASE "{database}" SET sqlalchemy_matview.history_keep = 3')
        )
        conn.commit()
    engine.dispose()  # new sessions read the database's setting
    for _ in range(5):
        refresh_views(engine, shop.mv_top)
    refresh_views(engine, shop.mv_totals)
    assert len(refresh_history(engine, shop.mv_top)) == 3
    assert len(refresh_history(engine, shop.mv_totals)) == 1


@pytest.mark.parametrize("bad", [0, -1, True, "5"])
def test_bad_limit_is_refused(engine: sa.Engine, shop: Shop, bad: object) -> None:
    with pytest.raises(HistoryError, match="limit"):
        refresh_history(engine, limit=bad)  # type: ignore[arg-type]


def test_bad_view_is_refused(engine: sa.Engine, shop: Shop) -> None:
    with pytest.raises(HistoryError, match="MaterializedView or its name"):
        refresh_history(engine, 42)  # type: ignore[arg-type]


def test_no_bookkeeping_no_history(engine: sa.Engine) -> None:
    assert refresh_history(engine) == []


def test_async_refresh_history(engine: sa.Engine, async_engine, shop: Shop) -> None:
    refresh_views(engine, shop.mv_top)

    async def main() -> list[str]:
        return [r.status for r in await mv_async.refresh_history(async_engine, "mv_top")]

    assert asyncio.run(main()) == ["refreshed"]


def test_a_failing_pg_cron_job_leaves_a_history_row(engine: sa.Engine, shop: Shop) -> None:
    from sqlalchemy_matview.orchestration.cron import refresh_command

    ratio = failing_view(engine, shop.metadata, "mv_ratio3")
    with engine.begin() as conn:
        # A hostile operator in a schema searched first must not be picked up.
        conn.execute(sa.text("CREATE SCHEMA hostile"))
        conn.execute(
            sa.text(
                "CREATE FUNCTION hostile.minus(timestamptz, timestamptz) RETURNS interval"
                " LANGUAGE sql AS 'SELECT interval ''1000 years'''"
            )
        )
        conn.execute(
            sa.text(
                "CREATE OPERATOR hostile.- (LEFTARG = timestamptz, RIGHTARG = timestamptz,"
                " FUNCTION = hostile.minus)"
            )
        )
    command = refresh_command(ratio, concurrently=False)
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    # As pg_cron runs it: one top-level statement on a connection of its own.
    with psycopg.connect(url, autocommit=True) as job:
        job.execute("SET search_path = hostile, pg_catalog, public")
        with pytest.raises(psycopg.errors.DivisionByZero):
            job.execute(command)
    (record,) = refresh_history(engine, ratio)
    assert (record.status, record.concurrently) == ("failed", False)
    assert record.error == "division by zero"
    assert record.duration is not None and record.duration < 3600

    # A job that succeeds returns the status and is recorded once, by the refresh function.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE mv_ratio3_divisors SET d = 1"))
    with psycopg.connect(url, autocommit=True) as job:
        assert job.execute(command).fetchone() == ("refreshed",)
    assert [r.status for r in refresh_history(engine, ratio)] == ["refreshed", "failed"]
