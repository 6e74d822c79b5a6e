"""Every form of index on a view: no diff once created, an exact downgrade, golden migrations."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import render_python_code
from alembic.operations import ops
from matview_alembic_helpers import autogenerate, run_code
from matview_corpus import INDEX_FORMS, forms_query, index_forms
from sqlalchemy.dialects import postgresql as pg

from sqlalchemy_matview import MaterializedView


def _expression_wrapper() -> str:
    """How this Alembic writes an index expression: ``sa.text`` or ``sa.literal_column``."""
    table = sa.Table("t", sa.MetaData(), sa.Column("a", sa.Integer))
    index = sa.Index("i", sa.literal_column("a DESC"), _table=table)
    code = render_python_code(ops.UpgradeOps([ops.CreateIndexOp.from_index(index)]))
    return "sa.literal_column" if "literal_column" in code else "sa.text"


E = _expression_wrapper()


def models(forms: bool = True, changed: bool = False) -> sa.MetaData:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer),
        sa.Column("kind", sa.Text),
        sa.Column("amount", sa.Numeric(12, 2)),
        sa.Column("tags", pg.ARRAY(sa.Text)),
        sa.Column("payload", pg.JSONB),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )
    view = MaterializedView("mv_forms", md, forms_query(events), unique_key="id")
    if forms:
        index_forms(view, CHANGED if changed else None)
    return md


#: Each form changed in one respect: autogenerate must drop and re-create exactly these.
CHANGED: dict[str, Any] = {
    "desc": lambda c: ([c.amount.asc()], {}),
    "nulls_first": lambda c: ([c.amount.nulls_last()], {}),
    "ops": lambda c: ([c.kind], {"postgresql_ops": {"kind": "varchar_pattern_ops"}}),
    "collate": lambda c: ([c.kind.collate("POSIX")], {}),
    "hash": lambda c: ([c.kind], {"postgresql_using": "btree"}),
    "brin": lambda c: (
        [c.created_at],
        {"postgresql_using": "brin", "postgresql_with": {"pages_per_range": 32}},
    ),
    "partial": lambda c: ([c.kind], {"postgresql_where": c.amount > 1}),
    "include": lambda c: ([c.amount], {"postgresql_include": ["created_at"]}),
    "fillfactor": lambda c: ([c.kind], {"postgresql_with": {"fillfactor": 80}}),
    "expression": lambda c: ([sa.func.upper(c.kind)], {}),
    "mixed": lambda c: ([c.kind, sa.func.lower(c.kind), c.amount.desc().nulls_last()], {}),
    "unique": lambda c: ([c.kind, c.id], {"unique": False}),
}


def indexdefs(conn: sa.Connection) -> dict[str, str]:
    rows = conn.execute(
        sa.text(
            "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = 'mv_forms'::regclass"
        )
    )
    return {str(name): str(definition) for name, definition in rows}


GOLDEN_UPGRADE = f"""\
op.create_index('mv_forms_arithmetic', 'mv_forms', [{E}('(amount * 2)')], unique=False)
op.create_index('mv_forms_brin', 'mv_forms', ['created_at'], unique=False, postgresql_using='brin', postgresql_with={{'pages_per_range': 16}})
op.create_index('mv_forms_collate', 'mv_forms', [{E}('(kind COLLATE "C")')], unique=False)
op.create_index('mv_forms_desc', 'mv_forms', [{E}('amount DESC')], unique=False)
op.create_index('mv_forms_desc_nulls_last', 'mv_forms', [{E}('amount DESC NULLS LAST')], unique=False)
op.create_index('mv_forms_expression', 'mv_forms', [{E}('lower(kind)')], unique=False)
op.create_index('mv_forms_fillfactor', 'mv_forms', ['kind'], unique=False, postgresql_with={{'fillfactor': 70}})
op.create_index('mv_forms_gin', 'mv_forms', ['tags'], unique=False, postgresql_using='gin')
op.create_index('mv_forms_gin_ops', 'mv_forms', ['payload'], unique=False, postgresql_using='gin', postgresql_ops={{'payload': 'jsonb_path_ops'}})
op.create_index('mv_forms_gist', 'mv_forms', ['span'], unique=False, postgresql_using='gist')
op.create_index('mv_forms_hash', 'mv_forms', ['kind'], unique=False, postgresql_using='hash')
op.create_index('mv_forms_include', 'mv_forms', ['amount'], unique=False, postgresql_include=['kind'])
op.create_index('mv_forms_include_column', 'mv_forms', ['created_at'], unique=False, postgresql_include=['kind', 'amount'])
op.create_index('mv_forms_mixed', 'mv_forms', ['kind', {E}('lower(kind) DESC'), {E}('amount DESC NULLS LAST'), 'created_at'], unique=False, postgresql_ops={{'kind': 'text_pattern_ops'}})
op.create_index('mv_forms_nulls_first', 'mv_forms', [{E}('amount NULLS FIRST')], unique=False)
op.create_index('mv_forms_ops', 'mv_forms', ['kind'], unique=False, postgresql_ops={{'kind': 'text_pattern_ops'}})
op.create_index('mv_forms_partial', 'mv_forms', ['kind'], unique=False, postgresql_where=sa.text('amount > 0'))
op.create_index('mv_forms_unique', 'mv_forms', ['kind', 'id'], unique=True)
op.create_index('mv_forms_unique_key', 'mv_forms', ['id'], unique=True)
op.create_index('mv_forms_unique_partial', 'mv_forms', ['kind'], unique=True, postgresql_where=sa.text("amount > 10 AND kind != 'it''s'"))"""  # noqa: E501

# What PostgreSQL prints, written back: the downgrade of dropping every form.
GOLDEN_DOWNGRADE = f"""\
op.create_index('mv_forms_unique_partial', 'mv_forms', ['kind'], unique=True, postgresql_where=sa.text("((amount > (10)::numeric) AND (kind <> 'it''s'::text))"))
op.create_index('mv_forms_unique', 'mv_forms', ['kind', 'id'], unique=True)
op.create_index('mv_forms_partial', 'mv_forms', ['kind'], unique=False, postgresql_where=sa.text('(amount > (0)::numeric)'))
op.create_index('mv_forms_ops', 'mv_forms', [{E}('kind text_pattern_ops')], unique=False)
op.create_index('mv_forms_nulls_first', 'mv_forms', [{E}('amount NULLS FIRST')], unique=False)
op.create_index('mv_forms_mixed', 'mv_forms', [{E}('kind text_pattern_ops'), {E}('lower(kind) DESC'), {E}('amount DESC NULLS LAST'), 'created_at'], unique=False)
op.create_index('mv_forms_include_column', 'mv_forms', ['created_at'], unique=False, postgresql_include=['kind', 'amount'])
op.create_index('mv_forms_include', 'mv_forms', ['amount'], unique=False, postgresql_include=['kind'])
op.create_index('mv_forms_hash', 'mv_forms', ['kind'], unique=False, postgresql_using='hash')
op.create_index('mv_forms_gist', 'mv_forms', ['span'], unique=False, postgresql_using='gist')
op.create_index('mv_forms_gin_ops', 'mv_forms', [{E}('payload jsonb_path_ops')], unique=False, postgresql_using='gin')
op.create_index('mv_forms_gin', 'mv_forms', ['tags'], unique=False, postgresql_using='gin')
op.create_index('mv_forms_fillfactor', 'mv_forms', ['kind'], unique=False, postgresql_with={{'fillfactor': '70'}})
op.create_index('mv_forms_expression', 'mv_forms', [{E}('lower(kind)')], unique=False)
op.create_index('mv_forms_desc_nulls_last', 'mv_forms', [{E}('amount DESC NULLS LAST')], unique=False)
op.create_index('mv_forms_desc', 'mv_forms', [{E}('amount DESC')], unique=False)
op.create_index('mv_forms_collate', 'mv_forms', [{E}('kind COLLATE "C"')], unique=False)
op.create_index('mv_forms_brin', 'mv_forms', ['created_at'], unique=False, postgresql_using='brin', postgresql_with={{'pages_per_range': '16'}})
op.create_index('mv_forms_arithmetic', 'mv_forms', [{E}('((amount * (2)::numeric))')], unique=False)"""  # noqa: E501


def test_golden_upgrade_then_nothing_to_do(conn: sa.Connection) -> None:
    generated = autogenerate(conn, models())
    created = "\n".join(
        line for line in generated.upgrade.splitlines() if line.startswith("op.create_index(")
    )
    assert created == GOLDEN_UPGRADE
    run_code(conn, generated.upgrade)
    again = autogenerate(conn, models())
    assert again.diffs() == []
    run_code(conn, generated.downgrade)
    assert sa.inspect(conn).get_materialized_view_names() == []


def test_create_all_then_nothing_to_do(conn: sa.Connection) -> None:
    md = models()
    md.create_all(conn)
    assert len(indexdefs(conn)) == len(INDEX_FORMS) + 1
    assert autogenerate(conn, md).diffs() == []


def test_dropped_forms_come_back_exactly(conn: sa.Connection) -> None:
    models().create_all(conn)
    before = indexdefs(conn)
    removal = autogenerate(conn, models(forms=False))
    assert all(isinstance(op, ops.DropIndexOp) for op in removal.upgrade_ops.ops)
    assert len(removal.upgrade_ops.ops) == len(before) - 1  # the unique_key index stays
    assert removal.downgrade == GOLDEN_DOWNGRADE
    run_code(conn, removal.upgrade)
    assert list(indexdefs(conn)) == ["mv_forms_unique_key"]
    run_code(conn, removal.downgrade)
    assert indexdefs(conn) == before
    assert autogenerate(conn, models()).diffs() == []


def test_each_change_is_a_drop_and_create(conn: sa.Connection) -> None:
    models().create_all(conn)
    generated = autogenerate(conn, models(changed=True))
    dropped = [op.index_name for op in generated.upgrade_ops.ops if isinstance(op, ops.DropIndexOp)]
    created = [
        op.index_name for op in generated.upgrade_ops.ops if isinstance(op, ops.CreateIndexOp)
    ]
    expected = sorted(f"mv_forms_{name}" for name in CHANGED)
    assert sorted(dropped) == expected
    assert sorted(created) == expected
    before = indexdefs(conn)
    run_code(conn, generated.upgrade)
    assert autogenerate(conn, models(changed=True)).diffs() == []
    run_code(conn, generated.downgrade)
    assert indexdefs(conn) == before


def _partial_models(extra: bool, threshold: int) -> sa.MetaData:
    md = sa.MetaData()
    columns = [sa.Column("id", sa.Integer, primary_key=True), sa.Column("kind", sa.Text)]
    if extra:
        columns.append(sa.Column("extra", sa.Integer))
    events = sa.Table("events", md, *columns)
    selected = [events.c.kind, sa.func.count().label("n")]
    if extra:
        selected.append(sa.func.max(events.c.extra).label("top"))
    view = MaterializedView("mv_kinds", md, sa.select(*selected).group_by(events.c.kind))
    sa.Index("mv_kinds_some", view.c.kind, postgresql_where=view.c.n > threshold)
    return md


def test_indexes_compare_when_the_definition_cannot_be_probed(conn: sa.Connection) -> None:
    # The new definition reads a column the same migration adds, so it cannot be created in
    # the probe; its partial index is then compared on the existing view's columns.
    _partial_models(extra=False, threshold=0).create_all(conn)
    same = autogenerate(conn, _partial_models(extra=True, threshold=0))
    kinds = [type(op).__name__ for op in same.upgrade_ops.ops]
    assert kinds == ["ModifyTableOps", "ReplaceMaterializedViewOp"]
    changed = autogenerate(conn, _partial_models(extra=True, threshold=5))
    kinds = [type(op).__name__ for op in changed.upgrade_ops.ops]
    assert kinds == ["ModifyTableOps", "DropIndexOp", "ReplaceMaterializedViewOp", "CreateIndexOp"]
    run_code(conn, changed.upgrade)
    assert autogenerate(conn, _partial_models(extra=True, threshold=5)).diffs() == []
