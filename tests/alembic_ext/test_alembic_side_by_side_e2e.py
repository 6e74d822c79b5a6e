"""The real ``alembic`` command with ``MaterializedView(replace_strategy="side_by_side")``.

Autogenerate writes the strategy into both directions; ``upgrade`` -> ``downgrade`` ->
``upgrade`` runs with ``transaction_per_migration`` while readers query the view and its
dependents in other threads, and none of them sees an error; ``--sql`` prints the same steps,
and ``psql`` builds from them the same catalog.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from matview_project import ROLE, Project, add_to_function, psql, snapshot
from matview_swap_helpers import Readers

from sqlalchemy_matview import refresh_views

V1 = """
import sqlalchemy as sa
from sqlalchemy_matview import MaterializedView

metadata = sa.MetaData()
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("amount", sa.Integer, nullable=False),
)
totals = MaterializedView(
    "mv_totals", metadata,
    sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind),
    unique_key="kind",
    comment="per kind",
    replace_strategy="side_by_side",
)
sa.Index("mv_totals_n", totals.c.n.desc())
MaterializedView(
    "mv_top", metadata,
    sa.select(totals.c.kind, totals.c.n).where(totals.c.n > 10),
    unique_key="kind",
)
"""

# A column added to the table and read by the view's new definition, in the same migration.
V2 = V1.replace(
    'sa.Column("amount", sa.Integer, nullable=False),\n',
    'sa.Column("amount", sa.Integer, nullable=False),\n    sa.Column("note", sa.Text),\n',
).replace(
    'sa.func.count().label("n")).group_by',
    'sa.func.count().label("n"), sa.func.max(events.c.note).label("note")).group_by',
)

EXTRA_UPGRADE = f"""
    op.execute("CREATE VIEW big_view AS SELECT kind, n FROM mv_top WHERE n > 20")
    op.execute("COMMENT ON VIEW big_view IS 'the biggest'")
    op.execute("GRANT SELECT ON mv_totals, mv_top, big_view TO {ROLE}")
"""
EXTRA_DOWNGRADE = """
    op.execute("DROP VIEW big_view")
"""

READS = [
    "SELECT kind, n FROM mv_totals WHERE kind = 'a'",
    "SELECT kind, n FROM mv_top ORDER BY kind",
    "SELECT kind, n FROM big_view ORDER BY kind",
]


def _per_migration(project: Project) -> None:
    env_py = project.path / "migrations" / "env.py"
    text = env_py.read_text()
    old = "connection=connection, target_metadata=target_metadata"
    assert old in text
    env_py.write_text(text.replace(old, old + ", transaction_per_migration=True"))


def _counts(url: sa.URL) -> dict[str, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                name: int(conn.scalar(sa.text(f"SELECT sum(n) FROM {name}")) or 0)
                for name in ("mv_totals", "mv_top", "big_view")
            }
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_with_readers(tmp_path: Path, databases: Any) -> None:
    online, fresh = databases
    project = Project(tmp_path, online)
    _per_migration(project)
    first = project.revision(V1, "views")
    add_to_function(first, "upgrade", EXTRA_UPGRADE)
    add_to_function(first, "downgrade", EXTRA_DOWNGRADE)
    project.run("upgrade", "head")
    engine = sa.create_engine(online)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO events SELECT g, chr(97 + mod(g, 3)), g"
                    " FROM generate_series(1, 3000) g"
                )
            )
        refresh_views(engine, "mv_totals", cascade=True)
    finally:
        engine.dispose()
    expected = {"mv_totals": 3000, "mv_top": 3000, "big_view": 3000}
    assert _counts(online) == expected

    second = project.revision(V2, "side by side").read_text()
    upgrade, downgrade = second.split("def downgrade()")
    for body in (upgrade, downgrade):
        assert "op.replace_materialized_view(\n        'mv_totals'" in body
        assert "strategy='side_by_side'" in body
        assert "DependentView(" in body and "'big_view'" in body
    assert upgrade.index("op.add_column(") < upgrade.index("op.replace_materialized_view(")

    readers = Readers(online, READS).start()
    try:
        for step in (("upgrade", "head"), ("downgrade", "-1"), ("upgrade", "head")):
            log = project.run(*step)
            assert "swapped in" in log, log
            readers.wait_for_reads(100)
            assert _counts(online) == expected, step
    finally:
        readers.stop()
    assert readers.errors == []
    assert "No new upgrade operations detected" in project.run("check")

    state = snapshot(online)
    assert f"{ROLE} SELECT false" in state["public.big_view"]["grants"]
    assert state["public.big_view"]["comment"] == "the biggest"
    assert "note" in state["public.mv_totals"]["definition"]

    # --sql prints the same steps: psql builds the same catalog, and takes it back down.
    script = project.sql("upgrade", "base:head")
    assert "DO $swap" in script and "CREATE SCHEMA sqlalchemy_matview_swap_" in script
    offline = fresh()
    psql(script, offline)
    assert snapshot(offline) == state
    assert "No new upgrade operations detected" in project.run("check", url=offline)
    psql(project.sql("downgrade", "head:base"), offline)
    assert snapshot(offline) == {}
