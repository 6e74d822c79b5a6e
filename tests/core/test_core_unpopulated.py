"""``refresh(view)`` of a view created WITH NO DATA: a library error that says what to do."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from sqlalchemy_matview import ConcurrentRefreshError, MaterializedView, refresh, refresh_views


def _declare() -> tuple[sa.MetaData, MaterializedView]:
    md = sa.MetaData()
    t = sa.Table("t", md, sa.Column("id", sa.Integer, primary_key=True))
    mv = MaterializedView("mv_empty", md, sa.select(t.c.id), unique_key="id", with_data=False)
    return md, mv


def test_concurrent_refresh_of_an_unpopulated_view_says_what_to_do(engine: sa.Engine) -> None:
    md, mv = _declare()
    md.create_all(engine)
    with Session(engine) as session, pytest.raises(ConcurrentRefreshError) as info:
        session.execute(refresh(mv))
    message = str(info.value)
    assert "'mv_empty'" in message and "never been populated" in message
    assert "concurrently=False" in message and "refresh_views" in message

    # What the message advises works, and then CONCURRENTLY does too.
    [result] = refresh_views(engine, mv)
    assert (result.status, result.concurrently) == ("refreshed", False)
    with engine.begin() as conn:
        conn.execute(refresh(mv))


def test_other_refresh_errors_pass_through(engine: sa.Engine) -> None:
    md, mv = _declare()
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP MATERIALIZED VIEW mv_empty"))
    with engine.connect() as conn, pytest.raises(sa.exc.ProgrammingError, match="mv_empty"):
        conn.execute(refresh(mv))


def test_unpopulated_on_async_drivers(engine: sa.Engine, async_engine: AsyncEngine) -> None:
    md, mv = _declare()
    md.create_all(engine)

    async def go() -> None:
        async with async_engine.connect() as conn:
            with pytest.raises(ConcurrentRefreshError, match="never been populated"):
                await conn.execute(refresh(mv))

    asyncio.run(go())
