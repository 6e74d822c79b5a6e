"""Through PgBouncer in transaction pooling mode: refreshes, tracking and migrations work.

Every statement may run on another server connection than the one before, so nothing may
rely on session state: no session advisory locks, no session ``SET``, no prepared
statements (``PgBouncer.CONNECT_ARGS``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.orm import Session

import sqlalchemy_matview.alembic
from sqlalchemy_matview import (
    MaterializedView,
    refresh,
    refresh_all,
    refresh_stale,
    refresh_views,
)
from sqlalchemy_matview.testing.components import PgBouncer

sqlalchemy_matview.alembic.register()


@pytest.fixture
def pooled(pgbouncer_url: sa.URL) -> Iterator[sa.Engine]:
    engine = sa.create_engine(pgbouncer_url, connect_args=dict(PgBouncer.CONNECT_ARGS))
    try:
        yield engine
    finally:
        engine.dispose()


def _model() -> tuple[sa.MetaData, sa.Table, MaterializedView, MaterializedView]:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    )
    counts = MaterializedView(
        "mv_counts",
        md,
        sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind),
        unique_key="kind",
        track_changes=True,
    )
    total = MaterializedView(
        "mv_total",
        md,
        sa.select(sa.func.coalesce(sa.func.sum(counts.c.n), 0).label("total")),
    )
    return md, events, counts, total


def _add(engine: sa.Engine, events: sa.Table, *kinds: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    with engine.begin() as conn:
        start = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0)))
        conn.execute(
            events.insert(),
            [{"id": start + i + 1, "kind": k, "at": now} for i, k in enumerate(kinds)],
        )


def _backend_pids(engine: sa.Engine, times: int) -> set[int]:
    with engine.connect() as conn:
        return {conn.scalar(sa.text("SELECT pg_backend_pid()")) for _ in range(times)}


def test_the_fixture_really_pools_per_transaction(pooled: sa.Engine) -> None:
    # The test's database has a pool of its own, empty at first. A's first transaction
    # opens server connection S1 and gives it back at COMMIT; B's transaction then takes
    # S1, so A's next transaction needs S2. In session pooling A would keep S1 throughout.
    with pooled.connect() as a, pooled.connect() as b:
        first = a.scalar(sa.text("SELECT pg_backend_pid()"))
        a.commit()
        assert b.scalar(sa.text("SELECT pg_backend_pid()")) == first
        second = a.scalar(sa.text("SELECT pg_backend_pid()"))
        assert second != first
        # What the client believes its backend is comes from PgBouncer, not the server.
        assert a.connection.dbapi_connection.info.backend_pid not in (first, second)  # type: ignore[union-attr]


def test_create_refresh_and_orm_through_pgbouncer(pooled: sa.Engine) -> None:
    md, events, counts, total = _model()
    md.create_all(pooled)
    _add(pooled, events, "a", "a", "b")
    for _ in range(8):  # past psycopg's prepare threshold: nothing is prepared
        with Session(pooled) as session:
            session.execute(refresh(counts))
            session.commit()
    with pooled.connect() as conn:
        assert dict(conn.execute(sa.select(counts.c.kind, counts.c.n)).all()) == {"a": 2, "b": 1}

    results = refresh_views(pooled, counts, cascade=True)
    assert [(r.view, r.status) for r in results] == [
        ("public.mv_counts", "refreshed"),
        ("public.mv_total", "refreshed"),
    ]
    assert {r.status for r in refresh_all(pooled, md)} == {"refreshed"}
    with pooled.connect() as conn:
        assert conn.scalar(sa.select(total.c.total)) == 3
    md.drop_all(pooled)


def test_change_tracking_and_refresh_stale_through_pgbouncer(pooled: sa.Engine) -> None:
    md, events, counts, _ = _model()
    md.create_all(pooled)
    for round_ in range(3):
        _add(pooled, events, "x")
        results = {r.view: r.status for r in refresh_stale(pooled, md)}
        assert results["public.mv_counts"] == "refreshed", (round_, results)
        with pooled.connect() as conn:
            assert conn.scalar(sa.select(counts.c.n).where(counts.c.kind == "x")) == round_ + 1
    # Nothing changed since: nothing is refreshed.
    assert {r.status for r in refresh_stale(pooled, md)} == {"skipped_fresh"}


def test_refresh_lock_holds_across_pooled_clients(pooled: sa.Engine) -> None:
    # The advisory lock is transaction-scoped: a second client through the same pool
    # sees it taken while the first refresh's transaction is open.
    md, _, counts, _ = _model()
    md.create_all(pooled)
    with pooled.connect() as holder:
        holder.begin()
        [first] = refresh_views(holder, counts)
        assert first.status == "refreshed"
        [second] = refresh_views(pooled, counts, lock="skip")
        assert second.status == "skipped_locked"
        holder.commit()
    [third] = refresh_views(pooled, counts, lock="skip")
    assert third.status == "refreshed"


def test_alembic_operations_through_pgbouncer(pooled: sa.Engine) -> None:
    with pooled.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 10) g"))
        op = Operations(MigrationContext.configure(conn))
        op.create_materialized_view("mv_t", "SELECT id FROM t", indexes=[])  # type: ignore[attr-defined]
        op.refresh_materialized_view("mv_t")  # type: ignore[attr-defined]
        op.replace_materialized_view(  # type: ignore[attr-defined]
            "mv_t", "SELECT id, id * 2 AS twice FROM t", old_definition="SELECT id FROM t"
        )
        op.set_materialized_view_comment("mv_t", "doubled")  # type: ignore[attr-defined]
    with pooled.connect() as conn:
        assert conn.scalar(sa.text("SELECT sum(twice) FROM mv_t")) == 110
        assert conn.scalar(sa.text("SELECT obj_description('mv_t'::regclass)")) == "doubled"
