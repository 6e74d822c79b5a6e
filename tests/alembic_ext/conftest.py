"""Fixtures for the Alembic tests (helpers live in matview_alembic_helpers)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import sqlalchemy_matview.alembic

sqlalchemy_matview.alembic.register()

# The suite runs in importlib mode; the tests of this folder share one helper module.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def conn(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection in a transaction that the test commits (or not) itself."""
    with engine.connect() as connection:
        yield connection
