"""Autogenerate: golden output, ordering, filters, replace vs index-only changes, round trips."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.operations import ops
from matview_alembic_helpers import autogenerate, run_code

from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.alembic.ops import (
    DropMaterializedViewOp,
    ReplaceMaterializedViewOp,
    SetMaterializedViewCommentOp,
)


def schema_v1(
    kind_filter: str | None = None, comment: str | None = None
) -> tuple[sa.MetaData, sa.Table]:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
    )
    query = sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind)
    if kind_filter is not None:
        query = query.where(events.c.kind != kind_filter)
    totals = MaterializedView("mv_totals", md, query, unique_key="kind", comment=comment)
    MaterializedView("mv_big", md, sa.select(totals.c.kind).where(totals.c.n > 10))
    return md, events


def snapshot(conn: sa.Connection) -> dict[str, Any]:
    """Everything a migration may change: relations, view definitions, indexes, comments."""
    rows = conn.execute(
        sa.text(
            """
            SELECT n.nspname || '.' || c.relname AS name, c.relkind::text AS kind,
                   CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END AS def,
                   obj_description(c.oid, 'pg_class') AS comment,
                   ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                          WHERE i.indrelid = c.oid ORDER BY 1) AS indexes
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'v', 'm')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
             ORDER BY 1
            """
        )
    ).mappings()
    return {r["name"]: dict(r) for r in rows}


def test_golden_new_table_and_views(conn: sa.Connection) -> None:
    md, _ = schema_v1()
    generated = autogenerate(conn, md)
    assert generated.upgrade.endswith(
        """op.create_materialized_view(
    'mv_totals',
    (
        'SELECT events.kind, count(*) AS n \\n'
        'FROM events GROUP BY events.kind'
    ),
)
op.create_index('mv_totals_unique_key', 'mv_totals', ['kind'], unique=True)
op.create_materialized_view(
    'mv_big',
    (
        'SELECT mv_totals.kind \\n'
        'FROM mv_totals \\n'
        'WHERE mv_totals.n > 10'
    ),
)"""
    )
    assert generated.upgrade.startswith("op.create_table('events',")
    assert "create_table('mv_" not in generated.upgrade
    assert (
        generated.downgrade
        == """op.drop_materialized_view(
    'mv_big',
    definition=(
        'SELECT mv_totals.kind \\n'
        'FROM mv_totals \\n'
        'WHERE mv_totals.n > 10'
    ),
)
op.drop_index('mv_totals_unique_key', table_name='mv_totals')
op.drop_materialized_view(
    'mv_totals',
    definition=(
        'SELECT events.kind, count(*) AS n \\n'
        'FROM events GROUP BY events.kind'
    ),
)
op.drop_table('events')"""
    )


def test_round_trip(conn: sa.Connection) -> None:
    md, events = schema_v1()
    events.create(conn)
    conn.execute(events.insert(), [{"kind": "a"}, {"kind": "b"}])
    before = snapshot(conn)

    generated = autogenerate(conn, md)
    run_code(conn, generated.upgrade)
    after = snapshot(conn)
    assert "public.mv_totals" in after and "public.mv_big" in after
    assert autogenerate(conn, md).empty

    run_code(conn, generated.downgrade)
    assert snapshot(conn) == before

    run_code(conn, generated.upgrade)
    assert snapshot(conn) == after
    assert conn.scalar(sa.text("SELECT count(*) FROM mv_totals")) == 2


def test_definition_change_is_a_replace_and_reverses(conn: sa.Connection) -> None:
    md, _ = schema_v1()
    md.create_all(conn)
    v1 = snapshot(conn)
    md2, _ = schema_v1(kind_filter="it's")
    generated = autogenerate(conn, md2)
    assert [type(op) for op in generated.upgrade_ops.ops] == [ReplaceMaterializedViewOp]
    assert "WHERE events.kind != 'it''s' GROUP BY events.kind" in generated.upgrade
    assert "old_definition=" in generated.upgrade
    run_code(conn, generated.upgrade)
    assert autogenerate(conn, md2).empty
    # mv_big (a dependent) and the unique index survived the replace.
    after = snapshot(conn)
    assert after["public.mv_big"]["kind"] == "m"
    assert after["public.mv_totals"]["indexes"] == v1["public.mv_totals"]["indexes"]
    run_code(conn, generated.downgrade)
    assert snapshot(conn) == v1


def test_index_only_change_does_not_rebuild(conn: sa.Connection) -> None:
    md, _ = schema_v1()
    md.create_all(conn)
    md2, _ = schema_v1()
    big = md2.tables["mv_big"]
    sa.Index("ix_mv_big_kind", big.c.kind)
    del md2  # the MetaData lives on through the Table
    generated = autogenerate(conn, big.metadata)
    assert [type(op) for op in generated.upgrade_ops.ops] == [ops.CreateIndexOp]
    assert (
        generated.upgrade == "op.create_index('ix_mv_big_kind', 'mv_big', ['kind'], unique=False)"
    )
    run_code(conn, generated.upgrade)
    assert autogenerate(conn, big.metadata).empty
    # Removing the declared index drops it, and the downgrade puts it back.
    md3, _ = schema_v1()
    removal = autogenerate(conn, md3)
    assert removal.upgrade == "op.drop_index('ix_mv_big_kind', table_name='mv_big')"
    assert (
        "op.create_index('ix_mv_big_kind', 'mv_big', ['kind'], unique=False)" in removal.downgrade
    )


def test_obsolete_views_dropped_before_their_sources(conn: sa.Connection) -> None:
    md, _ = schema_v1()
    md.create_all(conn)
    generated = autogenerate(conn, sa.MetaData())
    kinds = [
        (type(op).__name__, getattr(op, "name", None) or getattr(op, "table_name", None))
        for op in generated.upgrade_ops.ops
    ]
    assert kinds == [
        ("DropMaterializedViewOp", "mv_big"),
        ("DropIndexOp", "mv_totals"),
        ("DropMaterializedViewOp", "mv_totals"),
        ("DropTableOp", "events"),
    ]
    drop = generated.upgrade_ops.ops[0]
    assert isinstance(drop, DropMaterializedViewOp)
    assert drop.definition is not None and "mv_totals" in str(drop.definition)
    before = snapshot(conn)
    run_code(conn, generated.upgrade)
    assert snapshot(conn) == {}
    run_code(conn, generated.downgrade)
    assert snapshot(conn) == before


def test_include_object_unmanaged_and_comments(conn: sa.Connection) -> None:
    md, _ = schema_v1()
    md.create_all(conn)
    conn.execute(sa.text("CREATE MATERIALIZED VIEW legacy AS SELECT 1 AS one"))
    conn.execute(sa.text("CREATE MATERIALIZED VIEW ignored_mv AS SELECT 2 AS two"))

    md2, _ = schema_v1(comment="per kind")
    MaterializedView(
        "legacy", md2, "SELECT 1 AS one", columns=[sa.Column("one", sa.Integer)], managed=False
    )

    def include_object(obj: Any, name: str, type_: str, reflected: bool, compare_to: Any) -> bool:
        return not (type_ == "materialized_view" and name == "ignored_mv")

    generated = autogenerate(conn, md2, include_object=include_object)
    assert [type(op) for op in generated.upgrade_ops.ops] == [SetMaterializedViewCommentOp]
    assert generated.upgrade == "op.set_materialized_view_comment('mv_totals', 'per kind')"
    assert (
        generated.downgrade
        == "op.set_materialized_view_comment('mv_totals', None, existing_comment='per kind')"
    )

    def include_name(name: str, type_: str, parent_names: Any) -> bool:
        return name != "ignored_mv"

    without = autogenerate(conn, md, include_name=include_name)
    assert [(type(op), op.name) for op in without.upgrade_ops.ops] == [
        (DropMaterializedViewOp, "legacy")
    ]
