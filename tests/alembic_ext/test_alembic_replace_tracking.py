"""A replace keeps a tracked view tracked, on the tables its new definition reads."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from matview_swap_helpers import migrate

from sqlalchemy_matview.orchestration.tracking import install_tracking, refresh_call, view_states
from sqlalchemy_matview.swap import SwapError

SETUP = [
    "CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL, amount int NOT NULL)",
    "CREATE TABLE kinds (kind text PRIMARY KEY, label text NOT NULL)",
    "INSERT INTO events SELECT g, 'k' || mod(g, 5), g FROM generate_series(1, 50) g",
    "INSERT INTO kinds SELECT 'k' || g, 'kind ' || g FROM generate_series(0, 4) g",
    "CREATE MATERIALIZED VIEW mv AS SELECT kind, sum(amount)::int AS total FROM events"
    " GROUP BY kind",
    "CREATE UNIQUE INDEX mv_kind ON mv (kind)",
    "CREATE MATERIALIZED VIEW mv_top AS SELECT kind FROM mv ORDER BY total DESC LIMIT 1",
]
JOINED = (
    "SELECT e.kind, sum(e.amount)::int AS total, min(k.label) AS label"
    " FROM events e JOIN kinds k ON k.kind = e.kind GROUP BY e.kind"
)
KINDS_ONLY = "SELECT kind, 0 AS total, label FROM kinds"


def _state(engine: sa.Engine, tracking_schema: str | None = None) -> tuple[tuple[str, ...], bool]:
    with engine.connect() as conn:
        state = view_states(conn, tracking_schema)[("public", "mv")]
        return state.sources, state.stale


def _refresh(engine: sa.Engine, tracking_schema: str | None = None) -> None:
    from sqlalchemy_matview import refresh_views

    if tracking_schema is None:
        results = refresh_views(engine, "mv", "mv_top")
        assert {r.status for r in results} == {"refreshed"}
        return
    # Refreshing by name knows no MetaData, hence no tracking schema: the SQL function does.
    call = refresh_call("public", "mv", concurrently=False, tracking_schema_name=tracking_schema)
    with engine.begin() as conn:
        assert conn.scalar(call) == "refreshed"


def _write(engine: sa.Engine, statement: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(statement)


@pytest.mark.parametrize("tracking_schema", [None, "ops_bookkeeping"])
@pytest.mark.parametrize("strategy", ["drop_create", "side_by_side"])
def test_tracking_follows_the_tables_the_new_definition_reads(
    engine: sa.Engine, strategy: str, tracking_schema: str | None
) -> None:
    with engine.begin() as conn:
        for statement in SETUP:
            conn.exec_driver_sql(statement)
        install_tracking(conn, None, "mv", [(None, "events")], schema=tracking_schema)
    _refresh(engine, tracking_schema)
    assert _state(engine, tracking_schema) == (("public.events",), False)

    def replace(definition: str) -> None:
        migrate(
            engine,
            lambda op: op.replace_materialized_view(
                "mv", definition, strategy=strategy, tracking_schema=tracking_schema
            ),
        )

    replace(JOINED)
    assert _state(engine, tracking_schema)[0] == ("public.events", "public.kinds")
    _refresh(engine, tracking_schema)
    _write(engine, "UPDATE kinds SET label = 'renamed' WHERE kind = 'k1'")
    assert _state(engine, tracking_schema)[1], "a write to the newly read table marks it stale"

    replace(KINDS_ONLY)
    assert _state(engine, tracking_schema)[0] == ("public.kinds",)
    _refresh(engine, tracking_schema)
    _write(engine, "INSERT INTO events VALUES (1000, 'k1', 1)")
    assert not _state(engine, tracking_schema)[1], "a table it no longer reads does not mark it"
    with engine.connect() as conn:
        triggers = conn.scalar(
            sa.text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'events'::regclass")
        )
        assert triggers == 0
        if tracking_schema is not None:
            assert not conn.scalar(sa.text("SELECT to_regnamespace('sqlalchemy_matview')"))


def test_a_failed_side_by_side_replace_leaves_tracking_as_it_was(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for statement in SETUP:
            conn.exec_driver_sql(statement)
        install_tracking(conn, None, "mv", [(None, "events")])
    failing = JOINED.replace("sum(e.amount)::int", "(sum(e.amount) / 0)::int")
    with pytest.raises(SwapError, match="division by zero"):
        migrate(
            engine,
            lambda op: op.replace_materialized_view("mv", failing, strategy="side_by_side"),
        )
    assert _state(engine)[0] == ("public.events",)
    with engine.connect() as conn:
        triggers = conn.scalar(
            sa.text("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'kinds'::regclass")
        )
        assert triggers == 0
