"""Autogenerate and change tracking: enable after create, disable when no longer wanted."""

from __future__ import annotations

import sqlalchemy as sa
from matview_alembic_helpers import autogenerate, run_code

from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.alembic.ops import (
    CreateMaterializedViewOp,
    DisableChangeTrackingOp,
    EnableChangeTrackingOp,
    InstallChangeTrackingOp,
    UninstallChangeTrackingOp,
)
from sqlalchemy_matview.orchestration.tracking import (
    bookkeeping_installed,
    tracking_installed,
    view_states,
)


def models(track: bool) -> sa.MetaData:
    md = sa.MetaData()
    events = sa.Table("events", md, sa.Column("id", sa.Integer, primary_key=True))
    base = MaterializedView(
        "mv_count", md, sa.select(sa.func.count(events.c.id).label("n")), track_changes=track
    )
    MaterializedView("mv_on_mv", md, sa.select(base.c.n), track_changes=track)
    return md


def test_enable_then_disable_tracking(conn: sa.Connection) -> None:
    md = models(track=True)
    generated = autogenerate(conn, md)
    names = [type(op) for op in generated.upgrade_ops.ops]
    # The first migration that tracks a view installs the bookkeeping, just before.
    assert names[-5:] == [
        CreateMaterializedViewOp,
        InstallChangeTrackingOp,
        EnableChangeTrackingOp,
        CreateMaterializedViewOp,
        EnableChangeTrackingOp,
    ]
    assert "op.install_change_tracking()" in generated.upgrade
    assert "op.uninstall_change_tracking()" in generated.downgrade
    assert "op.enable_change_tracking('mv_count', [(None, 'events')])" in generated.upgrade
    # A view on a view is tracked through the tables underneath.
    assert "op.enable_change_tracking('mv_on_mv', [(None, 'events')])" in generated.upgrade
    run_code(conn, generated.upgrade)
    assert tracking_installed(conn) == {("public", "mv_count"), ("public", "mv_on_mv")}
    # The tracking state tables are not proposed for drop_table.
    assert autogenerate(conn, md).empty

    # The migration that stops tracking the last view removes the bookkeeping.
    untracked = autogenerate(conn, models(track=False))
    assert [type(op) for op in untracked.upgrade_ops.ops] == [
        DisableChangeTrackingOp,
        DisableChangeTrackingOp,
        UninstallChangeTrackingOp,
    ]
    run_code(conn, untracked.upgrade)
    assert not bookkeeping_installed(conn)
    run_code(conn, untracked.downgrade)
    assert tracking_installed(conn) == {("public", "mv_count"), ("public", "mv_on_mv")}

    run_code(conn, generated.downgrade)
    assert not bookkeeping_installed(conn)
    assert conn.scalar(sa.text("SELECT to_regnamespace('sqlalchemy_matview')")) is None
    assert sa.inspect(conn).get_materialized_view_names() == []


def test_dropping_a_tracked_view_disables_tracking_first(conn: sa.Connection) -> None:
    md = models(track=True)
    md.create_all(conn)
    assert tracking_installed(conn)
    generated = autogenerate(conn, sa.MetaData())
    ops = generated.upgrade_ops.ops
    assert isinstance(ops[0], DisableChangeTrackingOp)
    assert any(isinstance(op, UninstallChangeTrackingOp) for op in ops)
    run_code(conn, generated.upgrade)
    assert tracking_installed(conn) == set()


def test_a_custom_tracking_schema_is_migrated(conn: sa.Connection) -> None:
    from sqlalchemy_matview import set_tracking_schema

    md = models(track=True)
    set_tracking_schema(md, "mv admin")
    generated = autogenerate(conn, md)
    assert "op.install_change_tracking(schema='mv admin')" in generated.upgrade
    run_code(conn, generated.upgrade)
    assert tracking_installed(conn, "mv admin") == {("public", "mv_count"), ("public", "mv_on_mv")}
    assert not bookkeeping_installed(conn)  # nothing in the default schema
    assert autogenerate(conn, md).empty

    # A replace keeps the view tracked in that schema, on the tables it reads now.
    changed = sa.MetaData()
    set_tracking_schema(changed, "mv admin")
    events = sa.Table("events", changed, sa.Column("id", sa.Integer, primary_key=True))
    kinds = sa.Table("kinds", changed, sa.Column("id", sa.Integer, primary_key=True))
    joined = sa.select(sa.func.count(events.c.id).label("n")).where(
        events.c.id.in_(sa.select(kinds.c.id))
    )
    count = MaterializedView("mv_count", changed, joined, track_changes=True)
    MaterializedView("mv_on_mv", changed, sa.select(count.c.n), track_changes=True)
    conn.execute(sa.text("CREATE TABLE kinds (id int PRIMARY KEY)"))
    replaced = autogenerate(conn, changed)
    assert "tracking_schema='mv admin'" in replaced.upgrade
    run_code(conn, replaced.upgrade)
    sources = view_states(conn, "mv admin")[("public", "mv_count")].sources
    assert sources == ("public.events", "public.kinds")
    assert not bookkeeping_installed(conn)
    run_code(conn, replaced.downgrade)
    conn.execute(sa.text("DROP TABLE kinds"))

    run_code(conn, generated.downgrade)
    assert conn.scalar(sa.text("SELECT to_regnamespace('\"mv admin\"')")) is None


def test_install_change_tracking_moves_the_layout_of_0_1_0(conn: sa.Connection) -> None:
    """What 0.1.0 kept in public (tables, functions, the trigger) is moved by the op."""
    md = models(track=True)
    md.create_all(conn)
    run_code(conn, "op.uninstall_change_tracking()")
    for statement in (
        "CREATE TABLE public.sqlalchemy_matview_state (id serial PRIMARY KEY,"
        " view_schema text NOT NULL, view_name text NOT NULL, tracked boolean NOT NULL,"
        " source_oids oid[] NOT NULL, UNIQUE (view_schema, view_name))",
        "CREATE TABLE public.sqlalchemy_matview_changes (view_id integer NOT NULL,"
        " txid bigint NOT NULL, PRIMARY KEY (view_id, txid))",
        "CREATE FUNCTION public.sqlalchemy_matview_mark_stale() RETURNS trigger"
        " LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'",
        "CREATE TRIGGER sqlalchemy_matview_track AFTER INSERT ON events"
        " FOR EACH STATEMENT EXECUTE FUNCTION public.sqlalchemy_matview_mark_stale()",
        "INSERT INTO public.sqlalchemy_matview_state (view_schema, view_name, tracked,"
        " source_oids) VALUES ('public', 'mv_count', true, ARRAY['events'::regclass::oid])",
    ):
        conn.execute(sa.text(statement))
    run_code(conn, "op.install_change_tracking()")
    assert tracking_installed(conn) == {("public", "mv_count")}
    left = conn.scalar(
        sa.text(
            "SELECT (SELECT count(*) FROM pg_class WHERE relname LIKE 'sqlalchemy_matview_%'"
            "        AND relnamespace = 'public'::regnamespace)"
            " + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'sqlalchemy_matview_%')"
            " + (SELECT count(*) FROM pg_trigger WHERE tgname = 'sqlalchemy_matview_track')"
        )
    )
    assert left == 0
    # And autogenerate finishes the job: the other tracked view is tracked again.
    generated = autogenerate(conn, md)
    assert [type(op) for op in generated.upgrade_ops.ops] == [EnableChangeTrackingOp]
