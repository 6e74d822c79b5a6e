"""Hostile identifiers: whatever a view or schema is called, every statement quotes it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from sqlalchemy_matview import DropMaterializedView, MaterializedView, refresh

HOSTILE = [
    'a"b',
    "x'; DROP TABLE victim; --",
    "semi;colon",
    "-- comment",
    "/* c */",
    "select",
    "Mixed Case",
    "UPPER",
    "ünïcødé ✓",
    "percent %s %(x)s",
    "colon :name",
    "back\\slash",
    "$1 dollar",
    "n" * 63,
    "é" * 31,
]


def identifiers() -> st.SearchStrategy[str]:
    chars = st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00", max_codepoint=0x2FFF
    )
    generated = st.text(chars, min_size=1, max_size=20).filter(
        lambda s: len(s.encode()) <= 63 and not s.lower().startswith("pg_") and s != "public"
    )
    return st.one_of(st.sampled_from(HOSTILE), generated)


def snapshot(conn: sa.Connection) -> set[tuple[str, str, str]]:
    rows = conn.execute(
        sa.text(
            "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
        )
    )
    return {tuple(r) for r in rows}  # type: ignore[misc]


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(view_name=identifiers(), schema=identifiers())
def test_hostile_names_create_refresh_query_drop(
    engine: Engine, view_name: str, schema: str
) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS victim (id int PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO victim VALUES (1), (2) ON CONFLICT DO NOTHING"))
        before = snapshot(conn)
    md = sa.MetaData()
    victim = sa.Table("victim", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView(
        view_name,
        md,
        sa.select(victim.c.id.label(view_name[:20] or "id")),
        schema=schema,
        unique_key=view_name[:20] or "id",
        comment=view_name,
    )
    with engine.begin() as conn:
        conn.execute(sa.schema.CreateSchema(schema, if_not_exists=True))
        mv.create(conn)
        conn.execute(refresh(mv))
        assert sorted(conn.scalars(sa.select(mv.table.c[0]))) == [1, 2]
        comment = conn.scalar(
            sa.text(
                "SELECT obj_description(c.oid, 'pg_class') FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :schema AND c.relname = :name AND c.relkind = 'm'"
            ),
            {"schema": schema, "name": view_name},
        )
        assert comment == view_name
        conn.execute(DropMaterializedView(mv))
        conn.execute(sa.schema.DropSchema(schema))
        assert snapshot(conn) == before
