"""Helpers for the Alembic tests: autogenerate against a connection, run rendered code."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import produce_migrations, render_python_code
from alembic.migration import MigrationContext
from alembic.operations import Operations, ops

import sqlalchemy_matview.alembic
from sqlalchemy_matview.alembic.ops import DependentView

sqlalchemy_matview.alembic.register()


@dataclass
class Generated:
    upgrade_ops: ops.UpgradeOps
    downgrade_ops: ops.DowngradeOps
    upgrade: str
    downgrade: str

    @property
    def empty(self) -> bool:
        return self.upgrade_ops.is_empty()

    def diffs(self) -> list[Any]:
        return list(self.upgrade_ops.as_diffs())


def _code(container: Any) -> str:
    text = render_python_code(container)
    lines = [line for line in text.splitlines() if not line.strip().startswith("# ###")]
    return textwrap.dedent("\n".join(lines)).strip()


def autogenerate(conn: sa.Connection, metadata: Any, **opts: Any) -> Generated:
    """What ``alembic revision --autogenerate`` would write, as ops and as rendered code."""
    context = MigrationContext.configure(
        conn, opts={"target_metadata": metadata, "compare_type": True, **opts}
    )
    script = produce_migrations(context, metadata)
    return Generated(
        script.upgrade_ops,
        script.downgrade_ops,
        _code(script.upgrade_ops),
        _code(script.downgrade_ops),
    )


def run_code(conn: sa.Connection, code: str, **opts: Any) -> None:
    """Execute rendered migration code with ``op`` bound to ``conn``."""
    context = MigrationContext.configure(conn, opts=opts)
    namespace = {"op": Operations(context), "sa": sa, "DependentView": DependentView}
    from sqlalchemy.dialects import postgresql

    namespace["postgresql"] = postgresql
    namespace["Text"] = sa.Text  # Alembic renders JSONB(astext_type=Text())
    exec(compile(code, "<migration>", "exec"), namespace)


def offline_sql(code: str) -> str:
    """The SQL that rendered migration code prints in ``--sql`` mode."""
    import io

    buf = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql",
        opts={"as_sql": True, "output_buffer": buf},
        # As Alembic's env.py templates configure offline mode.
        dialect_opts={"paramstyle": "named"},
    )
    namespace = {"op": Operations(context), "sa": sa, "DependentView": DependentView}
    exec(compile(code, "<migration>", "exec"), namespace)
    return buf.getvalue()
