"""Alembic never compares view tables nor bookkeeping as tables, and logs in its own words."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.operations import ops
from matview_alembic_helpers import autogenerate, run_code

from sqlalchemy_matview import MaterializedView
from sqlalchemy_matview.alembic.comparator import describe
from sqlalchemy_matview.alembic.filters import BOOKKEEPING_SCHEMA, is_bookkeeping
from sqlalchemy_matview.compare import compare_views

LOGGER = "alembic.autogenerate.sqlalchemy_matview"


def models(comment: str | None = None, filtered: bool = False) -> sa.MetaData:
    md = sa.MetaData()
    events = sa.Table(
        "events",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
    )
    query = sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind)
    if filtered:
        query = query.where(events.c.kind != "x")
    totals = MaterializedView("mv_totals", md, query, unique_key="kind", comment=comment)
    sa.Index("mv_totals_n", totals.c.n.desc())
    return md


def detected(caplog: pytest.LogCaptureFixture) -> list[str]:
    # Alembic's own notes on SERIAL columns are not findings.
    messages = [r.getMessage() for r in caplog.records]
    return [m for m in messages if m.startswith("Detected") and "sequence" not in m]


def test_log_of_a_new_view(conn: sa.Connection, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="alembic")
    generated = autogenerate(conn, models())
    assert detected(caplog) == [
        "Detected added table 'events'",
        "Detected added materialized view 'public.mv_totals'",
        "Detected added index 'mv_totals_n' on materialized view 'public.mv_totals'",
        "Detected added index 'mv_totals_unique_key' on materialized view 'public.mv_totals'",
    ]
    assert {r.name for r in caplog.records if "materialized view" in r.getMessage()} == {LOGGER}
    run_code(conn, generated.upgrade)

    caplog.clear()
    assert autogenerate(conn, models()).empty
    assert detected(caplog) == []


def test_log_of_changes(conn: sa.Connection, caplog: pytest.LogCaptureFixture) -> None:
    models().create_all(conn)
    md = models(comment="per kind", filtered=True)
    md.tables["mv_totals"].indexes.clear()
    sa.Index("mv_totals_n", md.tables["mv_totals"].c.n)
    conn.execute(sa.text("CREATE MATERIALIZED VIEW legacy AS SELECT 1 AS one"))
    caplog.set_level(logging.INFO, logger="alembic")
    autogenerate(conn, md)
    assert detected(caplog) == [
        "Detected removed materialized view 'public.legacy'",
        "Detected removed index 'mv_totals_unique_key' on materialized view 'public.mv_totals'",
        "Detected changed definition of materialized view 'public.mv_totals'",
        "Detected changed index 'mv_totals_n' on materialized view 'public.mv_totals'",
        "Detected changed comment of materialized view 'public.mv_totals'",
    ]


def test_describe_names_schemas() -> None:
    md = sa.MetaData()
    MaterializedView("mv", md, "SELECT 1 AS one", columns=[sa.Column("one", sa.Integer)])
    from sqlalchemy_matview.compare import CreateView

    change = CreateView("reports", "mv", "SELECT 1 AS one", True, None, None)
    assert list(describe([change], "public")) == ["Detected added materialized view 'reports.mv'"]


def test_view_tables_never_reach_alembic_table_comparison(conn: sa.Connection) -> None:
    seen: list[tuple[str, str, bool]] = []

    def include_object(obj: Any, name: str, type_: str, reflected: bool, compare_to: Any) -> bool:
        seen.append((type_, name, reflected))
        return not (type_ == "table" and name == "ignored")

    md = models()
    sa.Table("ignored", md, sa.Column("id", sa.Integer, primary_key=True))
    generated = autogenerate(conn, md, include_object=include_object)
    # The project's filter still applies to tables...
    assert [
        op.table_name for op in generated.upgrade_ops.ops if isinstance(op, ops.CreateTableOp)
    ] == ["events"]
    # ... and sees the view only as a materialized view, never as a table.
    assert ("table", "mv_totals", False) not in seen
    assert ("materialized_view", "mv_totals", False) in seen


def test_bookkeeping_is_never_compared(
    conn: sa.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    conn.execute(sa.text(f"CREATE SCHEMA {BOOKKEEPING_SCHEMA}"))
    conn.execute(sa.text(f"CREATE TABLE {BOOKKEEPING_SCHEMA}.views (id int PRIMARY KEY)"))
    conn.execute(sa.text("CREATE TABLE public.sqlalchemy_matview_state (id int PRIMARY KEY)"))
    conn.execute(sa.text("CREATE TABLE public.sqlalchemy_matview_changes (id int)"))
    conn.execute(sa.text("CREATE TABLE public.stray (id int)"))
    caplog.set_level(logging.INFO, logger="alembic")
    generated = autogenerate(conn, sa.MetaData(), include_schemas=True)
    assert [(type(op).__name__, op.table_name) for op in generated.upgrade_ops.ops] == [
        ("DropTableOp", "stray")
    ]
    assert detected(caplog) == ["Detected removed table 'stray'"]


def test_is_bookkeeping() -> None:
    assert is_bookkeeping(BOOKKEEPING_SCHEMA, "anything")
    assert is_bookkeeping("public", "sqlalchemy_matview_changes")
    assert not is_bookkeeping("reports", "sqlalchemy_matview_changes")
    assert not is_bookkeeping("public", "events")


def test_probes_take_a_fixed_number_of_statements(conn: sa.Connection) -> None:
    def build(n: int) -> sa.MetaData:
        md = sa.MetaData()
        events = sa.Table("events", md, sa.Column("id", sa.Integer, primary_key=True))
        for i in range(n):
            view = MaterializedView(
                f"mv_{i}", md, sa.select(events.c.id).where(events.c.id > i), unique_key="id"
            )
            sa.Index(f"mv_{i}_desc", view.c.id.desc())
        return md

    counts = {}
    for n in (2, 20):
        md = build(n)
        md.create_all(conn)
        counts[n] = _statements_sent(conn, lambda md=md: compare_views(conn, md))
        md.drop_all(conn)
    assert counts[2] == counts[20]


def _statements_sent(conn: sa.Connection, work: Any) -> int:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(args[2])

    sa.event.listen(conn, "before_cursor_execute", count)
    try:
        assert work() == []
    finally:
        sa.event.remove(conn, "before_cursor_execute", count)
    return len(statements)


def test_probe_block_quotes_any_text(conn: sa.Connection) -> None:
    from sqlalchemy_matview.compare.normalise import _dollar_tag

    assert _dollar_tag(["SELECT 1"], "q") == "$q0$"
    assert _dollar_tag(["SELECT '$q0$'"], "q") == "$q1$"
    assert _dollar_tag(["SELECT 1 AS x$q0"], "q") == "$q1$"  # would close one too early

    def declared(name: str, sql: str) -> sa.MetaData:
        md = sa.MetaData()
        columns = [sa.Column("s", sa.Text), sa.Column("x$q0", sa.Integer)]
        MaterializedView(name, md, sql, columns=columns)
        return md

    tricky = declared("mv_dollars", "SELECT '$do0$ $$' AS s, 1 AS x$q0")
    plain = declared("mv_plain", "SELECT 'a' AS s, 1 AS x$q0")
    sent = {}
    for name, md in (("mv_dollars", tricky), ("mv_plain", plain)):
        md.create_all(conn)
        sent[name] = _statements_sent(
            conn, lambda md=md, name=name: compare_views(conn, md, include=lambda r: r.name == name)
        )
    # The same few statements: the tricky text went through the single DO block, not the
    # statement-by-statement fallback.
    assert sent["mv_dollars"] == sent["mv_plain"]
