"""The real ``alembic`` command in a temporary project: init, autogenerate, upgrade, check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

MODELS = """
import sqlalchemy as sa
from sqlalchemy_matview import MaterializedView

metadata = sa.MetaData()
events = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
)
per_kind = MaterializedView(
    "mv_per_kind", metadata,
    sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind),
    unique_key="kind",
)
"""


def _alembic(project: Path, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(project))
    result = subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_alembic_command_end_to_end(tmp_path: Path, pg_url: sa.URL) -> None:
    project = tmp_path
    _alembic(project, "init", "migrations")
    (project / "models.py").write_text(MODELS)
    ini = project / "alembic.ini"
    url = pg_url.render_as_string(hide_password=False).replace("%", "%%")
    ini.write_text(
        "\n".join(
            f"sqlalchemy.url = {url}" if line.startswith("sqlalchemy.url") else line
            for line in ini.read_text().splitlines()
        )
    )
    env_py = project / "migrations" / "env.py"
    text = env_py.read_text()
    text = text.replace(
        "target_metadata = None",
        "import sqlalchemy_matview.alembic\n"
        "sqlalchemy_matview.alembic.register()\n"
        "import models\n"
        "target_metadata = models.metadata",
    )
    env_py.write_text(text)

    _alembic(project, "revision", "--autogenerate", "-m", "views")
    (script,) = (project / "migrations" / "versions").glob("*.py")
    source = script.read_text()
    assert "import sqlalchemy_matview.alembic.ops" in source
    assert "op.create_materialized_view(" in source
    assert "op.create_table('mv_per_kind'" not in source

    _alembic(project, "upgrade", "head")
    _alembic(project, "check")
    offline = _alembic(project, "upgrade", "base:head", "--sql")
    assert "CREATE MATERIALIZED VIEW mv_per_kind AS SELECT events.kind, count(*) AS n" in offline
    assert "CREATE UNIQUE INDEX mv_per_kind_unique_key ON mv_per_kind (kind);" in offline

    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert sa.inspect(conn).get_materialized_view_names() == ["mv_per_kind"]
        _alembic(project, "downgrade", "base")
        with engine.connect() as conn:
            assert sa.inspect(conn).get_materialized_view_names() == []
            assert sa.inspect(conn).get_table_names() == ["alembic_version"]
    finally:
        engine.dispose()
