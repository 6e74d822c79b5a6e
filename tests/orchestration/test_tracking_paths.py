"""Every way a row reaches a tracked source marks the view stale, and refresh_stale fixes it.

Each test writes one way, then checks through the public API only: ``refresh_stale``
refreshes the view (``"refreshed"``), the view's rows are right, and the next
``refresh_stale`` finds it fresh. A path that does not mark the view stale leaves
``"skipped_fresh"`` and wrong rows: the view silently serves old data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sqlalchemy_matview import (
    MaterializedView,
    check_tracking,
    refresh_stale,
    refresh_views,
)

VIEW = "public.mv_sum"


def _declare(**table_kw: Any) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    md = sa.MetaData()
    t = sa.Table(
        "src",
        md,
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("v", sa.Integer, nullable=False),
        **table_kw,
    )
    mv = MaterializedView(
        "mv_sum",
        md,
        sa.select(
            sa.func.count().label("n"),
            sa.func.coalesce(sa.func.sum(t.c.v), 0).label("total"),
        ),
        columns=[sa.Column("n", sa.BigInteger), sa.Column("total", sa.BigInteger)],
        track_changes=True,
    )
    return md, t, mv


def _view_rows(engine: Engine, mv: MaterializedView) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(mv.c.n, mv.c.total)).one()
    return int(row.n), int(row.total)


def _source_rows(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT count(*), coalesce(sum(v), 0) FROM src")).one()
    return int(row[0]), int(row[1])


def _assert_marked_and_refreshed(
    engine: Engine, md: sa.MetaData, mv: MaterializedView, after: str = "the write"
) -> None:
    statuses = {r.view: r.status for r in refresh_stale(engine, md)}
    assert statuses[VIEW] == "refreshed", f"{after} did not mark the view stale"
    assert _view_rows(engine, mv) == _source_rows(engine)
    assert {r.view: r.status for r in refresh_stale(engine, md)}[VIEW] == "skipped_fresh"


def _write(engine: Engine, statement: str | Callable[[Connection], object]) -> None:
    with engine.begin() as conn:
        if isinstance(statement, str):
            conn.execute(sa.text(statement))
        else:
            statement(conn)


# -- a plain table ---------------------------------------------------------------------------


@pytest.fixture
def plain(engine: Engine) -> tuple[sa.MetaData, MaterializedView]:
    md, _, mv = _declare()
    md.create_all(engine)
    _write(engine, "INSERT INTO src SELECT g, g FROM generate_series(1, 10) g")
    _assert_marked_and_refreshed(engine, md, mv)
    return md, mv


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO src VALUES (100, 100)",
        "UPDATE src SET v = v + 1 WHERE id = 3",
        "DELETE FROM src WHERE id = 4",
        "TRUNCATE src",
        "INSERT INTO src SELECT * FROM src",  # reads the source while writing it
        "MERGE INTO src USING (VALUES (1, 50), (200, 200)) AS s(id, v) ON src.id = s.id"
        " WHEN MATCHED THEN UPDATE SET v = s.v WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.v)",
    ],
    ids=["insert", "update", "delete", "truncate", "insert_select", "merge"],
)
def test_plain_table_writes(
    engine: Engine, plain: tuple[sa.MetaData, MaterializedView], statement: str
) -> None:
    md, mv = plain
    _write(engine, statement)
    _assert_marked_and_refreshed(engine, md, mv)


def test_copy_from_stdin(engine: Engine, plain: tuple[sa.MetaData, MaterializedView]) -> None:
    md, mv = plain
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        assert isinstance(driver, psycopg.Connection)
        with driver.cursor() as cur, cur.copy("COPY src (id, v) FROM STDIN") as copy:
            copy.write("500\t5\n501\t6\n")
        driver.commit()
    finally:
        raw.close()
    _assert_marked_and_refreshed(engine, md, mv)


def test_update_that_changes_nothing_visible_still_marks(
    engine: Engine, plain: tuple[sa.MetaData, MaterializedView]
) -> None:
    # Zero rows matched: nothing changed, refreshing is allowed but must not be required.
    # A matched row rewritten with its own value did write a new tuple: must mark.
    md, mv = plain
    _write(engine, "UPDATE src SET v = v WHERE id = 1")
    _assert_marked_and_refreshed(engine, md, mv)


def test_write_through_an_updatable_plain_view(
    engine: Engine, plain: tuple[sa.MetaData, MaterializedView]
) -> None:
    md, mv = plain
    _write(engine, "CREATE VIEW src_api AS SELECT id, v FROM src")
    _write(engine, "INSERT INTO src_api VALUES (300, 3)")
    _assert_marked_and_refreshed(engine, md, mv)


def test_writes_rolled_back_leave_the_view_fresh(
    engine: Engine, plain: tuple[sa.MetaData, MaterializedView]
) -> None:
    md, _ = plain
    with engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO src VALUES (400, 4)"))
        conn.rollback()
    assert {r.view: r.status for r in refresh_stale(engine, md)}[VIEW] == "skipped_fresh"


def test_replica_role_writes(engine: Engine, plain: tuple[sa.MetaData, MaterializedView]) -> None:
    """What logical replication's apply, pglogical and some ETL tools do."""
    md, mv = plain
    for statement in (
        "INSERT INTO src VALUES (600, 6)",
        "UPDATE src SET v = v * 2 WHERE id = 600",
        "DELETE FROM src WHERE id = 600",
        "TRUNCATE src",
    ):
        with engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
            conn.execute(sa.text(statement))
        _assert_marked_and_refreshed(engine, md, mv, statement)


# -- partitions ------------------------------------------------------------------------------


@pytest.fixture
def partitioned(engine: Engine) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    """``src`` partitioned by range of id, two leaves made before tracking was enabled."""
    md, src, mv = _declare(postgresql_partition_by="RANGE (id)")
    src.create(engine)
    _write(engine, "CREATE TABLE src_a PARTITION OF src FOR VALUES FROM (0) TO (100)")
    _write(engine, "CREATE TABLE src_b PARTITION OF src FOR VALUES FROM (100) TO (200)")
    _write(engine, "INSERT INTO src SELECT g, 1 FROM generate_series(0, 199) g")
    md.create_all(engine)  # the view and its tracking, on a table that has partitions
    return md, src, mv


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO src VALUES (5, 10)",
        "INSERT INTO src_a VALUES (6, 10)",
        "UPDATE src SET v = 7 WHERE id = 150",
        "UPDATE src_b SET v = 7 WHERE id = 150",
        "UPDATE src SET id = 150 WHERE id = 50",  # moves the row to the other partition
        "DELETE FROM src_a WHERE id = 3",
        "DELETE FROM src WHERE id = 103",
        "TRUNCATE src_a",
        "TRUNCATE src",
    ],
    ids=[
        "insert_parent",
        "insert_leaf",
        "update_parent",
        "update_leaf",
        "update_moves_row",
        "delete_leaf",
        "delete_parent",
        "truncate_leaf",
        "truncate_parent",
    ],
)
def test_partitioned_writes(
    engine: Engine,
    partitioned: tuple[sa.MetaData, sa.Table, MaterializedView],
    statement: str,
) -> None:
    md, _, mv = partitioned
    _write(engine, statement)
    _assert_marked_and_refreshed(engine, md, mv)


def test_partition_created_after_tracking(
    engine: Engine, partitioned: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = partitioned
    _write(engine, "CREATE TABLE src_c PARTITION OF src FOR VALUES FROM (200) TO (300)")
    for statement in (
        "INSERT INTO src_c VALUES (250, 9)",
        "UPDATE src_c SET v = 10",
        "INSERT INTO src VALUES (251, 9)",
        "DELETE FROM src_c WHERE id = 250",
    ):
        _write(engine, statement)
        _assert_marked_and_refreshed(engine, md, mv, statement)


def test_truncate_of_a_partition_created_after_tracking(
    engine: Engine, partitioned: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    """Marked at once, or reported by check_tracking and marked after create_all."""
    md, _, mv = partitioned
    _write(engine, "CREATE TABLE src_c PARTITION OF src FOR VALUES FROM (200) TO (300)")
    _write(engine, "INSERT INTO src_c VALUES (250, 9)")
    _assert_marked_and_refreshed(engine, md, mv)
    if check_tracking(engine, md):
        md.create_all(engine)
        assert check_tracking(engine, md) == []
    _write(engine, "TRUNCATE src_c")
    _assert_marked_and_refreshed(engine, md, mv, "TRUNCATE src_c")


def test_partition_attached_after_tracking(
    engine: Engine, partitioned: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = partitioned
    _write(engine, "CREATE TABLE src_d (LIKE src)")
    _write(engine, "INSERT INTO src_d VALUES (300, 30)")
    _write(engine, "ALTER TABLE src ATTACH PARTITION src_d FOR VALUES FROM (300) TO (400)")
    # DDL fires no trigger: the attach itself is the application's to refresh after.
    refresh_views(engine, mv)
    _write(engine, "INSERT INTO src_d VALUES (301, 31)")
    _assert_marked_and_refreshed(engine, md, mv)


def test_sub_partitioned_leaf(
    engine: Engine, partitioned: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = partitioned
    _write(
        engine,
        "CREATE TABLE src_e PARTITION OF src FOR VALUES FROM (400) TO (500) PARTITION BY RANGE (v)",
    )
    _write(engine, "CREATE TABLE src_e1 PARTITION OF src_e FOR VALUES FROM (0) TO (1000)")
    _write(engine, "INSERT INTO src_e1 VALUES (450, 5)")
    _assert_marked_and_refreshed(engine, md, mv)


def test_replica_role_into_a_leaf(
    engine: Engine, partitioned: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = partitioned
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        conn.execute(sa.text("INSERT INTO src_a VALUES (7, 70)"))
    _assert_marked_and_refreshed(engine, md, mv)


# -- inheritance -----------------------------------------------------------------------------


@pytest.fixture
def inherited(engine: Engine) -> tuple[sa.MetaData, MaterializedView]:
    """``src`` with a child table that exists when tracking is installed."""
    md, src, mv = _declare()
    src.create(engine)
    _write(engine, "CREATE TABLE src_child (extra text) INHERITS (src)")
    md.create_all(engine)
    _write(engine, "INSERT INTO src VALUES (1, 1)")
    _assert_marked_and_refreshed(engine, md, mv)
    return md, mv


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO src_child VALUES (2, 2, 'x')",
        "UPDATE src SET v = 3",  # reaches the child's rows through the parent
        "DELETE FROM src_child",
        "TRUNCATE src_child",
    ],
    ids=["insert_child", "update_parent", "delete_child", "truncate_child"],
)
def test_inheritance_child_writes(
    engine: Engine, inherited: tuple[sa.MetaData, MaterializedView], statement: str
) -> None:
    md, mv = inherited
    _write(engine, "INSERT INTO src_child VALUES (9, 9, 'seed')")
    _assert_marked_and_refreshed(engine, md, mv, "the seed INSERT into the child")
    _write(engine, statement)
    _assert_marked_and_refreshed(engine, md, mv, statement)


def test_child_table_inheriting_after_tracking(
    engine: Engine, inherited: tuple[sa.MetaData, MaterializedView]
) -> None:
    """A child added later is reported by check_tracking and covered after create_all."""
    md, mv = inherited
    _write(engine, "CREATE TABLE src_late (LIKE src)")
    _write(engine, "INSERT INTO src_late VALUES (20, 20)")
    _write(engine, "ALTER TABLE src_late INHERIT src")
    refresh_views(engine, mv)  # DDL fires no trigger (see test_partition_attached_after_tracking)
    if check_tracking(engine, md):
        md.create_all(engine)
        assert check_tracking(engine, md) == []
    _write(engine, "INSERT INTO src_late VALUES (21, 21)")
    _assert_marked_and_refreshed(engine, md, mv, "INSERT into a child added later")


# -- notifications ---------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_writer_with_an_old_snapshot_still_wakes_the_worker(
    engine: Engine, plain: tuple[sa.MetaData, MaterializedView], isolation: str
) -> None:
    """fresh -> stale must notify even when the writer's snapshot predates the last refresh."""
    md, mv = plain
    _write(engine, "INSERT INTO src VALUES (700, 7)")  # stale: a change row of its own
    raw = engine.raw_connection()
    listener = engine.raw_connection()
    try:
        raw.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
        raw.execute("SELECT count(*) FROM src").fetchall()  # the snapshot
        statuses = {r.view: r.status for r in refresh_stale(engine, md)}
        assert statuses[VIEW] == "refreshed"  # fresh now; the writer's snapshot predates it
        driver = listener.driver_connection
        assert driver is not None
        driver.autocommit = True
        driver.execute("LISTEN sqlalchemy_matview")
        raw.execute("INSERT INTO src VALUES (701, 7)")
        raw.commit()
        got = [n.payload for n in driver.notifies(timeout=10, stop_after=1)]
        assert got == [VIEW], "the view went stale and nobody was told"
    finally:
        raw.close()
        listener.close()
    _assert_marked_and_refreshed(engine, md, mv)
