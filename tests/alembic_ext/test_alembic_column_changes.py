"""Views changed together with the columns of the tables they read (drop, type change, add).

PostgreSQL refuses ``ALTER TABLE ... DROP COLUMN`` / ``ALTER COLUMN ... TYPE`` while a view
reads the column, so a changed view reading such a table is dropped (with its dependents)
before Alembic's table operations and created again after them.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from matview_alembic_helpers import autogenerate, offline_sql, run_code

from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.alembic.ops import (
    CreateMaterializedViewOp,
    CreatePlainViewOp,
    DropMaterializedViewOp,
    DropPlainViewOp,
)


def schema(
    *,
    legacy: bool = True,
    weight: bool = False,
    amount: Any = sa.Integer,
    total_of: str = "legacy",
    min_amount: int | None = None,
    dependents: bool = False,
    top_with_n: bool = False,
    declare_totals: bool = True,
    other: bool = True,
) -> sa.MetaData:
    """``events`` and ``mv_totals`` (per kind, the sum of ``total_of``), optionally more."""
    md = sa.MetaData()
    columns = [
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("amount", amount),
    ]
    if legacy:
        columns.append(sa.Column("legacy", sa.Integer))
    if weight:
        columns.append(sa.Column("weight", sa.Integer))
    events = sa.Table("events", md, *columns)
    # A table no view reads, whose column changes must not split anything.
    sa.Table(
        "other",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        *([sa.Column("note", sa.Text)] if other else []),
    )
    if not declare_totals:
        return md
    query = sa.select(
        events.c.kind,
        sa.func.sum(events.c[total_of]).label("total"),
        sa.func.count().label("n"),
    ).group_by(events.c.kind)
    if min_amount is not None:
        query = query.where(events.c.amount >= min_amount)
    totals = MaterializedView("mv_totals", md, query, unique_key="kind", comment="totals per kind")
    if dependents:
        # A declared materialized view on the replaced one, with an index of its own.
        top_columns = [totals.c.kind, totals.c.total]
        if top_with_n:
            top_columns.append(totals.c.n)
        top = MaterializedView(
            "mv_top",
            md,
            sa.select(*top_columns).where(totals.c.n > 5),
            unique_key="kind",
        )
        sa.Index("ix_mv_top_total", top.c.total)
        # An unmanaged one (never touched by autogenerate), created by hand in _populate.
        MaterializedView(
            "mv_copy",
            md,
            "SELECT kind, total FROM big_totals",
            columns=[sa.Column("kind", sa.Text), sa.Column("total", sa.Integer)],
            managed=False,
        )
    return md


def _populate(conn: sa.Connection, *, dependents: bool = False) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO events (id, kind, amount, legacy)"
            " SELECT g, 'k' || (g % 3), g, g * 10 FROM generate_series(1, 30) g"
        )
    )
    conn.execute(sa.text("REFRESH MATERIALIZED VIEW mv_totals"))
    if dependents:
        for statement in [
            "REFRESH MATERIALIZED VIEW mv_top",
            # A plain view on the replaced view, and an unpopulated materialized view on it.
            "CREATE VIEW big_totals WITH (security_barrier=true) AS"
            " SELECT kind, total FROM mv_totals WHERE total > 1000",
            "COMMENT ON VIEW big_totals IS 'big ones'",
            "CREATE MATERIALIZED VIEW mv_copy AS SELECT kind, total FROM big_totals WITH NO DATA",
            "CREATE INDEX mv_copy_total ON mv_copy (total DESC NULLS LAST) WHERE total > 0",
        ]:
            conn.execute(sa.text(statement))


def snapshot(conn: sa.Connection) -> dict[str, Any]:
    """Relations with their columns and types, definitions, options, indexes, comments."""
    rows = conn.execute(
        sa.text(
            """
            SELECT c.relname AS name, c.relkind::text AS kind, c.relispopulated AS populated,
                   c.reloptions AS options,
                   CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END AS def,
                   obj_description(c.oid, 'pg_class') AS comment,
                   ARRAY(SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                           FROM pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                          ORDER BY a.attnum) AS columns,
                   ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                          WHERE i.indrelid = c.oid ORDER BY 1) AS indexes
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'v', 'm') AND n.nspname = 'public'
             ORDER BY 1
            """
        )
    ).mappings()
    return {r["name"]: dict(r) for r in rows}


def _op_names(generated: Any) -> list[tuple[str, str]]:
    found = []
    for op in generated.upgrade_ops.ops:
        name = getattr(op, "name", None) or getattr(op, "table_name", None)
        found.append((type(op).__name__, name))
    return found


def _round_trip(conn: sa.Connection, v1: sa.MetaData, v2: sa.MetaData) -> Any:
    """upgrade; nothing left to autogenerate; downgrade restores v1; upgrade again."""
    before = snapshot(conn)
    generated = autogenerate(conn, v2)
    run_code(conn, generated.upgrade)
    after = snapshot(conn)
    again = autogenerate(conn, v2)
    assert again.empty, again.upgrade
    run_code(conn, generated.downgrade)
    assert snapshot(conn) == before
    assert autogenerate(conn, v1).empty
    run_code(conn, generated.upgrade)
    assert snapshot(conn) == after
    return generated


def _v1(conn: sa.Connection, **kw: Any) -> sa.MetaData:
    v1 = schema(**kw)
    v1.create_all(conn)
    _populate(conn, dependents=kw.get("dependents", False))
    return v1


def test_golden_drop_one_column_add_another(conn: sa.Connection) -> None:
    _v1(conn)
    generated = autogenerate(conn, schema(legacy=False, weight=True, total_of="weight"))
    # PostgreSQL 16 stopped qualifying column names in single-table view definitions.
    major = conn.dialect.server_version_info[0] if conn.dialect.server_version_info else 15
    old = OLD_DEFINITION_PG15 if major < 16 else OLD_DEFINITION_PG16
    assert generated.upgrade == GOLDEN_UPGRADE.replace("{old_definition}", old)
    assert generated.downgrade == GOLDEN_DOWNGRADE.replace("{old_definition}", old)
    # Offline, the same order: the view goes before the column, comes back after.
    sql = offline_sql(generated.upgrade)
    statements = [
        "DROP MATERIALIZED VIEW mv_totals;",
        "ALTER TABLE events ADD COLUMN weight INTEGER;",
        "ALTER TABLE events DROP COLUMN legacy;",
        "CREATE MATERIALIZED VIEW mv_totals AS SELECT events.kind, sum(events.weight)",
        "COMMENT ON MATERIALIZED VIEW mv_totals IS 'totals per kind';",
        "CREATE UNIQUE INDEX mv_totals_unique_key ON mv_totals (kind);",
    ]
    positions = [sql.index(s) for s in statements]
    assert positions == sorted(positions)
    down = offline_sql(generated.downgrade)
    positions = [
        down.index(s)
        for s in [
            "DROP MATERIALIZED VIEW mv_totals;",
            "ALTER TABLE events ADD COLUMN legacy INTEGER;",
            "ALTER TABLE events DROP COLUMN weight;",
            "CREATE MATERIALIZED VIEW mv_totals AS SELECT ",
            "CREATE UNIQUE INDEX mv_totals_unique_key ON mv_totals USING btree (kind);",
        ]
    ]
    assert positions == sorted(positions)


OLD_DEFINITION_PG15 = """'SELECT events.kind,\\n'
        '    sum(events.legacy) AS total,\\n'
        '    count(*) AS n\\n'
        '   FROM events\\n'
        '  GROUP BY events.kind'"""
OLD_DEFINITION_PG16 = """'SELECT kind,\\n'
        '    sum(legacy) AS total,\\n'
        '    count(*) AS n\\n'
        '   FROM events\\n'
        '  GROUP BY kind'"""
GOLDEN_UPGRADE = """op.drop_materialized_view(
    'mv_totals',
    definition=(
        {old_definition}
    ),
    comment='totals per kind',
    indexes=[
        'CREATE UNIQUE INDEX mv_totals_unique_key ON mv_totals USING btree (kind)',
    ],
)
op.add_column('events', sa.Column('weight', sa.Integer(), nullable=True))
op.drop_column('events', 'legacy')
op.create_materialized_view(
    'mv_totals',
    (
        'SELECT events.kind, sum(events.weight) AS total, count(*) AS n \\n'
        'FROM events GROUP BY events.kind'
    ),
    comment='totals per kind',
)
op.create_index('mv_totals_unique_key', 'mv_totals', ['kind'], unique=True)"""
GOLDEN_DOWNGRADE = """op.drop_index('mv_totals_unique_key', table_name='mv_totals')
op.drop_materialized_view(
    'mv_totals',
    definition=(
        'SELECT events.kind, sum(events.weight) AS total, count(*) AS n \\n'
        'FROM events GROUP BY events.kind'
    ),
    comment='totals per kind',
)
op.add_column('events', sa.Column('legacy', sa.INTEGER(), autoincrement=False, nullable=True))
op.drop_column('events', 'weight')
op.create_materialized_view(
    'mv_totals',
    (
        {old_definition}
    ),
    comment='totals per kind',
    indexes=[
        'CREATE UNIQUE INDEX mv_totals_unique_key ON mv_totals USING btree (kind)',
    ],
)"""


def test_drop_column_read_by_the_old_definition(conn: sa.Connection) -> None:
    v1 = _v1(conn)
    generated = _round_trip(conn, v1, schema(legacy=False, total_of="amount"))
    assert _op_names(generated) == [
        ("DropMaterializedViewOp", "mv_totals"),
        ("ModifyTableOps", "events"),
        ("CreateMaterializedViewOp", "mv_totals"),
        ("CreateIndexOp", "mv_totals"),
    ]
    assert conn.scalar(sa.text("SELECT total FROM mv_totals WHERE kind = 'k0'")) == 165


def test_column_type_change_read_by_the_view(conn: sa.Connection) -> None:
    v1 = _v1(conn, total_of="amount")
    v2 = schema(amount=sa.BigInteger, total_of="amount", min_amount=10)
    generated = _round_trip(conn, v1, v2)
    assert _op_names(generated) == [
        ("DropMaterializedViewOp", "mv_totals"),
        ("ModifyTableOps", "events"),
        ("CreateMaterializedViewOp", "mv_totals"),
        ("CreateIndexOp", "mv_totals"),
    ]
    assert "type_=sa.BigInteger()" in generated.upgrade
    columns = snapshot(conn)["events"]["columns"]
    assert "amount bigint" in columns
    # k0 holds amounts 3, 6, ..., 30; the new definition leaves out those below 10.
    assert conn.scalar(sa.text("SELECT total FROM mv_totals WHERE kind = 'k0'")) == 165 - 18


def test_added_column_read_by_the_new_definition(conn: sa.Connection) -> None:
    # Nothing blocks adding a column: the usual replace, after add_column, is enough (and
    # finds the dependents when the migration runs).
    v1 = _v1(conn)
    generated = _round_trip(conn, v1, schema(weight=True, total_of="weight"))
    assert _op_names(generated) == [
        ("ModifyTableOps", "events"),
        ("ReplaceMaterializedViewOp", "mv_totals"),
    ]
    assert generated.upgrade.index("op.add_column") < generated.upgrade.index("replace_")


def test_dependents_survive_drop_and_add(conn: sa.Connection) -> None:
    v1 = _v1(conn, dependents=True)
    v2 = schema(legacy=False, weight=True, total_of="weight", dependents=True)
    top_before = conn.execute(sa.text("SELECT * FROM mv_top ORDER BY 1")).all()
    generated = _round_trip(conn, v1, v2)
    assert _op_names(generated) == [
        ("DropMaterializedViewOp", "mv_top"),
        ("DropMaterializedViewOp", "mv_copy"),
        ("DropPlainViewOp", "big_totals"),
        ("DropMaterializedViewOp", "mv_totals"),
        ("ModifyTableOps", "events"),
        ("CreateMaterializedViewOp", "mv_totals"),
        ("CreateIndexOp", "mv_totals"),
        ("CreatePlainViewOp", "big_totals"),
        ("CreateMaterializedViewOp", "mv_copy"),
        ("CreateMaterializedViewOp", "mv_top"),
    ]
    state = snapshot(conn)
    assert state["big_totals"]["options"] == ["security_barrier=true"]
    assert state["big_totals"]["comment"] == "big ones"
    assert state["mv_copy"]["populated"] is False
    assert state["mv_copy"]["indexes"] == [
        "CREATE INDEX mv_copy_total ON public.mv_copy USING btree (total DESC NULLS LAST)"
        " WHERE (total > 0)"
    ]
    assert len(state["mv_top"]["indexes"]) == 2
    # Populated from the new definition: weights are all NULL so far.
    conn.execute(sa.text("UPDATE events SET weight = amount * 100"))
    conn.execute(sa.text("REFRESH MATERIALIZED VIEW mv_totals"))
    conn.execute(sa.text("REFRESH MATERIALIZED VIEW mv_top"))
    assert conn.scalar(sa.text("SELECT count(*) FROM big_totals")) == 3
    assert conn.execute(sa.text("SELECT kind FROM mv_top ORDER BY 1")).scalars().all() == [
        row[0] for row in top_before
    ]
    conn.execute(sa.text("REFRESH MATERIALIZED VIEW mv_copy"))
    assert conn.scalar(sa.text("SELECT sum(total) FROM mv_copy")) == 16500 + 14500 + 15500


def test_changed_dependent_is_detached_too(conn: sa.Connection) -> None:
    # mv_top changes as well: it is created from its new definition, not from the old one.
    v1 = _v1(conn, dependents=True)
    v2 = schema(legacy=False, weight=True, total_of="weight", dependents=True, top_with_n=True)
    generated = _round_trip(conn, v1, v2)
    names = _op_names(generated)
    assert names[:5] == [
        ("DropMaterializedViewOp", "mv_top"),
        ("DropMaterializedViewOp", "mv_copy"),
        ("DropPlainViewOp", "big_totals"),
        ("DropMaterializedViewOp", "mv_totals"),
        ("ModifyTableOps", "events"),
    ]
    assert ("CreateMaterializedViewOp", "mv_top") in names
    assert not any(op == "ReplaceMaterializedViewOp" for op, _ in names)
    assert conn.scalar(sa.text("SELECT count(n) FROM mv_top")) == 3


def test_view_dropped_with_its_source_column(conn: sa.Connection) -> None:
    v1 = _v1(conn)
    generated = _round_trip(conn, v1, schema(legacy=False, declare_totals=False))
    assert _op_names(generated) == [
        ("DropIndexOp", "mv_totals"),
        ("DropMaterializedViewOp", "mv_totals"),
        ("ModifyTableOps", "events"),
    ]


def test_column_changes_elsewhere_keep_the_single_replace(conn: sa.Connection) -> None:
    v1 = _v1(conn, dependents=True)
    v2 = schema(dependents=True, other=False, min_amount=3)
    generated = _round_trip(conn, v1, v2)
    assert _op_names(generated) == [
        ("ModifyTableOps", "other"),
        ("ReplaceMaterializedViewOp", "mv_totals"),
    ]


def test_detach_ops_render_and_reverse() -> None:
    drop = DropMaterializedViewOp(
        "mv", definition="SELECT 1 AS one", indexes=["CREATE INDEX ix ON mv USING btree (one)"]
    )
    create = drop.reverse()
    assert isinstance(create, CreateMaterializedViewOp)
    assert create.indexes == ("CREATE INDEX ix ON mv USING btree (one)",)
    assert create.reverse().indexes == create.indexes
    plain = DropPlainViewOp("v", definition="SELECT 1", comment="c", options=["check_option=local"])
    back = plain.reverse()
    assert isinstance(back, CreatePlainViewOp)
    assert (back.comment, back.options) == ("c", ("check_option=local",))
    with pytest.raises(ValueError, match="definition"):
        DropPlainViewOp("v").reverse()


def test_plain_view_ops_run_offline_and_online(conn: sa.Connection) -> None:
    code = (
        "op.create_plain_view('v', 'SELECT 1 AS one', comment=\"it's\", "
        "options=['security_barrier=true'])"
    )
    sql = offline_sql(code)
    assert "CREATE VIEW v WITH (security_barrier=true) AS SELECT 1 AS one;" in sql
    assert "COMMENT ON VIEW v IS 'it''s';" in sql
    run_code(conn, code)
    assert conn.scalar(sa.text("SELECT one FROM v")) == 1
    run_code(conn, "op.drop_plain_view('v')")
    assert conn.scalar(sa.text("SELECT to_regclass('v')")) is None


def test_unchanged_view_reading_a_retyped_column_is_rebuilt(conn: sa.Connection) -> None:
    # The definition is the same, but ALTER COLUMN ... TYPE is refused while the view reads
    # the column: the view and its dependents are dropped around it and come back as they were.
    v1 = _v1(conn, total_of="amount", dependents=True)
    v2 = schema(amount=sa.BigInteger, total_of="amount", dependents=True)
    generated = _round_trip(conn, v1, v2)
    assert _op_names(generated) == [
        ("DropMaterializedViewOp", "mv_top"),
        ("DropMaterializedViewOp", "mv_copy"),
        ("DropPlainViewOp", "big_totals"),
        ("DropMaterializedViewOp", "mv_totals"),
        ("ModifyTableOps", "events"),
        ("CreateMaterializedViewOp", "mv_totals"),
        ("CreateIndexOp", "mv_totals"),
        ("CreatePlainViewOp", "big_totals"),
        ("CreateMaterializedViewOp", "mv_copy"),
        ("CreateMaterializedViewOp", "mv_top"),
    ]
    # sum(bigint) is numeric: the view's column type followed the table's.
    assert "total numeric" in snapshot(conn)["mv_totals"]["columns"]
    assert conn.scalar(sa.text("SELECT count(*) FROM mv_top")) == 3


def test_retyped_column_the_views_do_not_read(conn: sa.Connection) -> None:
    _v1(conn, dependents=True)
    generated = autogenerate(conn, schema(amount=sa.BigInteger, dependents=True))
    assert _op_names(generated) == [("ModifyTableOps", "events")]
    run_code(conn, generated.upgrade)
    assert autogenerate(conn, schema(amount=sa.BigInteger, dependents=True)).empty
