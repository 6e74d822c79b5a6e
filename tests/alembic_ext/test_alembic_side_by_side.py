"""replace_materialized_view(strategy="side_by_side"): readers keep reading, dependents survive,
failures change nothing, long readers make the swap retry rather than queue everyone."""

from __future__ import annotations

import logging

import psycopg
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from matview_swap_helpers import (
    GATE_FUNCTION,
    Background,
    Gate,
    Readers,
    catalog_state,
    dsn,
    migrate,
    swap_leftovers,
    wait_until,
)

from sqlalchemy_matview.alembic.toimpl import DependentViewError
from sqlalchemy_matview.orchestration.tracking import install_tracking, tracking_installed
from sqlalchemy_matview.swap import SwapError, SwapLockTimeoutError, SwappedView, plan_swap

VIEWS = ["mv", "mv_big", "mv_top", "mv_big_count", "mv_lazy"]

SETUP = [
    "CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL, amount int NOT NULL)",
    "INSERT INTO events SELECT g, 'k' || mod(g, 5), g FROM generate_series(1, 500) g",
    "CREATE MATERIALIZED VIEW mv AS SELECT kind, sum(amount)::int AS total FROM events"
    " GROUP BY kind",
    "CREATE UNIQUE INDEX mv_kind ON mv (kind)",
    "CREATE INDEX mv_total ON mv (total DESC) WHERE total > 0",
    "COMMENT ON MATERIALIZED VIEW mv IS 'totals'",
    # A plain view on it, a materialized view on it, one on the plain view, and an
    # unpopulated one.
    "CREATE VIEW mv_big WITH (security_barrier=true) AS SELECT kind, total FROM mv"
    " WHERE total > 100",
    "COMMENT ON VIEW mv_big IS 'big ones'",
    "CREATE MATERIALIZED VIEW mv_top AS SELECT kind, total FROM mv ORDER BY total DESC LIMIT 2",
    "CREATE UNIQUE INDEX mv_top_kind ON mv_top (kind)",
    "COMMENT ON MATERIALIZED VIEW mv_top IS 'top two'",
    "CREATE MATERIALIZED VIEW mv_big_count AS SELECT count(*) AS n FROM mv_big",
    "CREATE MATERIALIZED VIEW mv_lazy AS SELECT kind FROM mv WITH NO DATA",
    'CREATE ROLE "Report Reader"',
    "CREATE ROLE reporting",
    'GRANT SELECT ON mv, mv_big, mv_top, mv_big_count TO "Report Reader"',
    "GRANT SELECT ON mv TO reporting WITH GRANT OPTION",
    "ALTER MATERIALIZED VIEW mv_top OWNER TO reporting",
    GATE_FUNCTION,
]

OLD = "SELECT kind, sum(amount)::int AS total FROM events GROUP BY kind"
# Same columns first (readers' prepared statements stay valid), one more at the end.
NEW = "SELECT kind, (sum(amount) * 2)::int AS total, count(*)::int AS n FROM events GROUP BY kind"
# The same, waiting at the gate while the build runs.
GATED = (
    "SELECT kind, (sum(amount) * 2)::int AS total, count(*)::int AS n FROM events"
    " WHERE (SELECT gate()) = 1 GROUP BY kind"
)

READS = [
    "SELECT kind, total FROM mv WHERE kind = 'k1'",
    "SELECT kind, total FROM mv_big ORDER BY kind",
    "SELECT kind FROM mv_top",
    "SELECT n FROM mv_big_count",
]


@pytest.fixture
def roles(engine: sa.Engine) -> object:
    yield
    with engine.begin() as conn:
        for role in ('"Report Reader"', "reporting"):
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")


@pytest.fixture
def setup(engine: sa.Engine, roles: object) -> sa.Engine:
    with engine.begin() as conn:
        for statement in SETUP:
            conn.exec_driver_sql(statement)
        install_tracking(conn, None, "mv", [(None, "events")])
    return engine


def _state(engine: sa.Engine) -> dict[str, tuple[object, ...]]:
    with engine.connect() as conn:
        return catalog_state(conn, VIEWS)


def _without_definition(state: dict[str, tuple[object, ...]], name: str) -> dict[str, object]:
    return {k: (v[:-1] if k == name else v) for k, v in state.items()}


def _replace(engine: sa.Engine, definition: str, **kw: object) -> None:
    migrate(
        engine,
        lambda op: op.replace_materialized_view(
            "mv", definition, strategy="side_by_side", old_definition=OLD, **kw
        ),
    )


def test_readers_read_through_the_build_and_dependents_survive(
    setup: sa.Engine, pg_url: sa.URL
) -> None:
    engine = setup
    before = _state(engine)
    readers = Readers(pg_url, READS).start()
    gate = Gate(pg_url)
    try:
        migration = Background(lambda: _replace(engine, GATED))
        # The build waits at the gate, past its staging schema and advisory locks...
        wait_until(lambda: gate.waiters() == 1, "the build to reach the gate")
        # ... and the readers go on reading the old views meanwhile.
        readers.wait_for_reads(200)
        assert not migration.done
        gate.open()
        migration.result()
        readers.wait_for_reads(200)
    finally:
        readers.stop()
    assert readers.errors == []

    after = _state(engine)
    assert _without_definition(after, "mv") == _without_definition(before, "mv")
    assert "count(*)" in str(after["mv"][-1])
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == 2 * sum(
            range(1, 500, 5)
        )
        assert conn.scalar(sa.text("SELECT n FROM mv WHERE kind = 'k1'")) == 100
        # Dependents were built against the new version: their data is the new data.
        assert conn.scalar(sa.text("SELECT min(total) FROM mv_top")) > 2 * 24000
        assert conn.scalar(sa.text("SELECT n FROM mv_big_count")) == 5
        assert tracking_installed(conn) == {("public", "mv")}
        assert swap_leftovers(conn) == []


def test_a_failing_dependent_leaves_everything_as_it_was(setup: sa.Engine) -> None:
    engine = setup
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX mv_total")
    before = _state(engine)
    # mv_big compares total with a number: text cannot be.
    with pytest.raises(DependentViewError, match=r"mv_big .*operator does not exist"):
        _replace(engine, "SELECT kind, sum(amount)::text AS total FROM events GROUP BY kind")
    assert _state(engine) == before
    with engine.connect() as conn:
        assert swap_leftovers(conn) == []
        assert tracking_installed(conn) == {("public", "mv")}


def test_a_failing_build_leaves_everything_as_it_was(setup: sa.Engine) -> None:
    engine = setup
    before = _state(engine)
    with pytest.raises(SwapError, match=r"failed while building .*division by zero"):
        _replace(engine, "SELECT kind, (sum(amount) / 0)::int AS total FROM events GROUP BY kind")
    assert _state(engine) == before
    with engine.connect() as conn:
        assert swap_leftovers(conn) == []


def test_a_failing_swap_leaves_everything_as_it_was(setup: sa.Engine, pg_url: sa.URL) -> None:
    """A view created on the old one while the build runs makes the swap's DROP fail."""
    engine = setup
    gate = Gate(pg_url)
    migration = Background(lambda: _replace(engine, GATED))
    wait_until(lambda: gate.waiters() == 1, "the build to reach the gate")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE VIEW newcomer AS SELECT kind FROM mv")
    before = _state(engine)
    gate.open()
    with pytest.raises(SwapError, match=r"failed while swapping .*depend"):
        migration.result()
    assert _state(engine) == before
    with engine.connect() as conn:
        assert swap_leftovers(conn) == []
        assert conn.scalar(sa.text("SELECT count(*) FROM newcomer")) == 5


def _sleeping_backends(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event = 'PgSleep' AND query LIKE 'DO $swap%'"
                )
            )
        )


def test_a_long_reader_makes_the_swap_retry_without_blocking_other_readers(
    setup: sa.Engine, pg_url: sa.URL, caplog: pytest.LogCaptureFixture
) -> None:
    engine = setup
    long_reader = psycopg.connect(dsn(pg_url))
    long_reader.execute("SELECT count(*) FROM mv").fetchall()  # holds its lock until commit
    caplog.set_level(logging.INFO, "alembic.runtime.sqlalchemy_matview")
    migration = Background(lambda: _replace(engine, NEW, swap_lock_timeout=0.1, swap_retries=1000))
    # The swap timed out and is sleeping before its next attempt...
    wait_until(lambda: _sleeping_backends(engine) == 1, "the swap to back off")
    # ... so a new reader gets through although the long transaction still holds its lock.
    # (A swap waiting without a lock_timeout would queue it until the statement_timeout.)
    for _ in range(3):
        with psycopg.connect(dsn(pg_url), autocommit=True) as reader:
            reader.execute("SET statement_timeout = '20s'")
            assert reader.execute("SELECT total FROM mv WHERE kind = 'k1'").fetchone()
        wait_until(lambda: _sleeping_backends(engine) == 1, "the swap to back off again")
    assert not migration.done
    long_reader.commit()
    long_reader.close()
    migration.result()
    attempts = [r.getMessage() for r in caplog.records if "swapped in" in r.getMessage()]
    assert attempts and "(1 attempt(s))" not in attempts[0]
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT n FROM mv WHERE kind = 'k1'")) == 100


def test_a_swap_out_of_attempts_names_the_blocker_and_changes_nothing(
    setup: sa.Engine, pg_url: sa.URL
) -> None:
    engine = setup
    before = _state(engine)
    with psycopg.connect(dsn(pg_url)) as long_reader:
        long_reader.execute("SELECT count(*) FROM mv_top").fetchall()
        pid = long_reader.info.backend_pid
        with pytest.raises(SwapLockTimeoutError, match=rf"(?s)3 attempts.*pid {pid} ") as raised:
            _replace(engine, NEW, swap_lock_timeout=0.05, swap_retries=2)
        assert "swap_lock_timeout" in str(raised.value)
        long_reader.rollback()
    assert _state(engine) == before
    with engine.connect() as conn:
        assert swap_leftovers(conn) == []


def test_an_unpopulated_view_or_one_built_without_data_is_dropped_and_created(
    setup: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    engine = setup
    with engine.begin() as conn:  # populated views on an unpopulated one cannot be built
        conn.exec_driver_sql("DROP MATERIALIZED VIEW mv_top, mv_big_count")
    caplog.set_level(logging.INFO, "alembic.runtime.sqlalchemy_matview")
    _replace(engine, NEW, with_data=False)
    assert "with_data=False leaves no reader to protect" in caplog.text
    with engine.connect() as conn:
        populated = sa.text("SELECT relispopulated FROM pg_class WHERE relname = 'mv'")
        assert conn.scalar(populated) is False
    caplog.clear()
    _replace(engine, OLD)
    assert "not populated, so nobody can read it" in caplog.text
    assert "building the new version" not in caplog.text
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == sum(
            range(1, 500, 5)
        )
        assert swap_leftovers(conn) == []


def test_a_role_that_may_not_create_schemas_is_told_before_anything_runs(
    setup: sa.Engine, pg_url: sa.URL
) -> None:
    engine = setup
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE ROLE no_schemas")
        conn.exec_driver_sql("GRANT reporting TO no_schemas")
    as_role = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)
    try:
        with as_role.connect() as conn:
            conn.exec_driver_sql("SET ROLE no_schemas")
            conn.commit()
            context = MigrationContext.configure(conn)
            with (
                pytest.raises(SwapError, match="GRANT CREATE ON DATABASE"),
                context.begin_transaction(),
            ):
                Operations(context).replace_materialized_view("mv", NEW, strategy="side_by_side")
    finally:
        as_role.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP ROLE no_schemas")
    with engine.connect() as conn:
        assert swap_leftovers(conn) == []
        assert conn.scalar(sa.text("SELECT total FROM mv WHERE kind = 'k1'")) == sum(
            range(1, 500, 5)
        )


def test_views_in_another_schema_and_dependents_naming_it(engine: sa.Engine) -> None:
    """The dependents' definitions name the view (and a table beside it) with their schema,
    which is not on the search_path: they still read the new version once swapped."""
    with engine.begin() as conn:
        for statement in [
            "CREATE SCHEMA reports",
            "CREATE TABLE reports.events (id int PRIMARY KEY, kind text NOT NULL)",
            "CREATE TABLE reports.labels (kind text PRIMARY KEY, label text NOT NULL)",
            "INSERT INTO reports.events SELECT g, 'k' || mod(g, 3) FROM generate_series(1, 30) g",
            "INSERT INTO reports.labels VALUES ('k0', 'zero'), ('k1', 'one'), ('k2', 'two')",
            "CREATE MATERIALIZED VIEW reports.mv AS SELECT kind, count(*) AS n"
            " FROM reports.events GROUP BY kind",
            "CREATE VIEW labelled AS SELECT m.kind, m.n, l.label"
            " FROM reports.mv m JOIN reports.labels l USING (kind)",
            "CREATE MATERIALIZED VIEW labelled_count AS SELECT sum(n) AS n FROM labelled",
        ]:
            conn.exec_driver_sql(statement)
    before = _state(engine)
    with engine.connect() as conn:
        definitions = catalog_state(conn, ["labelled", "labelled_count"])
    migrate(
        engine,
        lambda op: op.replace_materialized_view(
            "mv",
            "SELECT kind, count(*) * 10 AS n FROM reports.events GROUP BY kind",
            schema="reports",
            strategy="side_by_side",
        ),
    )
    with engine.connect() as conn:
        assert catalog_state(conn, ["labelled", "labelled_count"]) == definitions
        assert conn.scalar(sa.text("SELECT n FROM labelled WHERE label = 'one'")) == 100
        assert conn.scalar(sa.text("SELECT n FROM labelled_count")) == 300
        assert swap_leftovers(conn) == []
    assert _state(engine).keys() == before.keys()


def test_views_of_one_name_in_two_schemas_cannot_be_staged_together() -> None:
    def view(schema: str | None, name: str = "mv") -> SwappedView:
        return SwappedView(name, schema, True, "SELECT 1 AS one")

    plan_swap(view(None), [view("reports", "other")])
    with pytest.raises(SwapError, match=r"reports\.mv .*strategy='drop_create'"):
        plan_swap(view(None), [view("reports")])
