"""SQLAlchemy 2.1's CreateView(materialized=True): a view, never a create_table."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from matview_alembic_helpers import autogenerate, run_code

from sqlalchemy_matview.alembic.ops import CreateMaterializedViewOp

pytestmark = pytest.mark.skipif(
    not hasattr(sa, "CreateView"), reason="SQLAlchemy 2.1+ native views"
)


def test_native_materialized_view(conn: sa.Connection) -> None:
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("x", sa.Text))
    cv = sa.CreateView(sa.select(t.c.x).distinct(), "mv_native", metadata=md, materialized=True)
    sa.Index("ix_mv_native_x", cv.table.c.x, unique=True)
    generated = autogenerate(conn, md)
    kinds = [type(op).__name__ for op in generated.upgrade_ops.ops]
    assert kinds == ["CreateTableOp", "CreateMaterializedViewOp", "CreateIndexOp"]
    assert isinstance(generated.upgrade_ops.ops[1], CreateMaterializedViewOp)
    assert "create_table('mv_native'" not in generated.upgrade
    run_code(conn, generated.upgrade)
    assert autogenerate(conn, md).empty

    # Created by create_all instead, it is just as much in sync.
    run_code(conn, generated.downgrade)
    md.create_all(conn)
    assert autogenerate(conn, md).empty
