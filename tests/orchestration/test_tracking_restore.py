"""Tracking across what renumbers or renames things: RENAME, drop + create.

After each, the application does what it does at start-up (``create_all``) and writes; the
view must be marked stale by the write and refreshed by ``refresh_stale``, then be fresh.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import MaterializedView, refresh_stale


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
            sa.func.count().label("n"), sa.func.coalesce(sa.func.sum(t.c.v), 0).label("total")
        ),
        columns=[sa.Column("n", sa.BigInteger), sa.Column("total", sa.BigInteger)],
        track_changes=True,
    )
    return md, t, mv


def _statuses(engine: Engine, md: sa.MetaData) -> dict[str, str]:
    return {r.view: r.status for r in refresh_stale(engine, md)}


def _write_marks_and_refresh_fixes(
    engine: Engine, md: sa.MetaData, mv: MaterializedView, *, table: str = "src", new_id: int
) -> None:
    name = f"public.{mv.name}"
    assert _statuses(engine, md)[name] in ("refreshed", "skipped_fresh")  # settle first
    with engine.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {table} VALUES (:id, 7)"), {"id": new_id})
    assert _statuses(engine, md)[name] == "refreshed", "the write did not mark the view stale"
    with engine.connect() as conn:
        view_rows = conn.execute(sa.select(mv.c.n, mv.c.total)).one()
        source = conn.execute(sa.text(f"SELECT count(*), sum(v) FROM {table}")).one()
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
