"""What a side-by-side replace means for other sessions: the migration's own transaction, and
readers holding prepared statements when the view's columns change type."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from matview_swap_helpers import dsn, migrate, swap_leftovers

from sqlalchemy_matview.swap import SwapError

SETUP = [
    "CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL, amount int NOT NULL)",
    "INSERT INTO events SELECT g, 'k' || mod(g, 5), g FROM generate_series(1, 500) g",
    "CREATE MATERIALIZED VIEW mv AS SELECT kind, sum(amount)::int AS total FROM events"
    " GROUP BY kind",
    "CREATE UNIQUE INDEX mv_kind ON mv (kind)",
]
# total becomes a bigint.
RETYPED = "SELECT kind, sum(amount) AS total FROM events GROUP BY kind"
SAME_TYPES = "SELECT kind, (sum(amount) + 1)::int AS total FROM events GROUP BY kind"


@pytest.fixture
def setup(engine: sa.Engine) -> sa.Engine:
    with engine.begin() as conn:
        for statement in SETUP:
            conn.exec_driver_sql(statement)
    return engine


def _locks_on_mv(engine: sa.Engine, pid: int) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT mode FROM pg_locks WHERE pid = :pid AND locktype = 'relation'"
                " AND relation = 'mv'::regclass"
            ),
            {"pid": pid},
        )
        return [r[0] for r in rows]


def _pid(conn: sa.Connection) -> int:
    return int(conn.scalar(sa.text("SELECT pg_backend_pid()")))


def _tables(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(sa.inspect(conn).get_table_names())


def test_in_a_migration_the_swap_commits_and_releases_its_locks(setup: sa.Engine) -> None:
    """What ran before is committed with the swap; what runs after is a new transaction."""
    engine = setup
    seen: dict[str, object] = {}

    def upgrade(op: Operations) -> None:
        op.execute("CREATE TABLE before_swap (id int)")
        op.replace_materialized_view("mv", SAME_TYPES, strategy="side_by_side")
        # Seen from another session: committed, and the migration holds no lock on the view.
        seen["tables"] = _tables(engine)
        seen["locks"] = _locks_on_mv(engine, _pid(op.get_bind()))
        op.execute("CREATE TABLE after_swap (id int)")
        raise RuntimeError("the rest of the migration fails")

    with pytest.raises(RuntimeError, match="rest of the migration"):
        migrate(engine, upgrade)
    assert "before_swap" in seen["tables"]  # type: ignore[operator]
    assert seen["locks"] == []
    assert "after_swap" not in _tables(engine)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == 24851


def test_in_the_callers_transaction_a_savepoint_holds_the_locks_until_it_commits(
    setup: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    engine = setup
    caplog.set_level(logging.WARNING, "alembic.runtime.sqlalchemy_matview")
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")  # the caller's transaction has begun
        op = Operations(MigrationContext.configure(conn))
        op.replace_materialized_view("mv", SAME_TYPES, strategy="side_by_side")
        assert "AccessExclusiveLock" in _locks_on_mv(engine, _pid(conn))
        assert "transaction that the migration does not own" in caplog.text
        conn.rollback()  # ... and the caller can still undo it all
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == 24850
        assert swap_leftovers(conn) == []


def test_inside_an_autocommit_block(setup: sa.Engine) -> None:
    engine = setup

    def upgrade(op: Operations) -> None:
        with op.get_context().autocommit_block():
            op.replace_materialized_view("mv", SAME_TYPES, strategy="side_by_side")
            assert _locks_on_mv(engine, _pid(op.get_bind())) == []

    migrate(engine, upgrade)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == 24851


def _prepared_reader(
    pg_url: sa.URL, threshold: int | None
) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(dsn(pg_url), autocommit=True, prepare_threshold=threshold)
    for _ in range(6):  # psycopg prepares a query the 6th time it runs it on a connection
        conn.execute("SELECT * FROM mv WHERE kind = %s", ("k1",)).fetchall()
    return conn


def test_a_column_changing_type_breaks_prepared_statements_that_are_kept(
    setup: sa.Engine, pg_url: sa.URL, caplog: pytest.LogCaptureFixture
) -> None:
    """What production sees; the operation warns about it (see docs/alembic.md).

    A connection that keeps a prepared ``SELECT *`` (psycopg outside a transaction) fails
    until it is closed; one that rolls back (SQLAlchemy's pool does, when a connection is
    returned) fails once; unprepared statements never fail.
    """
    engine = setup
    kept = _prepared_reader(pg_url, 5)
    unprepared = _prepared_reader(pg_url, None)
    session = sa.create_engine(pg_url, pool_size=1)
    pooled = sa.create_engine(pg_url, pool_size=1)
    query = sa.text("SELECT * FROM mv WHERE kind = :kind")
    try:
        with session.connect() as long_lived:
            for _ in range(6):
                long_lived.execute(query, {"kind": "k1"}).all()
            long_lived.commit()
            for _ in range(6):
                with pooled.connect() as conn:
                    conn.execute(query, {"kind": "k1"}).all()
            caplog.set_level(logging.WARNING, "alembic.runtime.sqlalchemy_matview")
            migrate(
                engine,
                lambda op: op.replace_materialized_view("mv", RETYPED, strategy="side_by_side"),
            )
            assert "the columns of mv change" in caplog.text

            for _ in range(2):
                with pytest.raises(psycopg.errors.FeatureNotSupported, match="cached plan"):
                    kept.execute("SELECT * FROM mv WHERE kind = %s", ("k1",))
            assert unprepared.execute("SELECT * FROM mv WHERE kind = %s", ("k1",)).fetchall()
            with pooled.connect() as conn:
                assert conn.execute(query, {"kind": "k1"}).all()
            with pytest.raises(sa.exc.NotSupportedError, match="cached plan"):
                long_lived.execute(query, {"kind": "k1"})
            long_lived.rollback()
            assert long_lived.execute(query, {"kind": "k1"}).all() == [("k1", 24850)]
    finally:
        kept.close()
        unprepared.close()
        session.dispose()
        pooled.dispose()


def test_unchanged_column_types_keep_prepared_statements_working(
    setup: sa.Engine, pg_url: sa.URL, caplog: pytest.LogCaptureFixture
) -> None:
    engine = setup
    kept = _prepared_reader(pg_url, 5)
    try:
        caplog.set_level(logging.WARNING, "alembic.runtime.sqlalchemy_matview")
        migrate(
            engine,
            lambda op: op.replace_materialized_view("mv", SAME_TYPES, strategy="side_by_side"),
        )
        assert "columns of" not in caplog.text
        rows = kept.execute("SELECT * FROM mv WHERE kind = %s", ("k1",)).fetchall()
        assert rows == [("k1", 24851)]
    finally:
        kept.close()


def test_through_an_async_engine(setup: sa.Engine, async_engine: Any) -> None:
    """Alembic's async template runs migrations with ``run_sync``: psycopg and asyncpg."""
    engine = setup

    def replace(definition: str) -> Callable[[sa.Connection], None]:
        def run(conn: sa.Connection) -> None:
            context = MigrationContext.configure(conn)
            with context.begin_transaction():
                Operations(context).replace_materialized_view(
                    "mv", definition, strategy="side_by_side"
                )

        return run

    async def main() -> None:
        async with async_engine.connect() as conn:
            with pytest.raises(SwapError, match="division by zero"):
                await conn.run_sync(replace(SAME_TYPES.replace("+ 1", "/ 0")))
            await conn.run_sync(replace(SAME_TYPES))

    asyncio.run(main())
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == 24851
        assert swap_leftovers(conn) == []
