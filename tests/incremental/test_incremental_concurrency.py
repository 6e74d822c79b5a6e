"""Incremental refresh under concurrency: writers and refreshers in parallel, and a refresher
killed in the middle of its transaction, lose nothing."""

from __future__ import annotations

import datetime as dt
import random
import threading
import time

import pytest
import sqlalchemy as sa

from sqlalchemy_matview import refresh_views
from sqlalchemy_matview.orchestration.incremental import incremental_state, refresh_incremental

from .conftest import build_dashboard, difference


def at(day: int, minute: int) -> dt.datetime:
    return dt.datetime(2026, 3, day, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=minute)


@pytest.mark.slow
@pytest.mark.parametrize("realtime", [False, True], ids=["stored", "realtime"])
def test_writers_and_refreshers_in_parallel(engine, realtime):
    """Writers (inserts, moves between days and users, deletes, rollbacks) and refreshers
    for a few seconds; then one refresh and the views equal their definitions. A realtime
    view must equal its definition in every reader's snapshot all along."""
    d = build_dashboard(threshold=0.5, realtime=realtime)
    d.metadata.create_all(engine)
    events = d.events
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"writes": 0, "refreshes": 0, "reads": 0}

    def reader() -> None:
        try:
            with engine.connect() as conn:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
                while not stop.is_set():
                    with conn.begin():
                        for view in (d.mv_daily, d.mv_users):
                            assert difference(conn, view) == 0, view.name
                    counts["reads"] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with engine.connect() as conn:
                while not stop.is_set():
                    action = rnd.random()
                    user = rnd.randint(1, 20)
                    if action < 0.6:
                        conn.execute(
                            events.insert(),
                            [
                                {
                                    "created_at": at(rnd.randint(1, 10), rnd.randint(0, 1439)),
                                    "user_id": user,
                                    "kind": rnd.choice(["view", "purchase"]),
                                    "amount": rnd.randint(0, 9),
                                }
                                for _ in range(rnd.randint(1, 5))
                            ],
                        )
                    elif action < 0.85:
                        conn.execute(
                            events.update()
                            .where(events.c.user_id == user)
                            .values(
                                created_at=at(rnd.randint(1, 10), rnd.randint(0, 1439)),
                                user_id=rnd.randint(1, 20),
                            )
                        )
                    else:
                        conn.execute(events.delete().where(events.c.user_id == user))
                    if rnd.random() < 0.1:
                        conn.rollback()
                    else:
                        conn.commit()
                        counts["writes"] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def refresher() -> None:
        try:
            while not stop.is_set():
                for result in refresh_views(engine, d.mv_daily, d.mv_users, lock="wait"):
                    assert result.status == "refreshed", result
                counts["refreshes"] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=refresher) for _ in range(2)]
    if realtime:
        threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert counts["writes"] > 50 and counts["refreshes"] > 5, counts
    assert counts["reads"] > 5 or not realtime, counts
    refresh_views(engine, d.mv_daily, d.mv_users)
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
        assert difference(conn, d.mv_users) == 0


def test_a_killed_refresher_loses_nothing(engine, pg_server):
    d = build_dashboard()
    d.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            d.events.insert(),
            [{"created_at": at(day, 5), "user_id": day, "kind": "view"} for day in (1, 2, 3)],
        )
    victim = engine.connect()
    # Autobegun: the pid query starts the victim's transaction.
    pid = victim.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    done = refresh_incremental(victim, d.mv_daily)
    assert done.buckets == 3  # consumed in the victim's transaction, not committed
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.pg_terminate_backend(pid))).scalar()
    with pytest.raises(sa.exc.DBAPIError):
        victim.commit()
    victim.invalidate()
    victim.close()
    with engine.connect() as conn:
        assert incremental_state(conn, d.mv_daily).dirty_buckets == 3
        assert difference(conn, d.mv_daily) > 0
    (result,) = refresh_views(engine, d.mv_daily)
    assert result.buckets == 3
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


@pytest.mark.slow
def test_a_server_restart_during_a_refresh_loses_nothing(engine, pg_server):
    d = build_dashboard()
    d.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            d.events.insert(),
            [{"created_at": at(day, 9), "user_id": day, "kind": "view"} for day in (4, 5)],
        )
    refresher = engine.connect()
    assert refresh_incremental(refresher, d.mv_daily).buckets == 2  # not committed
    pg_server.restart()
    refresher.invalidate()
    refresher.close()
    engine.dispose()
    with engine.connect() as conn:
        assert incremental_state(conn, d.mv_daily).dirty_buckets == 2
    (result,) = refresh_views(engine, d.mv_daily)
    assert result.buckets == 2
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0


def test_a_refresh_that_cannot_wait_for_a_writer_keeps_its_buckets_dirty(engine):
    """A writer holding the barrier leaves an already-logged bucket to the refresh that
    consumes that log row; a refresh that gave up waiting for it (lock_timeout) must log
    what it consumed again, or the writer's change would be lost."""
    d = build_dashboard()
    d.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(d.events.insert(), [{"created_at": at(2, 5), "user_id": 1, "kind": "view"}])
    writer = engine.connect()
    # Day 2 is logged already: this write adds no log row and holds the barrier.
    writer.execute(d.events.insert(), [{"created_at": at(2, 6), "user_id": 2, "kind": "view"}])
    try:
        (result,) = refresh_views(engine, d.mv_daily, lock_timeout=0.2)
        assert result.status == "refreshed" and result.pending
    finally:
        writer.commit()
        writer.close()
    with engine.connect() as conn:
        assert incremental_state(conn, d.mv_daily).dirty_buckets == 1
    refresh_views(engine, d.mv_daily)
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
