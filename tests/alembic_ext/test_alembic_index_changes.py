"""An index keeping its name but changing its definition is dropped and created again.

Every case is a full autogenerate round trip in both directions: the database holds one
declaration of ``ix_mv_stats``, the metadata another; autogenerate must give exactly a
``drop_index`` and a ``create_index`` of that name, the upgrade must leave the catalog with
the declared definition, autogenerate must then find nothing, and the downgrade must put the
old index back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.operations import ops
from matview_alembic_helpers import autogenerate, run_code

from sqlalchemy_matview import MaterializedView

IndexFactory = Callable[[sa.Table], sa.Index]


def declare(index: IndexFactory | None) -> sa.MetaData:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer, nullable=False),
    )
    view = MaterializedView(
        "mv_stats",
        md,
        sa.select(
            events.c.kind,
            sa.func.count().label("n"),
            sa.func.sum(events.c.amount).label("total"),
        ).group_by(events.c.kind),
    )
    if index is not None:
        index(view.table)
    return md


def _ix(*elements: Callable[[sa.Table], Any], **kw: Any) -> IndexFactory:
    def make(t: sa.Table) -> sa.Index:
        return sa.Index("ix_mv_stats", *(e(t) for e in elements), **kw)

    return make


def kind(t: sa.Table) -> Any:
    return t.c.kind


def n(t: sa.Table) -> Any:
    return t.c.n


def total(t: sa.Table) -> Any:
    return t.c.total


PLAIN = _ix(kind)

# (id, before, after, what the catalog's definition of the new index must contain)
CASES: list[Any] = [
    pytest.param(PLAIN, _ix(kind, unique=True), "CREATE UNIQUE INDEX", id="unique-added"),
    pytest.param(_ix(kind, unique=True), PLAIN, "CREATE INDEX", id="unique-removed"),
    pytest.param(PLAIN, _ix(n), "(n)", id="column-replaced"),
    pytest.param(PLAIN, _ix(kind, n), "(kind, n)", id="column-added"),
    pytest.param(_ix(kind, n), _ix(n, kind), "(n, kind)", id="columns-reordered"),
    pytest.param(PLAIN, _ix(kind, postgresql_using="hash"), "USING hash", id="method-hash"),
    pytest.param(
        _ix(kind, postgresql_using="hash"),
        PLAIN,
        "USING btree",
        id="method-back-to-default",
    ),
    pytest.param(
        PLAIN,
        _ix(kind, postgresql_where=sa.text("n > 1")),
        "WHERE (n > 1)",
        id="where-added",
    ),
    pytest.param(
        _ix(kind, postgresql_where=sa.text("n > 1")),
        _ix(kind, postgresql_where=sa.text("n > 5")),
        "WHERE (n > 5)",
        id="where-changed",
    ),
    pytest.param(
        PLAIN,
        _ix(kind, postgresql_include=["total"]),
        "INCLUDE (total)",
        id="include-added",
    ),
    pytest.param(
        PLAIN,
        _ix(lambda t: t.c.kind.desc()),
        "(kind DESC)",
        id="ordering-desc",
    ),
]


def _indexdef(conn: sa.Connection) -> str | None:
    return conn.scalar(
        sa.text(
            "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'ix_mv_stats'"
        )
    )


def _index_ops(generated: Any) -> list[tuple[str, str]]:
    return [
        (type(op).__name__, op.index_name)
        for op in generated.upgrade_ops.ops
        if isinstance(op, (ops.CreateIndexOp, ops.DropIndexOp))
    ]


@pytest.mark.parametrize(("before", "after", "expected"), CASES)
def test_changed_index_is_dropped_and_created(
    conn: sa.Connection, before: IndexFactory, after: IndexFactory, expected: str
) -> None:
    old = declare(before)
    old.create_all(conn)
    conn.execute(sa.text("INSERT INTO events (kind, amount) VALUES ('a', 1), ('b', 2)"))
    conn.execute(sa.text("REFRESH MATERIALIZED VIEW mv_stats"))
    old_definition = _indexdef(conn)
    assert autogenerate(conn, old).empty  # the starting point itself is no change

    new = declare(after)
    generated = autogenerate(conn, new)
    # Nothing else: the view itself is not rebuilt for an index change.
    assert [type(op) for op in generated.upgrade_ops.ops] == [ops.DropIndexOp, ops.CreateIndexOp]
    assert _index_ops(generated) == [
        ("DropIndexOp", "ix_mv_stats"),
        ("CreateIndexOp", "ix_mv_stats"),
    ]
    run_code(conn, generated.upgrade)
    new_definition = _indexdef(conn)
    assert new_definition is not None and expected in new_definition
    assert new_definition != old_definition
    assert autogenerate(conn, new).empty, "the upgraded index still differs from its declaration"

    run_code(conn, generated.downgrade)
    assert _indexdef(conn) == old_definition
    assert autogenerate(conn, old).empty


def test_unchanged_indexes_are_left_alone(conn: sa.Connection) -> None:
    """Every declaration above, created and compared with itself: no operation at all."""
    factories = {id(p.values[0]): p.values[0] for p in CASES if not p.marks}
    factories.update({id(p.values[1]): p.values[1] for p in CASES if not p.marks})
    for factory in factories.values():
        md = declare(factory)
        md.create_all(conn)
        assert autogenerate(conn, md).empty, _indexdef(conn)
        md.drop_all(conn)


def test_added_and_removed_index(conn: sa.Connection) -> None:
    bare = declare(None)
    bare.create_all(conn)
    indexed = declare(_ix(kind, unique=True))
    added = autogenerate(conn, indexed)
    assert _index_ops(added) == [("CreateIndexOp", "ix_mv_stats")]
    run_code(conn, added.upgrade)
    assert (
        _indexdef(conn) == "CREATE UNIQUE INDEX ix_mv_stats ON public.mv_stats USING btree (kind)"
    )
    removed = autogenerate(conn, bare)
    assert _index_ops(removed) == [("DropIndexOp", "ix_mv_stats")]
    run_code(conn, removed.upgrade)
    assert _indexdef(conn) is None
    run_code(conn, removed.downgrade)
    assert (
        _indexdef(conn) == "CREATE UNIQUE INDEX ix_mv_stats ON public.mv_stats USING btree (kind)"
    )
