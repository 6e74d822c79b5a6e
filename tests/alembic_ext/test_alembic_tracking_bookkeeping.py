"""The bookkeeping is migrated, not implied: installed by the first migration that tracks a
view, removed by the one that stops tracking the last; ``--sql`` prints it all (calls of the
library's own functions), and after ``alembic downgrade base`` nothing of the library
remains, online or from the offline script."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from matview_project import Project, psql

MODELS = """
import sqlalchemy as sa
from sqlalchemy_matview import MaterializedView

metadata = sa.MetaData()
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
)
MaterializedView(
    "mv_kinds", metadata,
    sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind),
    unique_key="kind",
    track_changes=True,
)
"""
UNTRACKED = MODELS.replace("track_changes=True", "track_changes=False")

LIBRARY_OBJECTS = sa.text(
    """
    SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'sqlalchemy_matview')
         + (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'sqlalchemy!_matview!_%' ESCAPE '!')
         + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'sqlalchemy!_matview!_%' ESCAPE '!')
         + (SELECT count(*) FROM pg_class WHERE relname LIKE 'sqlalchemy!_matview!_%' ESCAPE '!')
    """
)


def _query(url: sa.URL, statement: Any, *, write: str | None = None) -> Any:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            if write:
                conn.execute(sa.text(write))
            return conn.execute(statement).scalar()
    finally:
        engine.dispose()


def _marks_stale(url: sa.URL, kind: str) -> bool:
    return bool(
        _query(
            url,
            sa.text(
                "SELECT EXISTS (SELECT 1 FROM sqlalchemy_matview.changes c"
                " JOIN sqlalchemy_matview.views v ON v.id = c.view_id"
                " WHERE v.view_name = 'mv_kinds')"
            ),
            write=f"INSERT INTO events (id, kind) VALUES ({abs(hash(kind)) % 100000}, '{kind}')",
        )
    )


def test_bookkeeping_is_migrated_online_and_offline(tmp_path: Path, databases: Any) -> None:
    online, fresh = databases
    project = Project(tmp_path, online)
    first = project.revision(MODELS, "tracked").read_text()
    upgrade = first[first.index("def upgrade") : first.index("def downgrade")]
    downgrade = first[first.index("def downgrade") :]
    assert upgrade.index("op.install_change_tracking()") < upgrade.index(
        "op.enable_change_tracking('mv_kinds', [(None, 'events')])"
    )
    assert downgrade.index("op.disable_change_tracking('mv_kinds'") < downgrade.index(
        "op.uninstall_change_tracking()"
    )
    project.run("upgrade", "head")
    offline = fresh()
    script = project.sql("upgrade", "base:head")
    assert "SELECT sqlalchemy_matview.track(pg_catalog.current_schema(), 'mv_kinds'" in script
    psql(script, offline)
    for url in (online, offline):
        assert "No new upgrade operations detected" in project.run("check", url=url)
        assert _marks_stale(url, "click"), url

    second = project.revision(UNTRACKED, "untracked").read_text()
    upgrade = second[second.index("def upgrade") : second.index("def downgrade")]
    assert upgrade.index("op.disable_change_tracking('mv_kinds'") < upgrade.index(
        "op.uninstall_change_tracking()"
    )
    project.run("upgrade", "head")
    assert _query(online, LIBRARY_OBJECTS) == 0
    project.run("downgrade", "-1")  # tracked again, bookkeeping back
    assert _marks_stale(online, "view")

    project.run("downgrade", "base")
    assert _query(online, LIBRARY_OBJECTS) == 0
    offline = fresh()
    psql(project.sql("upgrade", "base:head"), offline)
    assert _query(offline, LIBRARY_OBJECTS) == 0  # the second migration removed it
    psql(project.sql("downgrade", "head:base"), offline)
    assert _query(offline, LIBRARY_OBJECTS) == 0
