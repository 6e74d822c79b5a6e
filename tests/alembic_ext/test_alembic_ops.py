"""Each operation: the SQL it emits (online and --sql), its reverse, and its rendering."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate.api import AutogenContext
from alembic.autogenerate.render import render_op_text
from alembic.migration import MigrationContext
from alembic.operations import Operations
from matview_alembic_helpers import offline_sql, run_code

from sqlalchemy_matview.alembic.ops import (
    CreateMaterializedViewOp,
    DisableChangeTrackingOp,
    DropMaterializedViewOp,
    EnableChangeTrackingOp,
    IrreversibleOperationError,
    RefreshMaterializedViewOp,
    ReplaceMaterializedViewOp,
    SetMaterializedViewCommentOp,
)
from sqlalchemy_matview.alembic.render import IMPORT


def render(op: object) -> tuple[str, set[str]]:
    migration_context = MigrationContext.configure(dialect_name="postgresql")
    context = AutogenContext(migration_context, opts={"alembic_module_prefix": "op."})
    return render_op_text(context, op), context.imports


def test_offline_sql_of_every_operation() -> None:
    sql = offline_sql(
        "op.create_materialized_view('Mv', \"SELECT 'a%b:c' AS x\", schema='rep', "
        'with_data=False, comment="it\'s")\n'
        "op.refresh_materialized_view('Mv', schema='rep', concurrently=True)\n"
        "op.set_materialized_view_comment('Mv', None, schema='rep')\n"
        "op.replace_materialized_view('Mv', 'SELECT 2 AS x', schema='rep', dependents=[])\n"
        "op.drop_materialized_view('Mv', schema='rep', if_exists=True, cascade=True)\n"
    )
    assert [s.strip() for s in sql.split(";") if s.strip()] == [
        "CREATE MATERIALIZED VIEW rep.\"Mv\" AS SELECT 'a%b:c' AS x WITH NO DATA",
        "COMMENT ON MATERIALIZED VIEW rep.\"Mv\" IS 'it''s'",
        'REFRESH MATERIALIZED VIEW CONCURRENTLY rep."Mv"',
        'COMMENT ON MATERIALIZED VIEW rep."Mv" IS NULL',
        'DROP MATERIALIZED VIEW rep."Mv"',
        'CREATE MATERIALIZED VIEW rep."Mv" AS SELECT 2 AS x WITH DATA',
        'DROP MATERIALIZED VIEW IF EXISTS rep."Mv" CASCADE',
    ]


def test_tracking_ops_print_calls_of_the_library_functions_offline() -> None:
    sql = offline_sql(
        "op.enable_change_tracking('mv', [(None, 'events'), ('rep', 'Odd T')])\n"
        "op.enable_change_tracking(\"it's\", [], schema='rep')\n"
        "op.disable_change_tracking('mv')\n"
        "op.uninstall_change_tracking(schema='mv admin')\n"
    )
    assert [s.strip() for s in sql.split(";") if s.strip()] == [
        "SELECT sqlalchemy_matview.track(pg_catalog.current_schema(), 'mv',"
        " ARRAY['events', 'rep.\"Odd T\"']::pg_catalog.regclass[])",
        "SELECT sqlalchemy_matview.track('rep', 'it''s', ARRAY[]::pg_catalog.regclass[])",
        "SELECT sqlalchemy_matview.untrack(pg_catalog.current_schema(), 'mv')",
        'DROP SCHEMA IF EXISTS "mv admin" CASCADE',
    ]


def test_install_change_tracking_offline_prints_the_bookkeeping() -> None:
    sql = offline_sql("op.install_change_tracking()\n")
    assert sql.startswith("CREATE SCHEMA IF NOT EXISTS sqlalchemy_matview;")
    assert "CREATE OR REPLACE FUNCTION sqlalchemy_matview.mark_stale()" in sql
    assert "REVOKE ALL ON ROUTINE sqlalchemy_matview.refresh(" in sql


def test_online_create_refresh_comment_drop(conn: sa.Connection) -> None:
    conn.execute(sa.text("CREATE TABLE t (x int)"))
    conn.execute(sa.text("INSERT INTO t VALUES (1), (2)"))
    run_code(
        conn,
        "op.create_materialized_view('mv', 'SELECT x FROM t', with_data=False,"
        " comment='c', columns=['renamed'])\n"
        "op.refresh_materialized_view('mv')\n",
    )
    assert conn.scalar(sa.text("SELECT sum(renamed) FROM mv")) == 3
    assert sa.inspect(conn).get_table_comment("mv")["text"] == "c"
    run_code(conn, "op.drop_materialized_view('mv')")
    assert sa.inspect(conn).get_materialized_view_names() == []


def test_reverse_pairs() -> None:
    create = CreateMaterializedViewOp("mv", "SELECT 1", schema="s", with_data=False, comment="c")
    drop = create.reverse()
    assert isinstance(drop, DropMaterializedViewOp)
    again = drop.reverse()
    assert (again.name, again.definition, again.schema, again.with_data, again.comment) == (
        "mv",
        "SELECT 1",
        "s",
        False,
        "c",
    )
    replace = ReplaceMaterializedViewOp("mv", "SELECT 2", old_definition="SELECT 1")
    back = replace.reverse()
    assert (back.definition, back.old_definition) == ("SELECT 1", "SELECT 2")
    comment = SetMaterializedViewCommentOp("mv", "new", existing_comment="old").reverse()
    assert (comment.comment, comment.existing_comment) == ("old", "new")
    enable = EnableChangeTrackingOp("mv", [(None, "events")])
    disable = enable.reverse()
    assert isinstance(disable, DisableChangeTrackingOp)
    assert disable.reverse().sources == ((None, "events"),)
    refresh = RefreshMaterializedViewOp("mv", concurrently=True).reverse()
    assert isinstance(refresh, RefreshMaterializedViewOp) and refresh.concurrently


@pytest.mark.parametrize(
    "op",
    [
        DropMaterializedViewOp("mv"),
        ReplaceMaterializedViewOp("mv", "SELECT 1"),
        DisableChangeTrackingOp("mv"),
    ],
)
def test_irreversible_without_state(op: object) -> None:
    with pytest.raises(IrreversibleOperationError, match="'mv'"):
        op.reverse()  # type: ignore[attr-defined]


def test_rendering() -> None:
    text, imports = render(
        CreateMaterializedViewOp("mv", "SELECT 1 AS one", schema="rep", with_data=False)
    )
    assert (
        text
        == "op.create_materialized_view('mv', 'SELECT 1 AS one', schema='rep', with_data=False)"
    )
    assert imports == {IMPORT}
    text, _ = render(
        DropMaterializedViewOp("mv", definition="SELECT a,\n  b\nFROM t", comment="it's")
    )
    assert text == (
        "op.drop_materialized_view(\n"
        "    'mv',\n"
        "    definition=(\n"
        "        'SELECT a,\\n'\n"
        "        '  b\\n'\n"
        "        'FROM t'\n"
        "    ),\n"
        '    comment="it\'s",\n'
        ")"
    )
    text, _ = render(RefreshMaterializedViewOp("mv", concurrently=True))
    assert text == "op.refresh_materialized_view('mv', concurrently=True)"
    text, _ = render(EnableChangeTrackingOp("mv", [("s", "t")], schema="s"))
    assert text == "op.enable_change_tracking('mv', [('s', 't')], schema='s')"
    text, _ = render(DisableChangeTrackingOp("mv", sources=[(None, "t")]))
    assert text == "op.disable_change_tracking('mv', sources=[(None, 't')])"


def test_rendered_sql_round_trips_exactly() -> None:
    sql = "SELECT 'a \\' \"q\"' AS x,\n   '" + "long " * 40 + "' AS y\nFROM t"
    text, _ = render(CreateMaterializedViewOp("mv", sql))
    namespace: dict[str, object] = {}

    class Recorder:
        def create_materialized_view(self, name: str, definition: str) -> None:
            namespace["definition"] = definition

    exec(text, {"op": Recorder()})
    assert namespace["definition"] == sql


def test_select_definitions_render_as_postgresql_sql() -> None:
    t = sa.table("events", sa.column("kind"), sa.column("n"))
    op = CreateMaterializedViewOp("mv", sa.select(t.c.kind).where(t.c.n > 5))
    text, _ = render(op)
    assert "'WHERE events.n > 5'" in text


def test_operations_proxy_has_every_directive() -> None:
    context = MigrationContext.configure(dialect_name="postgresql")
    op = Operations(context)
    for name in (
        "create_materialized_view",
        "drop_materialized_view",
        "replace_materialized_view",
        "refresh_materialized_view",
        "set_materialized_view_comment",
        "enable_change_tracking",
        "disable_change_tracking",
        "install_change_tracking",
        "uninstall_change_tracking",
    ):
        assert callable(getattr(op, name))
