"""sqlalchemy_matview.asyncio.RefreshWorker on asyncpg and psycopg: debounce, whitelist, faults."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlalchemy_matview import RefreshResult
from sqlalchemy_matview.asyncio import RefreshWorker
from sqlalchemy_matview.orchestration import tracking
from sqlalchemy_matview.orchestration.async_worker import APPLICATION_NAME
from sqlalchemy_matview.orchestration.worker import UnsupportedDriverError

from .conftest import Shop, build_shop


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def create_shop(engine: AsyncEngine) -> Shop:
    shop = build_shop()
    async with engine.begin() as conn:
        await conn.run_sync(shop.metadata.create_all)
    return shop


async def insert(engine: AsyncEngine, shop: Shop, customer: int, amount: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(shop.orders.insert(), [{"customer": customer, "amount": amount}])


async def top(engine: AsyncEngine, shop: Shop) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(sa.select(shop.mv_top.table).order_by(*shop.mv_top.table.c))
        return [tuple(r) for r in result]


async def stale(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        states = await conn.run_sync(tracking.view_states)
    return {s.qualified_name for s in states.values() if s.stale}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> bool:
    """Poll an async check until it holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


async def worker_backends(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        result = await conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :name"
                " AND datname = current_database()"
            ),
            {"name": APPLICATION_NAME},
        )
        return list(result.scalars())


def test_reacts_after_debounce_and_stops(async_engine):
    async def main() -> None:
        shop = await create_shop(async_engine)
        results: list[RefreshResult] = []

        async def record(r: RefreshResult) -> None:  # async callbacks are awaited
            results.append(r)

        worker = RefreshWorker(async_engine, shop.metadata, debounce=0.3, on_result=record)
        await worker.start()
        try:
            assert await wait_for(lambda: worker.passes >= 1)  # catch-up on connect
            assert worker.running
            changed = time.monotonic()
            await insert(async_engine, shop, 1, 300)
            # on_result runs once the pass is over: after both views are visible.
            assert await wait_for(
                lambda: ("public.mv_totals", "refreshed") in [(r.view, r.status) for r in results]
            )
            # Not before the debounce: the notification came after `changed`.
            assert time.monotonic() - changed >= 0.3
            assert await top(async_engine, shop) == [(1, 300)]
            assert len(await worker_backends(async_engine)) == 1
        finally:
            assert await worker.stop(timeout=30)
        assert not worker.running
        assert await stale(async_engine) == set()
        # Its listening connection is closed, not left behind.
        assert await eventually(lambda: _equals(worker_backends(async_engine), []))

    asyncio.run(main())


def test_stop_interrupts_a_long_debounce(async_engine):
    """stop() does not wait out the debounce of a pending change (nor run a last pass)."""

    async def main() -> None:
        shop = await create_shop(async_engine)
        worker = RefreshWorker(async_engine, shop.metadata, debounce=120, max_delay=120)
        await worker.start()
        assert await wait_for(lambda: worker.passes >= 1)
        await insert(async_engine, shop, 1, 300)
        # stop() returns False only when it had to cancel the task after the timeout.
        assert await worker.stop(timeout=30)
        assert worker.passes == 1
        assert await stale(async_engine) == {"public.mv_totals"}

    asyncio.run(main())


async def _equals(awaitable: Awaitable[object], expected: object) -> bool:
    return await awaitable == expected


def test_ignores_unknown_payloads(async_engine, caplog):
    caplog.set_level(logging.WARNING, logger="sqlalchemy_matview")

    def logged(payload: str) -> bool:
        return any(repr(payload) in r.getMessage() for r in caplog.records)

    async def notify(payload: str) -> None:
        async with async_engine.begin() as conn:
            await conn.execute(sa.select(sa.func.pg_notify("sqlalchemy_matview", payload)))

    async def main() -> None:
        shop = await create_shop(async_engine)
        results: list[tuple[int, str, str]] = []
        worker: RefreshWorker

        def record(r: RefreshResult) -> None:
            results.append((worker.passes, r.view, r.status))

        # debounce=0: a wrongly accepted payload would get a pass at once, and the worker
        # reads its next notification only after that pass is over.
        worker = RefreshWorker(async_engine, shop.metadata, debounce=0, on_result=record)
        async with worker:
            assert await wait_for(lambda: worker.passes >= 1)
            await notify("public.x")
            assert await wait_for(lambda: logged("public.x"))
            await notify("x; DROP TABLE orders")
            # Handled after any pass the first payload caused, so such a pass is over now.
            assert await wait_for(lambda: logged("x; DROP TABLE orders"))
            assert [r for r in results if r[0] > 1] == [], "an ignored payload caused a pass"
            assert worker.passes == 1
            # And a real change is still refreshed, by the next pass.
            await insert(async_engine, shop, 1, 300)
            assert await wait_for(lambda: (2, "public.mv_totals", "refreshed") in results)

    asyncio.run(main())


def test_max_delay_bounds_a_stream_of_changes(async_engine):
    async def main() -> None:
        shop = await create_shop(async_engine)
        refreshed_at: list[float] = []

        def record(r: RefreshResult) -> None:
            if r.status == "refreshed":
                refreshed_at.append(time.monotonic())

        worker = RefreshWorker(
            async_engine, shop.metadata, debounce=3.0, max_delay=4.0, on_result=record
        )
        async with worker:
            assert await wait_for(lambda: worker.passes >= 1)
            first_write = time.monotonic()
            await insert(async_engine, shop, 1, 1)
            # Writers notify only when a view turns stale (and during its refresh): the
            # stream of notifications is sent directly. Every 0.1s never leaves 3s of quiet:
            # only max_delay can end the wait. Without it this loop would hit its deadline.
            while not refreshed_at and time.monotonic() - first_write < 60:
                async with async_engine.begin() as conn:
                    await conn.execute(
                        sa.select(sa.func.pg_notify("sqlalchemy_matview", "public.mv_totals"))
                    )
                await asyncio.sleep(0.1)
            assert refreshed_at, "max_delay did not force a refresh during continuous writes"
            # Never before max_delay (measured from before the first write).
            assert refreshed_at[0] - first_write >= 4.0

    asyncio.run(main())


def test_interval_pass_runs_without_notifications(async_engine):
    async def main() -> None:
        shop = await create_shop(async_engine)
        async with RefreshWorker(async_engine, shop.metadata, debounce=0.1, interval=0.3) as w:
            assert await wait_for(lambda: w.passes >= 3)

    asyncio.run(main())


def test_catches_up_after_its_connection_is_terminated(async_engine):
    async def main() -> None:
        shop = await create_shop(async_engine)
        # A debounce longer than the test: only the catch-up pass of the reconnect can refresh.
        worker = RefreshWorker(
            async_engine, shop.metadata, debounce=120, max_delay=120, max_backoff=1.0
        )
        async with worker:
            assert await wait_for(lambda: worker.passes >= 1)
            assert await eventually(lambda: _length(worker_backends(async_engine), 1))
            [pid] = await worker_backends(async_engine)
            await insert(async_engine, shop, 9, 999)
            assert await stale(async_engine) == {"public.mv_totals"}
            async with async_engine.begin() as conn:
                assert await conn.scalar(sa.select(sa.func.pg_terminate_backend(pid)))
            assert await wait_for(lambda: worker.connections >= 2)
            assert await eventually(lambda: _equals(top(async_engine, shop), [(9, 999)]))
            assert await eventually(lambda: _equals(stale(async_engine), set()))
            assert worker.passes >= 2
            [new_pid] = await worker_backends(async_engine)
            assert new_pid != pid

    asyncio.run(main())


async def _length(awaitable: Awaitable[list[int]], expected: int) -> bool:
    return len(await awaitable) == expected


def test_run_blocks_until_stopped(async_engine):
    async def main() -> None:
        shop = await create_shop(async_engine)
        worker = RefreshWorker(async_engine, shop.metadata, debounce=0.1)
        runner = asyncio.create_task(worker.run())
        assert await wait_for(lambda: worker.passes >= 1)
        assert not runner.done()
        await worker.stop()
        await asyncio.wait_for(runner, 30)
        # Cancelling run() (as asyncio.run does on Ctrl-C) stops the worker cleanly too.
        runner = asyncio.create_task(worker.run())
        assert await wait_for(lambda: worker.passes >= 2)
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        assert not worker.running

    asyncio.run(main())


def test_rejects_sync_engines_and_other_drivers(engine, pg_url):
    from sqlalchemy.ext.asyncio import create_async_engine

    with pytest.raises(TypeError, match="AsyncEngine"):
        RefreshWorker(engine, sa.MetaData())  # type: ignore[arg-type]
    aeng = create_async_engine(pg_url.set(drivername="postgresql+psycopg"))
    with pytest.raises(ValueError, match="interval"):
        RefreshWorker(aeng, build_shop().metadata, interval=0)
    # The dialect's driver name is all the check reads; no other async driver is installed.
    aeng.dialect.driver = "aiopg"
    with pytest.raises(UnsupportedDriverError, match="asyncpg or psycopg"):
        RefreshWorker(aeng, sa.MetaData())


def test_stop_is_prompt_while_connecting_to_a_silent_server(async_engine):
    import socket

    # Accepts TCP connections (through the backlog) but never answers: the driver's
    # connect hangs until its own timeout.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]

    from sqlalchemy.ext.asyncio import create_async_engine

    url = async_engine.url.set(host="127.0.0.1", port=port, query={})
    engine = create_async_engine(url)

    async def main() -> None:
        worker = RefreshWorker(engine, build_shop().metadata)
        await worker.start()
        await asyncio.sleep(0.5)
        assert worker.connections == 0 and worker.running
        # The connect would hang for the driver's timeout (a minute, or for ever):
        # stop() cancels it instead of cancelling the task after its own timeout.
        assert await worker.stop(timeout=30)
        assert not worker.running
        # run() returns normally when stop() interrupts a connect.
        runner = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        await worker.stop()
        await asyncio.wait_for(runner, 30)
        await engine.dispose()

    try:
        asyncio.run(main())
    finally:
        silent.close()


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
def test_survives_server_restart(driver):
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from sqlalchemy_matview.testing.launcher import PostgresServer

    with PostgresServer() as server:
        url = server.url(server.create_database()).set(drivername=driver)
        engine = create_async_engine(url, poolclass=NullPool)

        async def main() -> None:
            shop = await create_shop(engine)
            # A long debounce: only the reconnect's catch-up pass can refresh in time.
            worker = RefreshWorker(
                engine, shop.metadata, debounce=60, max_delay=60, max_backoff=1.0
            )
            async with worker:
                assert await wait_for(lambda: worker.passes >= 1)
                await insert(engine, shop, 4, 400)
                assert await stale(engine) == {"public.mv_totals"}
                await asyncio.to_thread(server.restart)
                assert await wait_for(lambda: worker.connections >= 2, timeout=30)
                assert await eventually(lambda: _equals(stale(engine), set()), timeout=30)
                assert await top(engine, shop) == [(4, 400)]
            await engine.dispose()

        asyncio.run(main())


def test_a_failing_on_result_is_logged_and_the_worker_goes_on(async_engine, caplog):
    caplog.set_level(logging.ERROR, logger="sqlalchemy_matview")

    async def main() -> None:
        shop = await create_shop(async_engine)
        calls: list[str] = []

        async def explode(r: RefreshResult) -> None:
            calls.append(r.view)
            raise RuntimeError("callback bug")

        async with RefreshWorker(
            async_engine, shop.metadata, debounce=0.1, on_result=explode
        ) as worker:
            # Called for every result of the catch-up pass, though each call raises.
            assert await wait_for(lambda: calls == ["public.mv_totals", "public.mv_top"])
            await insert(async_engine, shop, 1, 300)
            assert await eventually(lambda: _equals(top(async_engine, shop), [(1, 300)]))
            assert worker.running

    asyncio.run(main())
    assert any(
        "on_result raised for public.mv_totals" in r.getMessage() and r.exc_info
        for r in caplog.records
    )
