"""Helpers for the ``matview`` command tests: a models module on disk, URLs as text."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

MODELS = textwrap.dedent(
    """\
    import sqlalchemy as sa
    from sqlalchemy_matview import MaterializedView

    metadata = sa.MetaData()
    events = sa.Table(
        "events", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
    )
    mv_counts = MaterializedView(
        "mv_counts", metadata,
        sa.select(events.c.kind, sa.func.count().label("n")).group_by(events.c.kind),
        unique_key="kind",
        track_changes=True,
    )
    mv_total = MaterializedView(
        "mv_total", metadata,
        sa.select(sa.func.sum(mv_counts.c.n).label("total")),
    )
    """
)


@pytest.fixture
def url_text(pg_url: sa.URL) -> str:
    """The fresh database's URL as a user would type it (plain postgresql://)."""
    return pg_url.set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def models_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], str]]:
    """Write a module into a temporary directory made current; returns its import name."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str = MODELS) -> str:
        name = f"cli_models_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)
