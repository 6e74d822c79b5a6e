"""Async twins run the same code over run_sync, for AsyncEngine/AsyncConnection/AsyncSession."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from sqlalchemy_matview import asyncio as mv_async
from sqlalchemy_matview.orchestration import tracking

from .conftest import build_shop


def test_async_twins(async_engine):
    shop = build_shop()

    async def main() -> None:
        async with async_engine.begin() as conn:
            await conn.run_sync(shop.metadata.create_all)
            await conn.execute(shop.orders.insert(), [{"customer": 1, "amount": 150}])
        results = await mv_async.refresh_stale(async_engine, shop.metadata)
        assert [(r.view, r.status) for r in results] == [
            ("public.mv_totals", "refreshed"),
            ("public.mv_top", "refreshed"),
        ]
        results = await mv_async.refresh_all(async_engine, shop.metadata, concurrently=False)
        assert [r.concurrently for r in results] == [False, False]
        async with async_engine.connect() as conn:
            [r] = await mv_async.refresh_views(conn, shop.mv_totals)
            assert r.status == "refreshed"
            await conn.commit()
            states = await conn.run_sync(tracking.view_states)
            assert not states[("public", "mv_totals")].stale
        async with AsyncSession(async_engine) as session:
            [r] = await mv_async.refresh_views(session, "mv_top", lock="wait")
            assert r.status == "refreshed"
            await session.commit()
        async with async_engine.connect() as conn:
            top = (await conn.execute(sa.select(shop.mv_top.table))).all()
        assert top == [(1, 150)]

    asyncio.run(main())
