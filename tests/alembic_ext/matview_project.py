"""An Alembic project driven by the real ``alembic`` command, and what to compare it with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

#: A role that the projects' migrations grant privileges to (created by ``databases``).
ROLE = "mv_e2e_reader"

SNAPSHOT = sa.text(
    """
    SELECT n.nspname || '.' || c.relname AS name, c.relkind::text AS kind,
           CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END AS definition,
           c.relispopulated AS populated,
           obj_description(c.oid, 'pg_class') AS comment,
           pg_get_userbyid(c.relowner) AS owner,
           ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i
                  WHERE i.indrelid = c.oid ORDER BY 1) AS indexes,
           ARRAY(SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                             ELSE pg_get_userbyid(a.grantee)::text END
                        || ' ' || a.privilege_type || ' ' || a.is_grantable
                   FROM aclexplode(c.relacl) a ORDER BY 1) AS grants,
           ARRAY(SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                   FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum) AS columns
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'v', 'm')
       AND n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND c.relname <> 'alembic_version'
     ORDER BY 1
    """
)


def snapshot(url: sa.URL) -> dict[str, dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {row["name"]: dict(row) for row in conn.execute(SNAPSHOT).mappings()}
    finally:
        engine.dispose()


def _psql() -> str:
    found = shutil.which("psql")
    if found is None:
        from sqlalchemy_matview.testing import default_installation

        candidate = Path(str(default_installation().bindir)) / "psql"
        found = str(candidate) if candidate.exists() else None
    if found is None:
        pytest.skip("psql is not installed")
    return found


class Project:
    """An Alembic project in a directory, run with the real ``alembic`` command."""

    def __init__(self, path: Path, url: sa.URL) -> None:
        self.path = path
        self.url = url
        self.run("init", "migrations")
        env_py = path / "migrations" / "env.py"
        text = env_py.read_text()
        text = text.replace(
            "target_metadata = None",
            "import os\n"
            "url = os.environ['MV_E2E_URL'].replace('%', '%%')\n"
            "config.set_main_option('sqlalchemy.url', url)\n"
            "import sqlalchemy_matview.alembic\n"
            "sqlalchemy_matview.alembic.register()\n"
            "import models\n"
            "target_metadata = models.metadata",
        )
        env_py.write_text(text)

    def run(self, *args: str, url: sa.URL | None = None, ok: bool = True) -> str:
        """stdout and stderr of ``alembic <args>``, which must succeed (or fail: ``ok``)."""
        result = self._run(args, url)
        assert (result.returncode == 0) is ok, result.stdout + result.stderr
        return result.stdout + result.stderr

    def _run(self, args: Any, url: sa.URL | None) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            PYTHONPATH=str(self.path),
            MV_E2E_URL=(url or self.url).render_as_string(hide_password=False),
        )
        return subprocess.run(
            [sys.executable, "-m", "alembic", *args],
            cwd=self.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def revision(self, models: str, message: str) -> Path:
        (self.path / "models.py").write_text(models)
        before = set((self.path / "migrations" / "versions").glob("*.py"))
        self.run("revision", "--autogenerate", "-m", message)
        (script,) = set((self.path / "migrations" / "versions").glob("*.py")) - before
        return script

    def sql(self, *args: str) -> str:
        """The SQL script that ``alembic <args> --sql`` prints."""
        result = self._run([*args, "--sql"], None)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


def psql(script: str, url: sa.URL) -> None:
    target = url.set(drivername="postgresql").render_as_string(hide_password=False)
    result = subprocess.run(
        [_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target],
        input=script,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr + "\n--- script ---\n" + script


def add_to_function(script: Path, function: str, code: str) -> None:
    """Add ``code`` at the end of ``upgrade()`` or the start of ``downgrade()``."""
    text = script.read_text()
    start = text.index(f"def {function}() -> None:")
    code = textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"
    if function == "upgrade":
        at = text.index("    # ### end Alembic commands ###\n", start)
        at = text.index("\n", at) + 1
    else:
        at = text.index("# ### commands auto generated by Alembic", start)
        at = text.index("\n", at) + 1
    script.write_text(text[:at] + code + text[at:])
