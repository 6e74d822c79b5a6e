"""Freshness objectives: max_staleness, freshness(), and workers that keep to them."""

from __future__ import annotations

import asyncio
import datetime
import threading

import pytest
import sqlalchemy as sa

import sqlalchemy_matview.asyncio as mv_async
from sqlalchemy_matview import (
    DefinitionError,
    Freshness,
    MaterializedView,
    RefreshResult,
    RefreshWorker,
    freshness,
    refresh_stale,
    refresh_views,
)

from .conftest import Shop, build_shop, wait_for

HOUR = datetime.timedelta(hours=1)


def by_view(engine: sa.Engine, metadata: sa.MetaData) -> dict[str, Freshness]:
    return {f.view: f for f in freshness(engine, metadata)}


@pytest.mark.parametrize(
    "value", [datetime.timedelta(0), datetime.timedelta(seconds=-1), 60, "5m"], ids=repr
)
def test_max_staleness_must_be_a_positive_timedelta(value: object) -> None:
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer))
    with pytest.raises(DefinitionError, match=r"mv_bad.*max_staleness.*timedelta\(minutes=5\)"):
        MaterializedView("mv_bad", md, sa.select(t.c.id), max_staleness=value)  # type: ignore[arg-type]


def _objectives(engine: sa.Engine, tracked: datetime.timedelta) -> Shop:
    shop = build_shop()
    shop.mv_totals.max_staleness = tracked
    shop.mv_top.max_staleness = HOUR
    shop.metadata.create_all(engine)
    return shop


def test_a_tracked_view_breaches_while_a_change_waits(engine: sa.Engine) -> None:
    shop = _objectives(engine, datetime.timedelta(milliseconds=1))
    fresh = by_view(engine, shop.metadata)["public.mv_totals"]
    assert fresh.tracked and fresh.populated
    assert fresh.staleness == datetime.timedelta(0)
    assert not fresh.breached

    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 5}])
    assert wait_for(lambda: by_view(engine, shop.metadata)["public.mv_totals"].breached)
    stale = by_view(engine, shop.metadata)["public.mv_totals"]
    assert stale.stale_since is not None
    assert stale.staleness > datetime.timedelta(0)

    refresh_stale(engine, shop.metadata)
    after = by_view(engine, shop.metadata)["public.mv_totals"]
    assert after.staleness == datetime.timedelta(0) and not after.breached
    assert after.last_refreshed_at is not None


def test_an_untracked_view_is_aged_from_its_last_refresh(engine: sa.Engine) -> None:
    shop = _objectives(engine, HOUR)
    top = by_view(engine, shop.metadata)["public.mv_top"]
    # Created by create_all, never refreshed through the library: its age is unknown.
    assert not top.tracked and top.staleness is None and top.breached
    refresh_views(engine, shop.mv_top)
    top = by_view(engine, shop.metadata)["public.mv_top"]
    assert top.staleness is not None and top.staleness < HOUR and not top.breached


def test_views_without_objectives_never_breach_and_unpopulated_is_reported(
    engine: sa.Engine,
) -> None:
    md = sa.MetaData()
    t = sa.Table("things", md, sa.Column("id", sa.Integer))
    MaterializedView("mv_empty", md, sa.select(t.c.id), with_data=False)
    md.create_all(engine)
    (f,) = freshness(engine, md)
    assert (f.view, f.populated, f.breached, f.max_staleness) == (
        "public.mv_empty",
        False,
        False,
        None,
    )


def test_async_freshness(engine: sa.Engine, async_engine) -> None:
    shop = _objectives(engine, HOUR)

    async def main() -> list[str]:
        return [f.view for f in await mv_async.freshness(async_engine, shop.metadata)]

    assert asyncio.run(main()) == ["public.mv_totals", "public.mv_top"]


def test_debounce_cannot_starve_a_tracked_view_with_an_objective(engine: sa.Engine) -> None:
    # debounce 30 s under a write every 50 ms would never fire; max_delay 600 s would be
    # late: the 2 s objective caps the wait at 1 s from the first change.
    shop = _objectives(engine, datetime.timedelta(seconds=2))
    results: list[RefreshResult] = []
    worker = RefreshWorker(
        engine, shop.metadata, debounce=30, max_delay=600, on_result=results.append
    )
    assert worker.max_delay == 1.0
    done = threading.Event()

    def write() -> None:
        i = 0
        while not done.is_set():
            i += 1
            with engine.begin() as conn:
                conn.execute(shop.orders.insert(), [{"customer": i % 7, "amount": 1}])
            done.wait(0.05)

    writer = threading.Thread(target=write)
    worker.start()
    try:
        assert wait_for(lambda: worker.passes >= 1)
        writer.start()
        assert wait_for(
            lambda: any(r.view == "public.mv_totals" and r.status == "refreshed" for r in results)
        )
        # Refreshed while the writes went on: the debounce never saw a quiet moment.
        assert writer.is_alive()
    finally:
        done.set()
        if writer.ident is not None:
            writer.join()
        assert worker.stop(timeout=30)


def test_worker_refreshes_an_untracked_view_on_its_objective(engine: sa.Engine) -> None:
    md = sa.MetaData()
    t = sa.Table("readings", md, sa.Column("v", sa.Integer))
    MaterializedView(
        "mv_sum",
        md,
        sa.select(sa.func.coalesce(sa.func.sum(t.c.v), 0).label("s")),
        max_staleness=datetime.timedelta(seconds=1),
    )
    md.create_all(engine)
    results: list[RefreshResult] = []
    # No tracked view at all: the objective alone is reason enough to run a worker.
    worker = RefreshWorker(engine, md, debounce=0.1, on_result=results.append)
    assert worker.interval == 0.5
    worker.start()
    try:
        assert wait_for(lambda: sum(r.status == "refreshed" for r in results) >= 2)
    finally:
        assert worker.stop(timeout=30)
    assert {r.view for r in results} == {"public.mv_sum"}


def test_a_worker_on_views_without_tracking_or_objective_is_refused(engine: sa.Engine) -> None:
    from sqlalchemy_matview import WorkerOptionError

    shop = build_shop(track=False)
    refused = "track_changes=True, incremental= or max_staleness="
    with pytest.raises(WorkerOptionError, match=refused):
        RefreshWorker(engine, shop.metadata)
