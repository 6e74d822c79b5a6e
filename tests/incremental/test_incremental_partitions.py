"""Partitions attached, detached, dropped or truncated without a trigger: no trigger fires,
and still the next refresh (``refresh_stale`` included) makes the view exact again."""

from __future__ import annotations

import sqlalchemy as sa

from sqlalchemy_matview import refresh_stale, refresh_views
from sqlalchemy_matview.orchestration.incremental import incremental_state

from .conftest import Dashboard, build_dashboard, difference


def _partition(conn: sa.Connection, name: str, month: int) -> None:
    conn.execute(
        sa.text(
            f"CREATE TABLE {name} PARTITION OF events"
            f" FOR VALUES FROM ('2026-{month:02}-01') TO ('2026-{month + 1:02}-01')"
        )
    )


def _rows(conn: sa.Connection, table: str, month: int, users: int = 3) -> None:
    conn.execute(
        sa.text(
            f"INSERT INTO {table} (created_at, user_id, kind, amount)"
            f" SELECT timestamptz '2026-{month:02}-03 10:00+00' + g * interval '1 day',"
            " g, 'purchase', g FROM generate_series(1, :n) g"
        ),
        {"n": users},
    )


def _partitioned(engine: sa.Engine, *, realtime: bool = False) -> Dashboard:
    """events partitioned by month: March and April with rows, then the views."""
    d = build_dashboard(partitioned=True, realtime=realtime)
    with engine.begin() as conn:
        d.events.create(conn)
        _partition(conn, "events_march", 3)
        _partition(conn, "events_april", 4)
        _rows(conn, "events", 3)
        _rows(conn, "events", 4)
    d.metadata.create_all(engine)
    return d


def _exact(engine: sa.Engine, d: Dashboard) -> None:
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) == 0
        assert difference(conn, d.mv_users) == 0


def _reshaped(engine: sa.Engine, d: Dashboard) -> bool:
    with engine.connect() as conn:
        state = incremental_state(conn, d.mv_daily)
        assert state.dirty_buckets == 0  # nothing was logged
        return state.reshaped and state.dirty


def test_detach_and_drop_partition_are_recomputed(engine):
    d = _partitioned(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE events DETACH PARTITION events_april"))
    assert _reshaped(engine, d)
    with engine.connect() as conn:
        assert difference(conn, d.mv_daily) > 0  # April's days are still stored
    results = refresh_stale(engine, d.metadata)
    assert {r.status for r in results} == {"refreshed"}
    assert all(r.full_refresh for r in results)
    _exact(engine, d)
    assert not _reshaped(engine, d)
    # Nothing changed since: the next pass leaves both alone.
    assert {r.status for r in refresh_stale(engine, d.metadata)} == {"skipped_fresh"}

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE events_march"))
    assert all(r.full_refresh for r in refresh_views(engine, d.mv_daily, d.mv_users))
    _exact(engine, d)


def test_attach_partition_with_rows_is_recomputed(engine):
    d = _partitioned(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE events_may (LIKE events)"))
        _rows(conn, "events_may", 5, users=4)
        conn.execute(
            sa.text(
                "ALTER TABLE events ATTACH PARTITION events_may"
                " FOR VALUES FROM ('2026-05-01') TO ('2026-06-01')"
            )
        )
    assert _reshaped(engine, d)
    results = refresh_stale(engine, d.metadata)
    assert all(r.status == "refreshed" and r.full_refresh for r in results)
    _exact(engine, d)


def test_truncate_of_a_partition_created_after_the_view(engine):
    """Statement triggers are not cloned: TRUNCATE of a later partition fires none of ours."""
    d = _partitioned(engine)
    with engine.begin() as conn:
        _partition(conn, "events_june", 6)
        _rows(conn, "events", 6)
    refresh_stale(engine, d.metadata)
    _exact(engine, d)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE events_june"))
    assert _reshaped(engine, d)
    assert all(r.full_refresh for r in refresh_views(engine, d.mv_daily, d.mv_users))
    _exact(engine, d)


def test_a_partition_created_ahead_costs_no_full_recompute(engine):
    """Partitions created empty (as pg_partman makes them ahead of time): their writes are
    logged by the cloned row trigger, and the refresh stays incremental."""
    d = _partitioned(engine)
    with engine.begin() as conn:
        _partition(conn, "events_july", 7)
        _partition(conn, "events_august", 8)
    with engine.connect() as conn:
        state = incremental_state(conn, d.mv_daily)
        assert not state.dirty
    # The new leaves are recorded by the next pass, which recomputes nothing.
    assert {r.status for r in refresh_stale(engine, d.metadata)} == {"skipped_fresh"}
    with engine.begin() as conn:
        _rows(conn, "events", 7, users=2)
    for result in refresh_views(engine, d.mv_daily, d.mv_users):
        assert result.status == "refreshed"
        assert not result.full_refresh
        assert result.buckets == 2
    _exact(engine, d)


def test_a_realtime_view_is_exact_right_after_a_detach(engine):
    d = _partitioned(engine, realtime=True)
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE events DETACH PARTITION events_march"))
    _exact(engine, d)  # no refresh: the rows are computed live
    refresh_views(engine, d.mv_daily, d.mv_users)
    _exact(engine, d)
    assert not _reshaped(engine, d)
