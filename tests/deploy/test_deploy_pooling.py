"""``check_session``: transaction pooling and standbys are recognised, sessions are not."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from sqlalchemy_matview.orchestration.pooling import check_session, check_session_async
from sqlalchemy_matview.testing.components import PgBouncer, StandbyServer
from sqlalchemy_matview.testing.launcher import PostgresServer


def _factory(url: sa.URL) -> Callable[[], Any]:
    def connect() -> Any:
        return psycopg.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            dbname=url.database,
            autocommit=True,
            prepare_threshold=None,
        )

    return connect


def test_direct_connection(pg_url: sa.URL) -> None:
    found = check_session(_factory(pg_url))
    assert (found.pooled, found.transaction_pooled, found.standby) == (False, False, False)


def test_transaction_pooling(pgbouncer_url: sa.URL) -> None:
    found = check_session(_factory(pgbouncer_url))
    assert (found.pooled, found.transaction_pooled, found.standby) == (True, True, False)


@pytest.mark.parametrize("pool_mode", ["session", "statement"])
def test_other_pool_modes(pg_server: PostgresServer, pg_url: sa.URL, pool_mode: Any) -> None:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip("needs a launched server")
    assert pg_url.database is not None
    with PgBouncer(pg_server, pool_mode=pool_mode) as bouncer:
        found = check_session(_factory(bouncer.url(pg_url.database)))
    assert found.pooled
    assert found.transaction_pooled is (pool_mode != "session")


def test_transaction_pooling_with_a_pool_of_one(pg_server: PostgresServer, pg_url: sa.URL) -> None:
    # The second client waits for the only server connection: still found out.
    if not isinstance(pg_server, PostgresServer):
        pytest.skip("needs a launched server")
    assert pg_url.database is not None
    with PgBouncer(pg_server, settings={"default_pool_size": "1"}) as bouncer:
        found = check_session(_factory(bouncer.url(pg_url.database)), wait=0.5)
    assert found.transaction_pooled


def test_standby(standby_server: StandbyServer, pg_url: sa.URL) -> None:
    assert pg_url.database is not None
    standby_server.wait_for_replay()
    found = check_session(_factory(standby_server.url(pg_url.database)))
    assert (found.pooled, found.standby) == (False, True)


def _async_factory(url: sa.URL, driver: str) -> Callable[[], Any]:
    async def connect() -> Any:
        if driver == "asyncpg":
            import asyncpg

            # No prepared statements behind transaction pooling.
            return await asyncpg.connect(
                host=url.host,
                port=url.port,
                user=url.username,
                database=url.database,
                statement_cache_size=0,
            )
        return await psycopg.AsyncConnection.connect(
            host=url.host,
            port=url.port,
            user=url.username,
            dbname=url.database,
            autocommit=True,
            prepare_threshold=None,
        )

    return connect


ASYNC_DRIVERS = ["asyncpg", "psycopg"]


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_async_check_direct_and_transaction_pooled(
    pg_url: sa.URL, pgbouncer_url: sa.URL, driver: str
) -> None:
    direct = asyncio.run(check_session_async(_async_factory(pg_url, driver)))
    assert (direct.pooled, direct.transaction_pooled, direct.standby) == (False, False, False)
    pooled = asyncio.run(check_session_async(_async_factory(pgbouncer_url, driver)))
    assert (pooled.pooled, pooled.transaction_pooled, pooled.standby) == (True, True, False)


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_async_check_session_pooling_and_standby(
    pg_server: PostgresServer, pg_url: sa.URL, standby_server: StandbyServer, driver: str
) -> None:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip("needs a launched server")
    assert pg_url.database is not None
    with PgBouncer(pg_server, pool_mode="session") as bouncer:
        found = asyncio.run(
            check_session_async(_async_factory(bouncer.url(pg_url.database), driver))
        )
    assert (found.pooled, found.transaction_pooled) == (True, False)
    standby_server.wait_for_replay()
    found = asyncio.run(
        check_session_async(_async_factory(standby_server.url(pg_url.database), driver))
    )
    assert (found.pooled, found.standby) == (False, True)
