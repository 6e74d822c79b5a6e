"""A view that stops reading a view the same migration drops.

In the database B still reads A; the declarations drop A and change B to read the table
directly. B must be dropped before A (and created from its new definition after), and the
downgrade must re-create A before B's old definition, which reads it.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from matview_alembic_helpers import autogenerate, run_code

from sqlalchemy_matview import MaterializedView


def schema(*, with_a: bool, extra_table: bool = False) -> sa.MetaData:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer),
    )
    if extra_table:
        sa.Table("notes", md, sa.Column("id", sa.Integer, primary_key=True))
    if with_a:
        a = MaterializedView(
            "mv_a",
            md,
            sa.select(events.c.kind, sa.func.sum(events.c.amount).label("total")).group_by(
                events.c.kind
            ),
            unique_key="kind",
        )
        query = sa.select(a.c.kind, a.c.total).where(a.c.total > 100)
    else:
        total = sa.func.sum(events.c.amount)
        query = (
            sa.select(events.c.kind, total.label("total"))
            .group_by(events.c.kind)
            .having(total > 100)
        )
    b = MaterializedView("mv_b", md, query, unique_key="kind", comment="big kinds")
    sa.Index("ix_mv_b_total", b.c.total)
    return md


def snapshot(conn: sa.Connection) -> dict[str, Any]:
    rows = conn.execute(
        sa.text(
            """
            SELECT c.relname, c.relkind::text, c.relispopulated,
                   CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END,
                   obj_description(c.oid, 'pg_class'),
                   ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                          WHERE i.indrelid = c.oid ORDER BY 1)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'v', 'm') AND n.nspname = 'public'
             ORDER BY 1
            """
        )
    )
    return {r[0]: tuple(r[1:]) for r in rows}


def _setup(conn: sa.Connection) -> sa.MetaData:
    v1 = schema(with_a=True)
    v1.create_all(conn)
    conn.execute(
        sa.text("INSERT INTO events SELECT g, 'k' || (g % 3), g FROM generate_series(1, 30) g")
    )
    for statement in [
        "REFRESH MATERIALIZED VIEW mv_a",
        "REFRESH MATERIALIZED VIEW mv_b",
        # A plain view on B, unknown to the declarations: it must come back too.
        "CREATE VIEW b_kinds AS SELECT kind FROM mv_b",
    ]:
        conn.execute(sa.text(statement))
    return v1


def _names(generated: Any) -> list[tuple[str, str]]:
    return [
        (type(op).__name__, getattr(op, "name", None) or getattr(op, "table_name", None))
        for op in generated.upgrade_ops.ops
    ]


def test_reader_of_a_dropped_view_is_detached_before_the_drop(conn: sa.Connection) -> None:
    v1 = _setup(conn)
    v2 = schema(with_a=False)
    before = snapshot(conn)
    generated = autogenerate(conn, v2)
    assert _names(generated) == [
        ("DropPlainViewOp", "b_kinds"),
        ("DropMaterializedViewOp", "mv_b"),
        ("DropIndexOp", "mv_a"),
        ("DropMaterializedViewOp", "mv_a"),
        ("CreateMaterializedViewOp", "mv_b"),
        ("CreateIndexOp", "mv_b"),
        ("CreateIndexOp", "mv_b"),
        ("CreatePlainViewOp", "b_kinds"),
    ]
    assert "replace_materialized_view" not in generated.upgrade

    run_code(conn, generated.upgrade)
    after = snapshot(conn)
    assert "mv_a" not in after
    assert after["mv_b"][3] == "big kinds"
    assert len(after["mv_b"][4]) == 2
    assert conn.execute(sa.text("SELECT kind FROM b_kinds ORDER BY 1")).scalars().all() == [
        "k0",
        "k1",
        "k2",
    ]
    assert autogenerate(conn, v2).empty

    run_code(conn, generated.downgrade)
    assert snapshot(conn) == before
    assert autogenerate(conn, v1).empty
    assert conn.scalar(sa.text("SELECT count(*) FROM b_kinds")) == 3

    run_code(conn, generated.upgrade)
    assert snapshot(conn) == after


def test_with_table_changes_in_the_same_migration(conn: sa.Connection) -> None:
    # A table created in the same migration: B's new definition is still created last.
    v1 = _setup(conn)
    v2 = schema(with_a=False, extra_table=True)
    before = snapshot(conn)
    generated = autogenerate(conn, v2)
    names = _names(generated)
    assert names.index(("DropMaterializedViewOp", "mv_b")) < names.index(
        ("DropMaterializedViewOp", "mv_a")
    )
    assert names.index(("CreateTableOp", "notes")) < names.index(
        ("CreateMaterializedViewOp", "mv_b")
    )
    run_code(conn, generated.upgrade)
    assert autogenerate(conn, v2).empty
    run_code(conn, generated.downgrade)
    assert snapshot(conn) == before
    assert autogenerate(conn, v1).empty


def test_unrelated_drop_keeps_the_plain_replace(conn: sa.Connection) -> None:
    # B changes but does not read the dropped view: a single replace, no detach.
    _setup(conn)
    conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_old AS SELECT 1 AS one"))
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount", sa.Integer),
    )
    a = MaterializedView(
        "mv_a",
        md,
        sa.select(events.c.kind, sa.func.sum(events.c.amount).label("total")).group_by(
            events.c.kind
        ),
        unique_key="kind",
    )
    nb = MaterializedView(
        "mv_b",
        md,
        sa.select(a.c.kind, a.c.total).where(a.c.total > 150),
        unique_key="kind",
        comment="big kinds",
    )
    sa.Index("ix_mv_b_total", nb.c.total)
    generated = autogenerate(conn, md)
    assert _names(generated) == [
        ("DropMaterializedViewOp", "mv_old"),
        ("ReplaceMaterializedViewOp", "mv_b"),
    ]
    run_code(conn, generated.upgrade)
    assert autogenerate(conn, md).empty
