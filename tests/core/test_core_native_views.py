"""Interoperating with SQLAlchemy 2.1's own ``CreateView(..., materialized=True)``."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import ConcurrentRefreshError, MaterializedView, refresh

CreateView = getattr(sa, "CreateView", None)
pytestmark = pytest.mark.skipif(CreateView is None, reason="SQLAlchemy 2.1+ only")


def test_native_materialized_view_refresh_and_views_on_top(engine: Engine) -> None:
    assert CreateView is not None
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("id", sa.Integer), sa.Column("n", sa.Integer))
    native = CreateView(sa.select(src.c.id, src.c.n), "native_mv", metadata=md, materialized=True)
    ours = MaterializedView(
        "mv_on_native",
        md,
        sa.select(native.table.c.id, (native.table.c.n * 10).label("total")),
        unique_key="id",
    )
    md.create_all(engine)
    with pytest.raises(ConcurrentRefreshError, match="native_mv"):
        refresh(native.table)  # no unique index declared on the native view
    sa.Index("native_mv_id", native.table.c.id, unique=True).create(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"id": 1, "n": 2}, {"id": 2, "n": 1}])
        conn.execute(refresh(native.table))  # concurrently, now that the unique index exists
        conn.execute(refresh(ours))
        rows = conn.execute(sa.select(ours.table).order_by(ours.c.id)).all()
    assert [tuple(r) for r in rows] == [(1, 20), (2, 10)]
    md.drop_all(engine)
