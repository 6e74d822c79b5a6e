"""What a refresh call sends around the refresh itself: pinned, so it cannot grow silently.

``refresh_views(engine, one_view)`` plans with ONE statement (current schema, standby
check, bookkeeping owners, the view in the catalog, an incremental view's refresh function)
sent alone (driver autocommit), then the refresh: two statements in all. An incremental
view's refresh function is one statement too, sent alone: two round trips, no BEGIN nor
COMMIT; a materialized view's refresh runs in a transaction. With a Connection the plan
reads in the caller's transaction and the view gets its savepoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from sqlalchemy_matview import (
    Incremental,
    MaterializedView,
    UnknownViewError,
    refresh_all,
    refresh_stale,
    refresh_views,
)

from .conftest import Shop


@dataclass
class Sent:
    statements: list[str] = field(default_factory=list)
    #: Per statement: sent in the driver's autocommit (a transaction of its own, with no
    #: BEGIN nor COMMIT round trip).
    alone: list[bool] = field(default_factory=list)
    transactions: int = 0
    commits: int = 0


@contextmanager
def sent(engine: Engine) -> Iterator[Sent]:
    """The statements, transactions and commits ``engine`` sends meanwhile."""
    out = Sent()

    def on_execute(conn: object, cursor: Any, statement: str, *_: object) -> None:
        out.statements.append(" ".join(statement.split())[:200])
        out.alone.append(bool(cursor.connection.autocommit))

    def on_begin(conn: object) -> None:
        out.transactions += 1

    def on_commit(conn: object) -> None:
        out.commits += 1

    sa.event.listen(engine, "before_cursor_execute", on_execute)
    sa.event.listen(engine, "begin", on_begin)
    sa.event.listen(engine, "commit", on_commit)
    try:
        yield out
    finally:
        sa.event.remove(engine, "before_cursor_execute", on_execute)
        sa.event.remove(engine, "begin", on_begin)
        sa.event.remove(engine, "commit", on_commit)


def daily(md: sa.MetaData, name: str = "mv_inc_daily") -> tuple[sa.Table, MaterializedView]:
    events = sa.Table(
        f"{name}_events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("v", sa.Integer, nullable=False),
    )
    mv = MaterializedView(
        name,
        md,
        sa.select(events.c.day, sa.func.sum(events.c.v).label("total")).group_by(events.c.day),
        incremental=Incremental(key="day", sources={events: events.c.day}),
    )
    return events, mv


def test_one_tracked_view_costs_a_plan_and_its_refresh(engine: Engine, shop: Shop) -> None:
    refresh_views(engine, shop.mv_totals)  # the engine's first connection initializes
    with sent(engine) as s:
        [done] = refresh_views(engine, shop.mv_totals)
    assert done.status == "refreshed"
    assert len(s.statements) == 2, s.statements
    assert "refresh(" in s.statements[1]
    assert (s.transactions, s.commits) == (1, 1)


def test_one_untracked_view_alone_too(engine: Engine) -> None:
    md = sa.MetaData()
    mv = MaterializedView("mv_one", md, sa.select(sa.literal(1).label("x")), unique_key="x")
    md.create_all(engine)
    refresh_views(engine, mv)
    with sent(engine) as s:
        [done] = refresh_views(engine, "mv_one", lock="none")
    assert done.status == "refreshed" and done.concurrently
    assert len(s.statements) == 2, s.statements
    assert s.statements[1].startswith("REFRESH MATERIALIZED VIEW CONCURRENTLY")


def test_one_incremental_view_costs_a_plan_and_its_function(engine: Engine) -> None:
    md = sa.MetaData()
    events, mv = daily(md)
    md.create_all(engine)
    refresh_views(engine, mv)
    for dirty in (False, True):
        if dirty:
            with engine.begin() as conn:
                conn.execute(events.insert(), [{"id": 1, "day": "2026-01-01", "v": 5}])
        with sent(engine) as s:
            [done] = refresh_views(engine, mv)
        assert done.status == "refreshed" and done.buckets == (1 if dirty else 0)
        assert len(s.statements) == 2, s.statements
        assert "_refresh(" in s.statements[1]
        assert (s.transactions, s.commits) == (1, 1)
        # Two round trips in all: each statement is a transaction of its own.
        assert s.alone == [True, True]
    with engine.connect() as conn:
        assert conn.execute(sa.select(mv.table.c.total)).scalar_one() == 5


def test_an_incremental_view_with_timeouts_is_refreshed_in_a_transaction(engine: Engine) -> None:
    """Timeouts are set in the refresh's transaction, by a statement before the function."""
    md = sa.MetaData()
    _, mv = daily(md)
    md.create_all(engine)
    with sent(engine) as s:
        [done] = refresh_views(engine, mv, lock_timeout=5)
    assert done.status == "refreshed"
    assert s.alone == [True, False, False], s.statements


def test_an_engine_with_another_isolation_level_still_refreshes_incremental_views(
    engine: Engine,
) -> None:
    """The refresh function needs READ COMMITTED: refresh_views, which owns the transaction,
    runs it as a statement of its own (the server's default level), whatever level the
    Engine gives its transactions. A connection that chose a level keeps it (and the
    function refuses anything but READ COMMITTED: see test_incremental_refresh)."""
    md = sa.MetaData()
    events, mv = daily(md)
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"id": 1, "day": "2026-01-01", "v": 5}])
    rr = sa.create_engine(engine.url, isolation_level="REPEATABLE READ", pool_size=1)
    try:
        [done] = refresh_views(rr, mv)
        assert (done.status, done.buckets) == ("refreshed", 1), done
        with rr.connect() as conn:  # the same connection, its level given back
            assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "repeatable read"
    finally:
        rr.dispose()


def test_a_connection_plans_in_the_callers_transaction(engine: Engine, shop: Shop) -> None:
    with engine.connect() as conn:
        refresh_views(conn, shop.mv_totals)
        conn.commit()
        with sent(engine) as s:
            [done] = refresh_views(conn, shop.mv_totals)
        assert done.status == "refreshed"
        assert conn.in_transaction()  # the caller's, left for the caller to commit
        conn.commit()
    assert [q.split()[0] for q in s.statements] == ["WITH", "SAVEPOINT", "SELECT", "RELEASE"]
    assert s.transactions == 1


def test_planning_reads_do_not_grow_with_the_views(engine: Engine) -> None:
    """refresh_stale / refresh_all of many views: one planning statement for the catalog
    (the dependency scan included) and one for the staleness, whatever their number."""
    md = sa.MetaData()
    base = sa.Table("base", md, sa.Column("id", sa.Integer, primary_key=True))
    for i in range(12):
        MaterializedView(
            f"mv_many_{i:02d}",
            md,
            sa.select(sa.func.count().label("n")).select_from(base).where(base.c.id > i),
            track_changes=True,
        )
    md.create_all(engine)
    refresh_stale(engine, md)
    with sent(engine) as s:
        results = refresh_stale(engine, md)
    assert {r.status for r in results} == {"skipped_fresh"}
    assert len(s.statements) == 2, s.statements
    with sent(engine) as s:
        results = refresh_all(engine, md, lock="none")
    assert {r.status for r in results} == {"refreshed"}
    assert len(s.statements) == 1 + 12, s.statements
    assert s.transactions == s.commits == 12


def test_staleness_of_many_incremental_views_is_one_statement(engine: Engine) -> None:
    """refresh_stale over incremental views: which have dirty buckets is one statement too."""
    md = sa.MetaData()
    made = [daily(md, f"mv_inc_many_{i:02d}") for i in range(8)]
    md.create_all(engine)
    refresh_stale(engine, md)
    with sent(engine) as s:
        results = refresh_stale(engine, md)
    assert {r.status for r in results} == {"skipped_fresh"}
    assert len(s.statements) == 2, s.statements
    events, _ = made[3]
    with engine.begin() as conn:
        conn.execute(events.insert(), [{"id": 1, "day": "2026-01-01", "v": 5}])
    with sent(engine) as s:
        results = refresh_stale(engine, md)
    assert {r.view: r.status for r in results if r.status != "skipped_fresh"} == {
        "public.mv_inc_many_03": "refreshed"
    }
    assert len(s.statements) == 3, s.statements


def test_a_plan_that_refuses_leaves_no_transaction(engine: Engine, shop: Shop) -> None:
    with engine.connect() as conn:
        with pytest.raises(UnknownViewError, match="mv_nope"):
            refresh_views(conn, "mv_nope")
        conn.rollback()
    with sent(engine) as s, pytest.raises(UnknownViewError, match="mv_nope"):
        refresh_views(engine, shop.mv_totals, "mv_nope")
    assert len(s.statements) == 1 and s.commits == 0
    # The pooled connection went back clean: the next call refreshes.
    [done] = refresh_views(engine, shop.mv_totals)
    assert done.status == "refreshed"


def test_the_first_view_commits_the_plan_and_a_failure_leaves_the_next_view(
    engine: Engine,
) -> None:
    """The plan reads in the first view's transaction: that view failing rolls it back,
    and the next view still refreshes in a transaction of its own."""
    md = sa.MetaData()
    src = sa.Table("src", md, sa.Column("x", sa.Integer))
    MaterializedView(
        "mv_bad", md, sa.select((100 / src.c.x).label("y")).select_from(src), with_data=False
    )
    MaterializedView("mv_good", md, sa.select(sa.func.count().label("n")).select_from(src))
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(src.insert(), [{"x": 0}])
    results = refresh_views(engine, "mv_bad", "mv_good")
    assert [r.status for r in results] == ["failed", "refreshed"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT n FROM mv_good")).scalar_one() == 1


def test_timeouts_cost_one_statement_and_end_with_their_transaction(
    engine: Engine, shop: Shop
) -> None:
    refresh_views(engine, shop.mv_totals)
    with sent(engine) as s:
        [done] = refresh_views(engine, shop.mv_totals, lock_timeout=5, statement_timeout="7s")
    assert done.status == "refreshed"
    assert len(s.statements) == 3, s.statements
    assert "set_config" in s.statements[1]
    with engine.connect() as conn:
        conn.execute(sa.text("SET statement_timeout = '11s'"))
        with sent(engine) as s:
            refresh_views(conn, shop.mv_totals, statement_timeout="7s")
        # In the caller's transaction the value in force comes back after the savepoint.
        assert conn.execute(sa.text("SHOW statement_timeout")).scalar_one() == "11s"
        assert conn.execute(sa.text("SHOW lock_timeout")).scalar_one() == "0"
    assert len(s.statements) == 7, s.statements


def test_names_resolve_as_before(engine: Engine) -> None:
    """A dotted string is a view named so in the current schema when there is one, else
    schema.name; with an empty search_path unqualified names are looked up in pg_catalog."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA a"))
        conn.execute(sa.text('CREATE MATERIALIZED VIEW "a.b" AS SELECT 1 AS x'))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW a.b AS SELECT 2 AS x"))
        conn.execute(sa.text("CREATE MATERIALIZED VIEW a.c AS SELECT 3 AS x"))
    results = refresh_views(engine, "a.b", "a.c", ("a", "b"))
    assert sorted(r.view for r in results) == ["a.b", "a.c", "public.a.b"]
    with engine.connect() as conn:
        conn.execute(sa.text("SET search_path = ''"))
        with pytest.raises(UnknownViewError, match=r"'pg_catalog\.a\.b'.*'pg_catalog'"):
            refresh_views(conn, ("", "a.b"))


def test_planning_waits_for_no_lock_on_the_views(engine: Engine, shop: Shop) -> None:
    """The plan reads the catalog only: a materialized view held ACCESS EXCLUSIVE elsewhere
    (a plain REFRESH running) delays neither the plan (a cascade reads every view's entry)
    nor the refresh of the others."""
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE MATERIALIZED VIEW mv_other AS SELECT 1 AS x"))
    with engine.connect() as holder, engine.connect() as conn:
        holder.execute(sa.text("REFRESH MATERIALIZED VIEW mv_other"))  # held till rollback
        conn.execute(sa.text("SET lock_timeout = '2s'"))
        results = refresh_views(conn, shop.mv_totals, cascade=True)
        assert [(r.view, r.status) for r in results] == [
            ("public.mv_totals", "refreshed"),
            ("public.mv_top", "refreshed"),
        ]
        assert {r.status for r in refresh_stale(conn, shop.metadata)} == {"skipped_fresh"}
        holder.rollback()
        conn.rollback()


def test_dependency_order_is_linear_keeps_ties_and_names_a_cycle() -> None:
    """The run orders hundreds of views: Kahn's algorithm, the given order among ready ones."""
    import time

    from sqlalchemy_matview import DependencyCycleError
    from sqlalchemy_matview.orchestration.ordering import DependencyGraph

    g = DependencyGraph()
    g.add(("s", "c"), ("s", "v"))  # c reads the plain view v, which reads a
    g.add(("s", "v"), ("s", "a"))
    g.kinds[("s", "v")] = "v"
    g.add(("s", "b"), ("s", "a"))
    assert g.order([("s", "c"), ("s", "x"), ("s", "b"), ("s", "a")]) == [
        ("s", "x"),
        ("s", "a"),
        ("s", "c"),
        ("s", "b"),
    ]
    chain = DependencyGraph()
    names = [("s", f"v{i:04d}") for i in range(2000)]
    for upper, lower in zip(names[1:], names[:-1], strict=True):
        chain.add(upper, lower)
    started = time.perf_counter()
    assert chain.order(list(reversed(names))[:300]) == names[-300:]
    assert time.perf_counter() - started < 2.0
    g.add(("s", "a"), ("s", "b"))
    with pytest.raises(DependencyCycleError, match=r"s\.a, s\.b, s\.c"):
        g.order([("s", "a"), ("s", "b"), ("s", "c"), ("s", "x")])
