"""The DDL constructs run through Alembic's ``op.execute``, online and in ``--sql`` mode."""

from __future__ import annotations

import io

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import (
    CreateMaterializedView,
    DropMaterializedView,
    MaterializedView,
    refresh,
)

alembic = pytest.importorskip("alembic")
from alembic.migration import MigrationContext  # noqa: E402
from alembic.operations import Operations  # noqa: E402


def declared() -> MaterializedView:
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer))
    return MaterializedView("mv_op", md, sa.select(src.c.id), unique_key="id")


def test_op_execute_online(engine: Engine) -> None:
    mv = declared()
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE src (id int); INSERT INTO src VALUES (1), (2)"))
        op = Operations(MigrationContext.configure(conn))
        op.execute(CreateMaterializedView(mv))
        op.create_index("mv_op_unique_key", "mv_op", ["id"], unique=True)
        op.execute(refresh(mv))
        assert conn.scalar(sa.select(sa.func.count()).select_from(mv.table)) == 2
        op.execute(DropMaterializedView(mv))


def test_op_execute_offline_prints_sql() -> None:
    mv = declared()
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer}
    )
    op = Operations(context)
    op.execute(CreateMaterializedView(mv, if_not_exists=True))
    op.execute(refresh(mv))
    op.execute(DropMaterializedView(mv, cascade=True))
    out = buffer.getvalue()
    assert "CREATE MATERIALIZED VIEW IF NOT EXISTS mv_op (id) AS SELECT src.id" in out
    assert "REFRESH MATERIALIZED VIEW CONCURRENTLY mv_op;" in out
    assert "DROP MATERIALIZED VIEW mv_op CASCADE;" in out
