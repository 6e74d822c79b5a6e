"""Change tracking: triggers, state table, refresh_stale, no lost changes, drop_all."""

from __future__ import annotations

import sqlalchemy as sa

from sqlalchemy_matview import MaterializedView, refresh_stale, refresh_views
from sqlalchemy_matview.bookkeeping import (
    TRIGGER_NAMES,
    TRIGGER_ROW,
    TRIGGER_STATEMENT,
    TRIGGER_TRUNCATE,
)
from sqlalchemy_matview.orchestration import tracking

from .conftest import Shop, build_shop, rows


def _statuses(results):
    return {r.view: r.status for r in results}


def _trigger_count(conn) -> int:
    return conn.scalar(
        sa.text("SELECT count(*) FROM pg_trigger WHERE tgname = ANY(:n) AND tgparentid = 0"),
        {"n": list(TRIGGER_NAMES)},
    )


def test_create_all_installs_statement_triggers_and_a_replica_twin(engine, shop: Shop):
    with engine.connect() as conn:
        assert tracking.tracking_installed(conn) == {("public", "mv_totals")}
        trig = conn.execute(
            sa.text(
                "SELECT tgname, tgtype, tgenabled, tgrelid::regclass::text FROM pg_trigger"
                " WHERE tgname = ANY(:n) ORDER BY tgname"
            ),
            {"n": list(TRIGGER_NAMES)},
        ).all()
    by_name = {t.tgname: t for t in trig}
    assert sorted(by_name) == sorted([TRIGGER_ROW, TRIGGER_STATEMENT, TRIGGER_TRUNCATE])
    assert {t[3] for t in trig} == {"orders"}
    insert, delete, update, truncate, row = 4, 8, 16, 32, 1
    statement = by_name[TRIGGER_STATEMENT]
    assert statement.tgtype & row == 0 and statement.tgenabled == "O"
    assert statement.tgtype & (insert | delete | update | truncate) == insert | delete | update
    twin = by_name[TRIGGER_ROW]  # fires only for logical replication's apply
    assert twin.tgtype & row and twin.tgenabled == "R"
    assert by_name[TRIGGER_TRUNCATE].tgtype & (truncate | row) == truncate
    assert by_name[TRIGGER_TRUNCATE].tgenabled == "A"


def test_writes_mark_stale_and_refresh_stale_clears(engine, shop: Shop):
    # Nothing changed since create_all (WITH DATA): all fresh, nothing refreshed.
    assert _statuses(refresh_stale(engine, shop.metadata)) == {
        "public.mv_totals": "skipped_fresh",
        "public.mv_top": "skipped_fresh",
    }
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 200}])
        conn.execute(shop.orders.insert(), [{"customer": 2, "amount": 20}])
    with engine.connect() as conn:
        state = tracking.view_states(conn)[("public", "mv_totals")]
    assert state.stale and state.tracked and state.pending_changes == 1  # one transaction
    assert state.stale_since is not None and state.sources == ("public.orders",)
    results = refresh_stale(engine, shop.metadata)
    # mv_top is not tracked itself, but refreshing mv_totals marked it stale.
    assert _statuses(results) == {"public.mv_totals": "refreshed", "public.mv_top": "refreshed"}
    assert rows(engine, shop.mv_top) == [(1, 200)]
    with engine.connect() as conn:
        states = tracking.view_states(conn)
    assert not states[("public", "mv_totals")].stale
    assert not states[("public", "mv_top")].stale
    totals = states[("public", "mv_totals")]
    assert totals.refresh_count == 1 and totals.last_refreshed_at is not None
    assert totals.last_duration is not None and totals.last_concurrently is True
    assert _statuses(refresh_stale(engine, shop.metadata)) == {
        "public.mv_totals": "skipped_fresh",
        "public.mv_top": "skipped_fresh",
    }


def test_update_delete_truncate_mark_stale(engine, shop: Shop):
    for statement in (
        shop.orders.insert().values(id=1, customer=1, amount=1),
        shop.orders.update().values(amount=2),
        shop.orders.delete(),
        sa.text("TRUNCATE orders"),
    ):
        with engine.begin() as conn:
            conn.execute(statement)
        with engine.connect() as conn:
            assert tracking.view_states(conn)[("public", "mv_totals")].stale, statement
        refresh_stale(engine, shop.metadata)


def test_rolled_back_write_leaves_view_fresh(engine, shop: Shop):
    with engine.connect() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 1}])
        conn.rollback()
    with engine.connect() as conn:
        assert not tracking.view_states(conn)[("public", "mv_totals")].stale


def test_refresh_views_also_clears_and_marks_dependents(engine, shop: Shop):
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 500}])
    refresh_views(engine, shop.mv_totals)
    with engine.connect() as conn:
        states = tracking.view_states(conn)
    assert not states[("public", "mv_totals")].stale
    assert states[("public", "mv_top")].stale
    assert _statuses(refresh_stale(engine, shop.metadata))["public.mv_top"] == "refreshed"


def test_own_transaction_changes_covered_by_refresh_in_same_transaction(engine, shop: Shop):
    with engine.connect() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 5, "amount": 5}])
        refresh_views(conn, shop.mv_totals)
        conn.commit()
    with engine.connect() as conn:
        assert not tracking.view_states(conn)[("public", "mv_totals")].stale


def test_failed_refresh_keeps_view_stale(engine, shop: Shop):
    with engine.begin() as conn:
        conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 1}])
    with engine.connect() as blocker:
        # A refresh made without our advisory lock holds the view's ACCESS EXCLUSIVE lock.
        blocker.execute(sa.text("REFRESH MATERIALIZED VIEW mv_totals"))
        [result] = refresh_views(engine, shop.mv_totals, lock_timeout=0.2)
        blocker.rollback()
    assert result.status == "failed" and "lock timeout" in str(result.error)
    with engine.connect() as conn:
        state = tracking.view_states(conn)[("public", "mv_totals")]
    assert state.stale and state.refresh_count == 0


def test_plain_view_sources_are_looked_through_and_install_is_idempotent(engine):
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE TABLE "Base T" (id int PRIMARY KEY)'))
        conn.execute(sa.text('CREATE VIEW v_base AS SELECT id FROM "Base T"'))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_v AS SELECT id FROM v_base"))
        tracking.install_tracking(conn, None, "mv_v", [(None, "v_base")])
        tracking.install_tracking(conn, "public", "mv_v", [(None, "v_base")])
    with engine.begin() as conn:
        conn.execute(sa.text('INSERT INTO "Base T" VALUES (1)'))
    with engine.connect() as conn:
        assert tracking.view_states(conn)[("public", "mv_v")].sources == ("public.Base T",)
        assert tracking.view_states(conn)[("public", "mv_v")].stale
    with engine.begin() as conn:
        tracking.uninstall_tracking(conn, None, "mv_v")
        tracking.uninstall_tracking(conn, None, "mv_v")
        assert tracking.tracking_installed(conn) == set()
        assert _trigger_count(conn) == 0


def test_missing_source_raises_naming_view(engine):
    import pytest

    with engine.begin() as conn, pytest.raises(tracking.TrackingError, match=r"mv_x.*nosuch"):
        tracking.install_tracking(conn, None, "mv_x", [(None, "nosuch")])


def test_drop_all_removes_triggers_but_keeps_other_views_tracking(engine):
    shop = build_shop()
    md = shop.metadata
    MaterializedView(  # a second view tracking the same table
        "mv_count",
        md,
        sa.select(sa.func.count().label("n")).select_from(shop.orders),
        columns=[sa.Column("n", sa.BigInteger)],
        track_changes=True,
    )
    md.create_all(engine)
    with engine.begin() as conn:
        assert tracking.tracking_installed(conn) == {
            ("public", "mv_totals"),
            ("public", "mv_count"),
        }
        tracking.uninstall_tracking(conn, None, "mv_totals")
        # mv_count still needs the triggers on orders.
        assert _trigger_count(conn) == 3
    md.drop_all(engine)
    with engine.connect() as conn:
        assert tracking.tracking_installed(conn) == set()
        assert _trigger_count(conn) == 0


def test_untracked_database_has_no_state(engine):
    shop = build_shop(track=False)
    shop.metadata.create_all(engine)
    with engine.connect() as conn:
        assert tracking.view_states(conn) == {}
        assert tracking.tracking_installed(conn) == set()
        assert not tracking.state_tables_exist(conn)
    assert {r.status for r in refresh_stale(engine, shop.metadata)} == {"skipped_fresh"}
    refresh_views(engine, shop.mv_totals)
    with engine.connect() as conn:
        assert not tracking.state_tables_exist(conn)  # refreshing never creates it


def test_writer_without_privileges_on_state_tables(engine, shop: Shop):
    """SECURITY DEFINER: a role that may only write orders still marks the view stale."""
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE ROLE "app writer"'))
        conn.execute(sa.text('GRANT INSERT ON orders TO "app writer"'))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text('SET ROLE "app writer"'))
            conn.execute(sa.text("INSERT INTO orders VALUES (1, 1, 1)"))
            conn.execute(sa.text("RESET ROLE"))
        with engine.connect() as conn:
            assert tracking.view_states(conn)[("public", "mv_totals")].stale
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text('DROP OWNED BY "app writer"'))
            conn.execute(sa.text('DROP ROLE "app writer"'))


def test_notify_payload_is_view_name(engine, shop: Shop):
    import psycopg

    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN sqlalchemy_matview")
        with engine.begin() as conn:
            for i in range(3):
                conn.execute(shop.orders.insert(), [{"customer": i, "amount": 1}])
        payloads = [n.payload for n in listener.notifies(timeout=1.0)]
    assert payloads == ["public.mv_totals"]  # three statements, one transaction: one notify


def test_refresh_marks_the_dependents_the_runner_graph_finds(engine):
    """The database function's dependents are the runner's: direct and through plain views."""
    from sqlalchemy_matview import catalog
    from sqlalchemy_matview.orchestration.ordering import DependencyGraph

    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE base (id int PRIMARY KEY)"))
        conn.execute(sa.text('CREATE MATERIALIZED VIEW "mv A" AS SELECT id FROM base'))
        conn.execute(sa.text('CREATE VIEW v_a AS SELECT id FROM "mv A"'))
        conn.execute(sa.text("CREATE VIEW v_aa AS SELECT id FROM v_a"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_via AS SELECT id FROM v_aa"))
        conn.execute(sa.text('CREATE MATERIALIZED VIEW mv_direct AS SELECT id FROM "mv A"'))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_next AS SELECT id FROM mv_direct"))
        tracking.install_tracking(conn, None, "mv A", [(None, "base")])
        graph = DependencyGraph.from_catalog(catalog.dependencies(conn))
    [result] = refresh_views(engine, "mv A")
    assert result.status == "refreshed"
    with engine.connect() as conn:
        stale = tracking.stale_views(conn)
    assert stale == graph.matview_dependents(("public", "mv A"))
    assert stale == {("public", "mv_via"), ("public", "mv_direct")}
