"""replace_materialized_view keeps every view that depends on the replaced one."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from matview_alembic_helpers import run_code

from sqlalchemy_matview.alembic.toimpl import DependentViewError


def _setup(conn: sa.Connection) -> None:
    for statement in [
        "CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL, amount int)",
        "INSERT INTO events SELECT g, 'k' || (g % 3), g FROM generate_series(1, 30) g",
        "CREATE MATERIALIZED VIEW base AS"
        " SELECT kind, sum(amount) AS total FROM events GROUP BY kind",
        "CREATE UNIQUE INDEX base_kind ON base (kind)",
        "COMMENT ON MATERIALIZED VIEW base IS 'the base'",
        # A plain view on the materialized view, and a materialized view on that plain view.
        "CREATE VIEW base_big WITH (security_barrier=true) AS"
        " SELECT kind, total FROM base WHERE total > 100",
        "COMMENT ON VIEW base_big IS 'big ones'",
        "CREATE MATERIALIZED VIEW top_kind AS"
        " SELECT kind FROM base_big ORDER BY total DESC LIMIT 1",
        "CREATE UNIQUE INDEX top_kind_kind ON top_kind (kind)",
        # A materialized view reading base directly, left unpopulated.
        "CREATE MATERIALIZED VIEW base_copy AS SELECT * FROM base WITH NO DATA",
        "CREATE INDEX base_copy_total ON base_copy (total DESC) WHERE total > 0",
    ]:
        conn.execute(sa.text(statement))


def _state(conn: sa.Connection) -> dict[str, object]:
    rows = conn.execute(
        sa.text(
            """
            SELECT c.relname, c.relkind::text, c.relispopulated, c.reloptions,
                   obj_description(c.oid, 'pg_class') AS comment,
                   ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                          WHERE i.indrelid = c.oid ORDER BY 1) AS indexes
              FROM pg_class c
             WHERE c.relname IN ('base', 'base_big', 'top_kind', 'base_copy')
             ORDER BY 1
            """
        )
    ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_replace_keeps_dependents_with_data_indexes_and_comments(conn: sa.Connection) -> None:
    _setup(conn)
    before = _state(conn)
    top_before = conn.scalar(sa.text("SELECT kind FROM top_kind"))
    run_code(
        conn,
        "op.replace_materialized_view('base', "
        "'SELECT kind, sum(amount) * 2 AS total, count(*) AS n FROM events GROUP BY kind', "
        "old_definition='SELECT kind, sum(amount) AS total FROM events GROUP BY kind')",
    )
    assert _state(conn) == before
    assert conn.scalar(sa.text("SELECT max(n) FROM base")) == 10
    assert conn.scalar(sa.text("SELECT kind FROM top_kind")) == top_before
    assert conn.scalar(sa.text("SELECT count(*) FROM base_big")) == 3
    # The reverse puts the old definition back, dependents included.
    run_code(
        conn,
        "op.replace_materialized_view('base', "
        "'SELECT kind, sum(amount) AS total FROM events GROUP BY kind')",
    )
    assert _state(conn) == before
    assert conn.scalar(sa.text("SELECT total FROM base WHERE kind = 'k0'")) == 165


def test_replace_that_breaks_a_dependent_names_it(conn: sa.Connection) -> None:
    _setup(conn)
    with pytest.raises(DependentViewError, match="base_big"):
        run_code(
            conn,
            "op.replace_materialized_view('base', 'SELECT kind FROM events GROUP BY kind')",
        )


def test_replace_of_a_missing_view(conn: sa.Connection) -> None:
    with pytest.raises(Exception, match="no such materialized view"):
        run_code(conn, "op.replace_materialized_view('nope', 'SELECT 1')")
