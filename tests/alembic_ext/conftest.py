"""Fixtures for the Alembic tests (helpers live in the matview_* modules beside)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_matview.alembic

sqlalchemy_matview.alembic.register()

# The suite runs in importlib mode; the tests of this folder share helper modules.
sys.path.insert(0, str(Path(__file__).parent))

from matview_project import ROLE  # noqa: E402


@pytest.fixture
def databases(pg_server: Any) -> Iterator[tuple[sa.URL, Any]]:
    """``(url, fresh)``: a database, and a function creating more (all dropped after)."""
    created: list[str] = []

    def fresh() -> sa.URL:
        name = pg_server.create_database()
        created.append(name)
        return sa.make_url(pg_server.url(name))

    with sa.create_engine(fresh()).begin() as conn:
        conn.execute(
            sa.text(
                f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') "
                f"THEN CREATE ROLE {ROLE}; END IF; END $$"
            )
        )
    yield fresh(), fresh
    for name in created:
        pg_server.drop_database(name)


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection in a transaction that the test commits (or not) itself."""
    with engine.connect() as connection:
        yield connection
