"""Tracking across what renumbers or renames things: pg_dump/pg_restore, RENAME, drop + create.

The real ``pg_dump -Fc`` and ``pg_restore`` of the test server's installation. After each,
the application does what it does at start-up (``create_all``) and writes; the view must be
marked stale by the write and refreshed by ``refresh_stale``, then be fresh.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlalchemy_matview import MaterializedView, check_tracking, refresh_stale
from sqlalchemy_matview.asyncio import check_tracking as async_check_tracking
from sqlalchemy_matview.testing.launcher import PostgresServer

VIEW = "public.mv_sum"


def _declare(
    table: str = "src", view: str = "mv_sum"
) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    md = sa.MetaData()
    t = sa.Table(
        table,
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.Integer, nullable=False),
    )
    mv = MaterializedView(
        view,
        md,
        sa.select(
            sa.func.count().label("n"),
            sa.func.coalesce(sa.func.sum(t.c.v), 0).label("total"),
        ),
        columns=[sa.Column("n", sa.BigInteger), sa.Column("total", sa.BigInteger)],
        track_changes=True,
    )
    return md, t, mv


def _statuses(engine: Engine, md: sa.MetaData) -> dict[str, str]:
    return {r.view: r.status for r in refresh_stale(engine, md)}


def _write_marks_and_refresh_fixes(
    engine: Engine,
    md: sa.MetaData,
    mv: MaterializedView,
    *,
    table: str = "src",
    new_id: int,
    view_reads: str | None = None,
) -> None:
    name = f"public.{mv.name}"
    assert _statuses(engine, md)[name] in ("refreshed", "skipped_fresh")  # settle first
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (:id, 7)"), {"id": new_id})
    assert _statuses(engine, md)[name] == "refreshed", "the write did not mark the view stale"
    with engine.connect() as conn:
        view_rows = conn.execute(sa.select(mv.c.n, mv.c.total)).one()
        source = conn.execute(sa.text(f"SELECT count(*), sum(v) FROM {view_reads or table}")).one()
    assert tuple(view_rows) == tuple(source)
    assert _statuses(engine, md)[name] == "skipped_fresh", "stale again without a write"


@pytest.fixture
def tracked(engine: Engine) -> tuple[sa.MetaData, sa.Table, MaterializedView]:
    md, src, mv = _declare()
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO src SELECT g, g FROM generate_series(1, 10) g"))
    _write_marks_and_refresh_fixes(engine, md, mv, new_id=11)
    return md, src, mv


def _tool(server: PostgresServer, name: str) -> str:
    return str(server.installation.bindir / name)


def _connection_args(server: PostgresServer) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres"]


def _dump(server: PostgresServer, database: str, path: Path) -> None:
    subprocess.run(
        [
            _tool(server, "pg_dump"),
            "-Fc",
            *_connection_args(server),
            "-f",
            str(path),
            database,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _restore(server: PostgresServer, database: str, path: Path) -> None:
    done = subprocess.run(
        [
            _tool(server, "pg_restore"),
            "--exit-on-error",
            *_connection_args(server),
            "-d",
            database,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def launched(pg_server: object) -> PostgresServer:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip("pg_dump/pg_restore of the server's own installation need a launched server")
    return pg_server


@pytest.fixture
def restored_engine(launched: PostgresServer) -> Iterator[Engine]:
    name = launched.create_database()
    engine = sa.create_engine(launched.url(name))
    try:
        yield engine
    finally:
        engine.dispose()
        launched.drop_database(name)


def test_pg_dump_restore_into_a_fresh_database(
    engine: Engine,
    tracked: tuple[sa.MetaData, sa.Table, MaterializedView],
    launched: PostgresServer,
    restored_engine: Engine,
    tmp_path: Path,
) -> None:
    md, _, mv = tracked
    assert engine.url.database is not None and restored_engine.url.database is not None
    _dump(launched, engine.url.database, tmp_path / "app.dump")
    _restore(launched, restored_engine.url.database, tmp_path / "app.dump")
    md.create_all(restored_engine)  # what the application does at start-up
    _write_marks_and_refresh_fixes(restored_engine, md, mv, new_id=100)
    _write_marks_and_refresh_fixes(restored_engine, md, mv, new_id=101)
    # The original database is untouched by all this.
    _write_marks_and_refresh_fixes(engine, md, mv, new_id=200)


def test_a_raised_flag_that_pg_dump_copied_is_void_after_restore(
    engine: Engine,
    tracked: tuple[sa.MetaData, sa.Table, MaterializedView],
    launched: PostgresServer,
    restored_engine: Engine,
    tmp_path: Path,
) -> None:
    """pg_dump reads sequences after the snapshot its tables are copied in: a view's flag
    raised by a writer in between (who found a mark committed after that snapshot) is
    dumped raised, without the mark. Restored as it is, writers would skip marking forever;
    the flag must mean nothing there. Simulated: the flag raised the library's way, then its
    mark removed without lowering it."""
    md, _, mv = tracked
    with engine.connect() as writer:
        for key in (60, 61):  # the first adds a mark, the second finds it and raises the flag
            writer.execute(sa.text("INSERT INTO src VALUES (:k, 1)"), {"k": key})
            writer.commit()
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE sqlalchemy_matview.changes DISABLE TRIGGER bump_epoch"))
        conn.execute(sa.text("DELETE FROM sqlalchemy_matview.changes"))
        conn.execute(
            sa.text("ALTER TABLE sqlalchemy_matview.changes ENABLE ALWAYS TRIGGER bump_epoch")
        )
        conn.execute(sa.text("REFRESH MATERIALIZED VIEW mv_sum"))
    with engine.connect() as writer:  # the race, here: a write marks nothing
        writer.execute(sa.text("INSERT INTO src VALUES (62, 1)"))
        writer.commit()
    assert _statuses(engine, md)[VIEW] == "skipped_fresh"
    assert engine.url.database is not None and restored_engine.url.database is not None
    _dump(launched, engine.url.database, tmp_path / "app.dump")
    _restore(launched, restored_engine.url.database, tmp_path / "app.dump")
    # No create_all: the restored database keeps working as it is.
    _write_marks_and_refresh_fixes(restored_engine, md, mv, new_id=100)


def test_restore_of_a_stale_view_into_a_younger_cluster(
    engine: Engine,
    tracked: tuple[sa.MetaData, sa.Table, MaterializedView],
    launched: PostgresServer,
    tmp_path: Path,
) -> None:
    """Change rows carry transaction ids of the dumped cluster; a fresh cluster's counter
    is far behind them. The view must not stay stale forever."""
    md, _, mv = tracked
    with engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO src VALUES (50, 50)"))  # stale at dump time
        conn.commit()
        # Make sure the dumping cluster is well ahead of a fresh one.
        for _ in range(300):
            conn.execute(sa.text("SELECT pg_current_xact_id()"))
            conn.commit()
    assert engine.url.database is not None
    _dump(launched, engine.url.database, tmp_path / "app.dump")
    with PostgresServer(launched.installation) as young:
        name = young.create_database()
        _restore(young, name, tmp_path / "app.dump")
        target = sa.create_engine(young.url(name))
        try:
            with target.connect() as conn:
                ours = conn.scalar(sa.text("SELECT pg_current_xact_id()::text::bigint"))
            with engine.connect() as conn:
                theirs = conn.scalar(sa.text("SELECT pg_current_xact_id()::text::bigint"))
            assert ours is not None and theirs is not None and ours < theirs
            md.create_all(target)
            assert _statuses(target, md)[VIEW] == "refreshed"
            assert _statuses(target, md)[VIEW] == "skipped_fresh", "stale forever"
            _write_marks_and_refresh_fixes(target, md, mv, new_id=300)
        finally:
            target.dispose()


def test_source_table_renamed(
    engine: Engine, tracked: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = tracked
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE src RENAME TO src_renamed"))
    # The view's query follows the rename; so must its tracking.
    _write_marks_and_refresh_fixes(engine, md, mv, table="src_renamed", new_id=20)
    # The application's declarations follow it too, and start-up runs create_all again.
    md2, _, mv2 = _declare(table="src_renamed")
    md2.create_all(engine)
    _write_marks_and_refresh_fixes(engine, md2, mv2, table="src_renamed", new_id=21)


def test_view_renamed_then_declared_under_its_new_name(
    engine: Engine, tracked: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER MATERIALIZED VIEW mv_sum RENAME TO mv_total"))
    md2, _, mv2 = _declare(view="mv_total")
    md2.create_all(engine)
    _write_marks_and_refresh_fixes(engine, md2, mv2, new_id=30)


def test_view_dropped_outside_the_library_and_created_again(
    engine: Engine, tracked: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = tracked
    with engine.begin() as conn:
        conn.execute(sa.text("DROP MATERIALIZED VIEW mv_sum"))
    md.create_all(engine)
    _write_marks_and_refresh_fixes(engine, md, mv, new_id=40)


def test_source_and_view_dropped_and_created_again(
    engine: Engine, tracked: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = tracked
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE src CASCADE"))  # the view goes with it
    md.create_all(engine)
    _write_marks_and_refresh_fixes(engine, md, mv, new_id=41)


def test_drop_all_then_create_all(
    engine: Engine, tracked: tuple[sa.MetaData, sa.Table, MaterializedView]
) -> None:
    md, _, mv = tracked
    md.drop_all(engine)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO src VALUES (1, 1)"))
    _write_marks_and_refresh_fixes(engine, md, mv, new_id=42)


# -- check_tracking: whatever broke it, it says so, and create_all repairs it ---------------------


def _honest_then_repaired(
    engine: Engine, md: sa.MetaData, mv: MaterializedView, *, table: str, new_id: int
) -> list[str]:
    """If check_tracking finds nothing, writes must mark the view; otherwise each problem
    names the view, and after create_all it finds nothing and writes mark. Returns the
    problems seen first."""
    problems = check_tracking(engine, md)
    if not problems:
        _write_marks_and_refresh_fixes(engine, md, mv, table=table, new_id=new_id, view_reads="src")
        return []
    assert {p.view for p in problems} == {f"public.{mv.name}"}, problems
    md.create_all(engine)
    assert check_tracking(engine, md) == []
    _write_marks_and_refresh_fixes(engine, md, mv, table=table, new_id=new_id, view_reads="src")
    return [p.problem for p in problems]


@pytest.mark.parametrize(
    ("breakage", "table", "reported"),
    [
        ("ALTER TABLE src DISABLE TRIGGER USER", "src", True),
        ("DROP TRIGGER sqlalchemy_matview_stmt ON src", "src", True),
        ("ALTER TABLE src ENABLE REPLICA TRIGGER sqlalchemy_matview_stmt", "src", True),
        ("DELETE FROM sqlalchemy_matview.views", "src", True),
        ("DROP SCHEMA sqlalchemy_matview CASCADE", "src", True),
        ("CREATE TABLE src_child () INHERITS (src)", "src_child", True),
    ],
    ids=[
        "triggers_disabled",
        "trigger_dropped",
        "trigger_enable_mode_changed",
        "bookkeeping_rows_deleted",
        "bookkeeping_dropped",
        "late_inheritance_child",
    ],
)
def test_check_tracking_is_honest_and_create_all_repairs(
    engine: Engine,
    tracked: tuple[sa.MetaData, sa.Table, MaterializedView],
    breakage: str,
    table: str,
    reported: bool | None,
) -> None:
    md, _, mv = tracked
    assert check_tracking(engine, md) == []
    with engine.begin() as conn:
        conn.execute(sa.text(breakage))
    problems = _honest_then_repaired(engine, md, mv, table=table, new_id=500)
    if reported:
        assert problems, f"check_tracking saw nothing wrong after {breakage!r}"


def test_check_tracking_after_pg_restore_into_a_fresh_database(
    engine: Engine,
    tracked: tuple[sa.MetaData, sa.Table, MaterializedView],
    launched: PostgresServer,
    restored_engine: Engine,
    tmp_path: Path,
) -> None:
    md, _, mv = tracked
    assert engine.url.database is not None and restored_engine.url.database is not None
    _dump(launched, engine.url.database, tmp_path / "app.dump")
    _restore(launched, restored_engine.url.database, tmp_path / "app.dump")
    _honest_then_repaired(restored_engine, md, mv, table="src", new_id=600)


def test_check_tracking_async(
    async_engine: AsyncEngine,
    engine: Engine,
    tracked: tuple[sa.MetaData, sa.Table, MaterializedView],
) -> None:
    md, _, _ = tracked

    async def check() -> list[str]:
        return [p.view for p in await async_check_tracking(async_engine, md)]

    assert asyncio.run(check()) == []
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE src DISABLE TRIGGER USER"))
    assert asyncio.run(check()) == ["public.mv_sum"]
