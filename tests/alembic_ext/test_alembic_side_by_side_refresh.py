"""Refreshes during a side-by-side replace: nothing deadlocks and no refresh is lost.

The build takes the views' refresh locks before its snapshot, so a refresh asked for while it
runs refreshes the new version once the swap commits. Without those locks a refresh of the
old view would clear the staleness marks of a write the new version does not hold.
"""

from __future__ import annotations

import threading

import sqlalchemy as sa
from matview_swap_helpers import GATE_FUNCTION, Background, Gate, migrate, wait_until

from sqlalchemy_matview import MaterializedView, RefreshResult, RefreshWorker, refresh_views
from sqlalchemy_matview.orchestration.locking import lock_key_parts
from sqlalchemy_matview.orchestration.tracking import view_states

GATED = (
    "SELECT events.kind, (sum(events.amount) * 2)::integer AS total, count(*)::integer AS n"
    " FROM events WHERE (SELECT gate()) = 1 GROUP BY events.kind"
)
K1 = sum(range(1, 500, 5))


def _models() -> tuple[sa.MetaData, sa.Table]:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
    )
    MaterializedView(
        "mv",
        md,
        sa.select(
            events.c.kind, sa.cast(sa.func.sum(events.c.amount), sa.Integer).label("total")
        ).group_by(events.c.kind),
        unique_key="kind",
        track_changes=True,
    )
    return md, events


def _setup(engine: sa.Engine) -> tuple[sa.MetaData, sa.Table]:
    md, events = _models()
    with engine.begin() as conn:
        conn.exec_driver_sql(GATE_FUNCTION)
        md.create_all(conn)
        conn.execute(
            events.insert(),
            [{"id": g, "kind": f"k{g % 5}", "amount": g} for g in range(1, 500)],
        )
        conn.exec_driver_sql("REFRESH MATERIALIZED VIEW mv")
    return md, events


def _replace(engine: sa.Engine) -> None:
    migrate(
        engine,
        lambda op: op.replace_materialized_view("mv", GATED, strategy="side_by_side"),
    )


def _write_during_build(engine: sa.Engine, events: sa.Table) -> None:
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"id": 1000, "kind": "k1", "amount": 1000}])


def _refresh_waiters(engine: sa.Engine) -> int:
    classid, objid = lock_key_parts(("public", "mv"))
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    " AND classid = :c AND objid = :o AND objsubid = 1"
                ),
                {"c": classid, "o": objid},
            )
        )


def _assert_new_version_holds_the_write(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT total, n FROM mv WHERE kind = 'k1'")).one()
        assert tuple(row) == (2 * (K1 + 1000), 101)
        assert not view_states(conn)[("public", "mv")].stale


def test_refresh_views_during_the_build_refreshes_the_new_version(
    engine: sa.Engine, pg_url: sa.URL
) -> None:
    _, events = _setup(engine)
    gate = Gate(pg_url)
    migration = Background(lambda: _replace(engine))
    wait_until(lambda: gate.waiters() == 1, "the build to reach the gate")
    _write_during_build(engine, events)
    # The build holds the view's refresh lock: a refresh that will not wait skips it...
    (skipped,) = refresh_views(engine, "mv", lock="skip")
    assert skipped.status == "skipped_locked"
    # ... and one that waits refreshes once the swap is done.
    refresh = Background(lambda: refresh_views(engine, "mv", lock="wait", lock_timeout=120))
    wait_until(lambda: _refresh_waiters(engine) == 1, "the refresh to wait for the build")
    gate.open()
    migration.result()
    (result,) = refresh.result()
    assert result.status == "refreshed", result
    _assert_new_version_holds_the_write(engine)


def test_a_worker_running_through_the_swap_refreshes_the_new_version(
    engine: sa.Engine, pg_url: sa.URL
) -> None:
    md, events = _setup(engine)
    results: list[RefreshResult] = []
    done = threading.Event()

    def on_result(result: RefreshResult) -> None:
        results.append(result)

    worker = RefreshWorker(engine, md, debounce=0.05, max_delay=1.0, on_result=on_result)
    worker.start()
    try:
        wait_until(lambda: worker.passes >= 1, "the worker's first pass")
        gate = Gate(pg_url)
        migration = Background(lambda: _replace(engine))
        wait_until(lambda: gate.waiters() == 1, "the build to reach the gate")
        _write_during_build(engine, events)
        wait_until(
            lambda: any(r.status == "skipped_locked" for r in results),
            "the worker to find the view locked by the build",
        )
        seen = len(results)
        gate.open()
        migration.result()
        wait_until(
            lambda: any(r.status == "refreshed" for r in results[seen:]),
            "the worker to refresh after the swap",
        )
        done.set()
    finally:
        assert worker.stop(timeout=30)
    assert [r for r in results if r.status == "failed"] == []
    _assert_new_version_holds_the_write(engine)
